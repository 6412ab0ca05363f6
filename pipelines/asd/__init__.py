"""Active speaker detection: faces, tracks, and a scorer that says which track speaks.

Built so far: `tracking` (TalkNet-demo IoU tracking) and `sync` (the weight-free audio-visual
synchrony scorer). Still to come (issue 5): the detection stage over all frames, the TalkNet model,
and wiring the stage into the preprocessing job in place of the largest-face crop in
`pipelines.decode`.
"""
