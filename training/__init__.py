"""training: targets (next utterance, teacher responses), prompt building, the projector that maps
the joint embedding to soft tokens, the multimodal LLM wrapper and the QLoRA/DeepSpeed trainer.

Doors: `build_targets(...)`, `train(config)`, `load_run(path)`.
"""
