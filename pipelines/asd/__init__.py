"""Active speaker detection: shots, faces, tracks, and a scorer that says which track speaks.

`stage.speaker_for_clip` is the stage on one clip, in-process (the preprocessing job runs its steps as
Ray stages, through `pipelines.decode`): `shots` (PySceneDetect's content detector, as TalkNet's
demo), Haar faces or `s3fd`, `tracking` (TalkNet-demo IoU tracks within shots), `sync` (the weight-free audio-visual synchrony
scorer) or `talknet` (TalkNet, for users with its checkpoint), in the demo's faithful way by default
when a checkpoint is given; `show` renders a contact sheet of the decision for `merg asd show`.
"""
