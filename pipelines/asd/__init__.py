"""Active speaker detection: faces, tracks, and a scorer that says which track speaks.

Built so far: `tracking` (TalkNet-demo IoU tracking). Still to come (issue 5): the detector stage,
the TalkNet model and the weight-free `sync` scorer, and wiring it into the preprocessing job in
place of the largest-face crop in `pipelines.decode`.
"""
