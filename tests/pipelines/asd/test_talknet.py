from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.asd.talknet import CheckpointMismatch, TalkNet, load_talknet, mfcc_100fps, talknet_inputs

OFFICIAL_KEYS = [  # a sample of the keys in pretrain_TalkSet.model
    "model.visualFrontend.frontend3D.0.weight",
    "model.visualFrontend.frontend3D.1.running_var",
    "model.visualFrontend.resnet.layer4.outbnb.weight",
    "model.visualTCN.net.0.net.1.weight",
    "model.visualTCN.net.4.net.4.gamma",
    "model.visualConv1D.net.0.weight",
    "model.audioEncoder.conv1.weight",
    "model.audioEncoder.layer3.5.se.fc.2.bias",
    "model.audioEncoder.layer2.0.downsample.0.weight",
    "model.crossA2V.self_attn.in_proj_weight",
    "model.crossV2A.self_attn.out_proj.bias",
    "model.selfAV.norm2.weight",
    "lossAV.FC.weight",
    "lossA.FC.bias",
    "lossV.FC.weight",
]


def test_official_layout_and_size():
    model = TalkNet()
    keys = set(model.state_dict())
    assert all(k in keys for k in OFFICIAL_KEYS)
    params = sum(p.numel() for p in model.model.parameters())
    assert round(params / 1024 / 1024, 2) == 15.01  # what the official code prints for TalkNet


def test_forward_gives_a_score_per_video_frame():
    model = TalkNet().eval()
    with torch.no_grad():
        scores = model(torch.randn(2, 4 * 30, 13), torch.rand(2, 30, 112, 112) * 255)
    assert scores.shape == (2, 30)


def test_inputs_from_crops_and_audio():
    audio = np.random.default_rng(0).normal(scale=0.1, size=16_000 * 2).astype(np.float32)
    mfcc = mfcc_100fps(audio)
    assert mfcc.shape == (199, 13)  # 100 frames/s
    audio_in, video_in = talknet_inputs(np.zeros((50, 224, 224), np.uint8), mfcc)
    assert video_in.shape == (1, 49, 112, 112) and audio_in.shape == (1, 196, 13)  # cut to 4 MFCC per frame


def test_checkpoint_loads_strictly_with_module_prefix(tmp_path):
    source = TalkNet()
    path = tmp_path / "pretrain_TalkSet.model"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)  # as saved from DataParallel
    loaded = load_talknet(path)
    assert torch.equal(loaded.lossAV.FC.weight, source.lossAV.FC.weight)
    assert not loaded.training


@pytest.mark.parametrize("damage, message", [
    (lambda s: s.pop("model.selfAV.linear1.weight"), "1 missing"),
    (lambda s: s.__setitem__("model.extra.weight", torch.zeros(1)), "1 unexpected"),
    (lambda s: s.__setitem__("lossAV.FC.weight", torch.zeros(2, 128)), "1 of the wrong shape"),
])  # fmt: skip
def test_checkpoint_mismatch_fails_loudly(tmp_path, damage, message):
    state = TalkNet().state_dict()
    damage(state)
    path = tmp_path / "bad.model"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatch, match=message):
        load_talknet(path)


def test_talknet_scorer_runs_in_the_stage(mini_meld, tmp_path):
    """With a checkpoint (random here, so only the path is tested, not the choice) the stage uses TalkNet."""
    from pipelines.decode import SpeakerSettings, decode_clip
    from pipelines.synth import read_ground_truth

    path = tmp_path / "pretrain_TalkSet.model"
    torch.save(TalkNet().state_dict(), path)
    truth = next(t for t in read_ground_truth(mini_meld).values() if t["fault"] is None)
    clip = decode_clip(truth["key"], mini_meld / truth["clip"], speaker=SpeakerSettings(method="talknet", talknet_checkpoint=str(path)))
    assert clip.failure is None and clip.asd_method == "talknet"
    assert np.isfinite(clip.asd_score) and clip.frames.shape == (5, 2, 224, 224, 3)


def test_random_talknet_never_chooses_a_speaker():
    from pydantic import ValidationError

    from infra.config import load_config

    with pytest.raises(ValidationError, match="talknet_checkpoint"):
        load_config(None, ["preprocess.asd_method=talknet"])


def test_batched_scoring_equals_window_by_window():
    """Batching windows across tracks changes nothing but speed."""
    from pipelines.asd.stage import TALKNET_WINDOWS_S, talknet_scores
    from pipelines.asd.tracking import Track

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(60, 120, 160, 3), dtype=np.uint8)
    tracks = [Track(np.arange(0, 60), np.tile([10.0, 10, 60, 60], (60, 1))), Track(np.arange(5, 45), np.tile([80.0, 20, 140, 80], (40, 1)))]
    audio = rng.normal(scale=0.1, size=16_000 * 3).astype(np.float32)
    model = TalkNet().eval()
    batched = talknet_scores(frames, tracks, audio, model)

    from pipelines.asd.talknet import mfcc_100fps
    from pipelines.media import crop_square
    import cv2

    mfcc = mfcc_100fps(audio)
    for track, score in zip(tracks, batched):
        gray = np.stack([cv2.cvtColor(crop_square(frames[f], b, 1.4), cv2.COLOR_RGB2GRAY) for f, b in zip(track.frames, track.boxes)])
        a, v = talknet_inputs(gray, mfcc[track.frames[0] * 4 : (track.frames[0] + len(track)) * 4])
        per_window = []
        with torch.no_grad():
            for seconds in TALKNET_WINDOWS_S:
                step = seconds * 25
                per_window.append(torch.cat([model(a[:, i * 4 : (i + step) * 4], v[:, i : i + step])[0] for i in range(0, v.shape[1], step)]).numpy())
        assert score == pytest.approx(float(np.mean(per_window)), rel=1e-4, abs=1e-5)
