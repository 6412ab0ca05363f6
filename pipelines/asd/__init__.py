"""Active speaker detection: faces, tracks, and a scorer that says which track speaks.

`stage.find_speaker` is the stage the preprocessing job runs (through `pipelines.decode`): Haar faces
on every k-th frame at 25 fps, `tracking` (TalkNet-demo IoU tracks), `sync` (the weight-free
audio-visual synchrony scorer) or `talknet` (TalkNet, for users with its checkpoint); `show` renders
a contact sheet of the decision for `merg asd show`.
"""
