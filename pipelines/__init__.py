"""pipelines: reading MELD, decoding clips, active-speaker detection, ImageBind encoding, fusion and
the preprocessing job that writes the feature store.

Doors: `pipelines.meld.read_split(s)`, `pipelines.job.run_preprocess(config)` (the Ray Data job),
and `pipelines.synth.generate` (the mini-MELD generator). Heavy modules are imported on use.
"""
