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


@pytest.mark.slow  # faithful mode on CPU: every frame, TalkNet's 6 window lengths
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


def _demo_evaluate_network(model, audio: np.ndarray, video: np.ndarray) -> np.ndarray:
    """TaoRuijie/TalkNet-ASD demoTalkNet.py `evaluate_network` ~l.236-251, before its rounding: per
    duration, window by window, batch 1, `forward` on each window; the mean over durations."""
    import math

    from pipelines.asd.stage import TALKNET_WINDOWS_S

    length = len(video) / 25
    all_scores = []
    with torch.no_grad():
        for duration in TALKNET_WINDOWS_S:
            window = []
            for i in range(int(math.ceil(length / duration))):
                a = torch.FloatTensor(audio[i * duration * 100 : (i + 1) * duration * 100])[None]
                v = torch.FloatTensor(video[i * duration * 25 : (i + 1) * duration * 25])[None]
                window.extend(model(a, v)[0].numpy())
            all_scores.append(window)
    return np.mean(np.array(all_scores), axis=0)


@pytest.mark.slow  # the demo's loop: ~15 ms per frame and window length on CPU
def test_shared_trunk_scoring_equals_the_demo_evaluate_network_loop():
    """Scoring with the visual front end shared across windows changes nothing but speed: the demo's loop
    (`_demo_evaluate_network`) on tracks of 1, 2 and 4 frames (shorter than every window), 27 and 53
    (not a multiple of 25: last windows of 2 and 3 frames, window edges shared by 1 s and 2 s windows)."""
    from pipelines.asd.stage import talknet_frame_scores

    torch.manual_seed(0)
    model = TalkNet().eval()
    rng = np.random.default_rng(0)
    inputs = [(rng.normal(size=(4 * n, 13)).astype(np.float32), rng.integers(0, 255, (n, 112, 112), dtype=np.uint8)) for n in (1, 2, 4, 27, 53, 0)]
    shared = talknet_frame_scores(inputs, model, decimals=None)
    for (audio, video), scores in zip(inputs[:-1], shared):
        np.testing.assert_allclose(scores, _demo_evaluate_network(model, audio, video), rtol=0, atol=1e-5)
    assert shared[-1].shape == (0,)
    assert all(np.array_equal(r, np.round(b, 1)) for r, b in zip(talknet_frame_scores(inputs, model), shared))


@pytest.mark.parametrize("batch", [None, 4])
def test_window_features_equal_the_front_end_on_each_window_alone(batch):
    """Sharing the front end across windows is exact: a window's features equal `VisualFrontend` run on
    the window alone (zeros beyond its edges), for windows at the sequence's edges, inside it, of 1-4
    frames, whatever the frames per ResNet forward."""
    from pipelines.asd.talknet import VisualFrontend

    torch.manual_seed(0)
    frontend = VisualFrontend().eval()
    x = torch.randn(9, 112, 112)
    windows = [(0, 9), (0, 3), (3, 9), (2, 3), (3, 4), (4, 8), (8, 9), (1, 5), (0, 1), (3, 5), (5, 9)]
    with torch.no_grad():
        shared = frontend.window_features(x, windows, batch)
        for (start, end), features in zip(windows, shared):
            torch.testing.assert_close(features, frontend(x[None, start:end])[0], rtol=0, atol=1e-5)


def test_split_forward_equals_forward():
    """`forward_from_visual` on the shared front end's features is `forward` (the stage scores that way)."""
    torch.manual_seed(0)
    model = TalkNet().eval()
    audio, video = torch.randn(1, 4 * 7, 13), torch.rand(1, 7, 112, 112) * 255
    with torch.no_grad():
        visual = model.window_visual_features(video[0], [(0, 7)])[0]
        torch.testing.assert_close(model.forward_from_visual(audio, visual[None]), model(audio, video), rtol=0, atol=1e-5)


def test_window_set_is_the_demo_durationset_as_a_python_set():
    """demoTalkNet.py ~l.215: `durationSet = {1,1,1,2,2,2,3,3,4,5,6}` is a set, so each length once."""
    from pipelines.asd.stage import TALKNET_WINDOWS_S

    assert TALKNET_WINDOWS_S == tuple(sorted({1, 1, 1, 2, 2, 2, 3, 3, 4, 5, 6})) == (1, 2, 3, 4, 5, 6)


def _psf_mfcc_c0_by_hand(signal: np.ndarray) -> np.ndarray:
    """c0 of python_speech_features.mfcc(signal, 16000, numcep=13, winlen=0.025, winstep=0.010) written out
    from its formula (preemphasis 0.97, 512-point power spectrum, 26 mel filters, log, DCT-II ortho,
    lifter 22, appendEnergy: c0 = log frame energy)."""
    x = np.append(signal[0], signal[1:] - 0.97 * signal[:-1]).astype(np.float64)
    n = 1 + int(np.ceil((len(x) - 400) / 160))
    x = np.pad(x, (0, (n - 1) * 160 + 400 - len(x)))  # the last frame is zero-padded
    frames = np.stack([x[i * 160 : i * 160 + 400] for i in range(n)])
    power = np.abs(np.fft.rfft(frames, 512)) ** 2 / 512
    return np.log(power.sum(axis=1))


def test_mfcc_is_computed_on_int16_scale_samples_as_the_demo_reads_its_wav():
    """demoTalkNet.py ~l.218 (`wavfile.read` of 16-bit PCM, then python_speech_features.mfcc) and
    dataLoader.py ~l.11: TalkNet sees int16-scale samples; float input would shift c0 by 2 ln 32768."""
    from pipelines.asd.talknet import as_int16_pcm

    t = np.arange(16_000) / 16_000
    tone = (0.25 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    pcm = as_int16_pcm(tone)
    assert pcm.dtype == np.int16 and pcm.max() == round(0.25 * 32768)
    mfcc = mfcc_100fps(tone)
    np.testing.assert_allclose(mfcc[:, 0], _psf_mfcc_c0_by_hand(pcm.astype(np.float64)), rtol=1e-5)
    from python_speech_features import mfcc as psf_mfcc

    float_c0 = psf_mfcc(tone, 16000, numcep=13, winlen=0.025, winstep=0.010)[:, 0]
    np.testing.assert_allclose(mfcc[:, 0] - float_c0, 2 * np.log(32768), atol=1e-3)
    np.testing.assert_array_equal(mfcc_100fps(pcm), mfcc)  # int16 input is taken as it is


def test_face_crop_window_is_the_demo_crop_video_window():
    """demoTalkNet.py `crop_video` ~l.176-185: pad by int(s(1+2cs)) with 110, rows [y-s, y+1.8s], columns
    [x-1.4s, x+1.4s] (cs = 0.4), resize to 224; `evaluate_network` ~l.225-227: grey, centre 112."""
    from pipelines.asd.talknet import demo_face_crop, demo_grey_centre

    frame = np.zeros((256, 256, 3), np.uint8)
    frame[:, :, 0] = np.arange(256)[None, :]  # red codes the column
    frame[:, :, 1] = np.arange(256)[:, None]  # green codes the row
    x, y, s = 128.0, 100.0, 40.0
    face = demo_face_crop(frame, x, y, s)
    assert face.shape == (224, 224, 3)
    # the window: rows 60..171 (y - s .. y + 1.8 s), columns 72..183 (x -+ 1.4 s): 112 source px -> 224
    assert abs(int(face[0, 0, 1]) - 60) <= 1 and abs(int(face[-1, 0, 1]) - 171) <= 1
    assert abs(int(face[0, 0, 0]) - 72) <= 1 and abs(int(face[0, -1, 0]) - 183) <= 1
    centre = demo_grey_centre(face)
    assert centre.shape == (112, 112)
    # the centre of the 112 crop is row y + 0.4 s (below the box centre), column x
    assert abs(int(face[112, 112, 1]) - (y + 0.4 * s)) <= 1 and abs(int(face[112, 112, 0]) - x) <= 1


def test_face_crop_pads_with_grey_110_outside_the_frame():
    """demoTalkNet.py ~l.181: numpy.pad(..., 'constant', constant_values=(110, 110))."""
    from pipelines.asd.talknet import demo_face_crop

    face = demo_face_crop(np.zeros((100, 100, 3), np.uint8), 5.0, 5.0, 40.0)
    assert (face[0, 0] == 110).all() and (face[-1, -1] == 0).all()


def test_track_smoothing_is_the_demo_medfilt_with_zero_padding():
    """demoTalkNet.py ~l.170-175: s = max(h, w)/2, x, y each `signal.medfilt(kernel_size=13)`."""
    from scipy.signal import medfilt

    from pipelines.asd.talknet import demo_crop_track

    rng = np.random.default_rng(0)
    boxes = np.cumsum(rng.normal(size=(30, 4)), axis=0) + [100, 100, 160, 180]
    xys = demo_crop_track(boxes)
    np.testing.assert_allclose(xys[:, 2], medfilt(np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]) / 2, 13))
    np.testing.assert_allclose(xys[:, 0], medfilt((boxes[:, 0] + boxes[:, 2]) / 2, 13))


def test_scored_length_drops_the_last_frame_as_the_demo_does():
    """demoTalkNet.py ~l.233-235: length = min((nA - nA % 4) / 100, nV / 25); a track of n frames has
    n * 640 samples, i.e. 4n - 1 MFCC frames, so n - 1 frames are scored."""
    from pipelines.asd.stage import talknet_track_inputs

    audio = np.random.default_rng(0).normal(scale=0.1, size=16_000 * 4).astype(np.float32)
    mfcc, faces = talknet_track_inputs(np.zeros((50, 112, 112), np.uint8), audio, first_frame=10)
    assert mfcc.shape == (4 * 49, 13) and faces.shape == (49, 112, 112)
    own = mfcc_100fps(audio[10 * 640 : 60 * 640])  # the track's own audio, as the demo cuts it with ffmpeg
    np.testing.assert_array_equal(mfcc, own[: 4 * 49])
