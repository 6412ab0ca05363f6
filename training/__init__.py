"""training: targets (next utterance, teacher responses), prompt building, the projector that maps
the joint embedding to soft tokens, the multimodal LLM wrapper and the QLoRA/DeepSpeed trainer.

Doors: `build_targets(...)`, `train(config)`, `load_run(path)`.
"""

from training.mllm import load_run
from training.targets import build_targets
from training.trainer import train

__all__ = ["build_targets", "load_run", "train"]
