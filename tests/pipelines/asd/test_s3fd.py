from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.asd.s3fd import S3FD, decode, detect, load_s3fd, priors
from pipelines.checkpoints import CheckpointMismatch

OFFICIAL_KEYS = ["vgg.0.weight", "vgg.28.bias", "vgg.31.weight", "vgg.33.bias", "L2Norm3_3.weight", "L2Norm5_3.weight",
                 "extras.3.weight", "loc.5.bias", "conf.0.weight", "conf.5.weight"]  # fmt: skip


def test_layout_and_heads():
    model = S3FD().eval()
    state = model.state_dict()
    assert all(k in state for k in OFFICIAL_KEYS)
    assert state["conf.0.weight"].shape[0] == 4 and state["conf.1.weight"].shape[0] == 2  # max-out background
    loc, score, sizes = model(torch.zeros(1, 3, 96, 160))
    assert loc.shape[1] == score.shape[1] == sum(h * w for h, w in sizes) == priors((96, 160), sizes).shape[0]
    assert sizes[0] == (24, 40)  # stride 4


def test_channels_last_input_gives_the_same_outputs():
    """`detect_batch` feeds the CPU channels-last frames (faster): same boxes and scores to float tolerance."""
    torch.manual_seed(0)
    model = S3FD().eval()
    x = torch.randn(2, 3, 96, 160) * 60
    with torch.no_grad():
        for plain, channels_last in zip(model(x)[:2], model(x.contiguous(memory_format=torch.channels_last))[:2]):
            torch.testing.assert_close(channels_last, plain, rtol=1e-4, atol=1e-5)


def test_decode_with_zero_offsets_gives_the_anchors():
    anchors = torch.tensor([[0.5, 0.5, 0.2, 0.1]])
    np.testing.assert_allclose(decode(torch.zeros(1, 4), anchors).numpy(), [[0.4, 0.45, 0.6, 0.55]], rtol=1e-6)


def test_detect_returns_pixel_boxes():
    boxes = detect(S3FD().eval(), np.zeros((240, 320, 3), np.uint8), threshold=0.0)
    assert boxes.ndim == 2 and boxes.shape[1] == 4


def test_checkpoint_loads_strictly_and_mismatch_fails(tmp_path):
    state = S3FD().state_dict()
    torch.save(state, tmp_path / "sfd_face.pth")
    assert isinstance(load_s3fd(tmp_path / "sfd_face.pth"), S3FD)
    state.pop("L2Norm4_3.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatch, match="1 missing"):
        load_s3fd(tmp_path / "bad.pth")


@pytest.mark.slow  # faithful mode on CPU: every frame, TalkNet's 6 window lengths
def test_stage_detects_with_s3fd_when_given_a_checkpoint(mini_meld, tmp_path):
    from pipelines.decode import SpeakerSettings, decode_clip
    from pipelines.synth import read_ground_truth

    torch.save(S3FD().state_dict(), tmp_path / "sfd_face.pth")  # random: only the path is tested
    truth = next(t for t in read_ground_truth(mini_meld).values() if t["fault"] is None)
    clip = decode_clip(truth["key"], mini_meld / truth["clip"], speaker=SpeakerSettings(s3fd_checkpoint=str(tmp_path / "sfd_face.pth")))
    assert clip.failure is None and clip.frames.shape == (5, 2, 224, 224, 3)
    assert clip.asd_method in ("sync", "none")


def test_second_nms_at_iou_0_1_merges_boxes_the_first_keeps():
    """TaoRuijie/TalkNet-ASD model/faceDetector/s3fd/__init__.py ~l.63: after the detector's NMS at IoU 0.3
    (box_utils.py `Detect`, nms_thresh=0.3) `detect_faces` runs `nms_(bboxes, 0.1)`: two boxes overlapping
    with IoU 0.2 end as one (the higher-scoring), a box over 0.9 is needed, and distant faces both stay."""
    from pipelines.asd.s3fd import suppress

    boxes = torch.tensor([[0.0, 0, 100, 100], [50, 0, 150, 100], [300, 0, 400, 100], [0, 200, 100, 300]])
    # IoU(box0, box1) = 5000 / 15000 = 0.33 > 0.3: the first NMS already merges; shift to IoU 0.2
    boxes[1] = torch.tensor([66.7, 0, 166.7, 100])  # IoU = 3330 / 16670 = 0.2
    scores = torch.tensor([0.95, 0.99, 0.97, 0.85])
    kept = suppress(boxes, scores)
    assert kept.shape == (2, 4)  # box1 (beats box0 at IoU 0.2), box2; box3 is under 0.9
    np.testing.assert_allclose(kept, boxes[[1, 2]].numpy())


def test_batched_detection_equals_frame_by_frame():
    model = S3FD().eval()
    frames = np.random.default_rng(0).integers(0, 255, (2, 32, 48, 3), dtype=np.uint8)
    from pipelines.asd.s3fd import detect_batch

    batched = detect_batch(model, frames, threshold=0.0, scale=1.0)
    for frame, boxes in zip(frames, batched):
        np.testing.assert_allclose(boxes, detect(model, frame, threshold=0.0, scale=1.0), rtol=1e-4, atol=1e-3)
