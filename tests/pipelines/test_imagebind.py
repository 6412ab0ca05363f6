from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.imagebind import (
    AUDIO_MEAN, AUDIO_STD, CLIP_MEAN, CLIP_STD, SIZES, CheckpointMismatch, ImageBindEncoder, audio_features,
    build_model, clip_windows, load_checkpoint, short_side_resize, video_frame_indices, vision_inputs,
)  # fmt: skip


def test_clip_windows_follow_the_official_sampler():
    # longer than 2 s: starts spread uniformly from 0 to duration - 2
    assert clip_windows(6.0, 3) == [(0.0, 2.0), (2.0, 4.0), (4.0, 6.0)]
    assert clip_windows(4.0, 5)[-1] == (2.0, 4.0)
    # shorter than 2 s (common in MELD): every window starts at 0 and runs past the end
    assert clip_windows(0.8, 3) == [(0.0, 2.0)] * 3


def test_audio_features_shape_padding_and_normalisation():
    rng = np.random.default_rng(0)
    long = audio_features(rng.normal(scale=0.1, size=16_000 * 5).astype(np.float32))
    assert long.shape == (3, 1, 128, 204) and long.dtype == np.float32
    short = audio_features(rng.normal(scale=0.1, size=16_000 // 2).astype(np.float32))  # 0.5 s
    assert short.shape == (3, 1, 128, 204)
    # 0.5 s gives 48 fbank frames; the rest is zero-padded in fbank space, then normalised
    pad_value = (0.0 - AUDIO_MEAN) / AUDIO_STD
    np.testing.assert_allclose(short[0, 0, :, 48:], pad_value, rtol=1e-6)
    assert not np.allclose(short[0, 0, :, :48], pad_value)
    # 2 s of audio fills exactly 198 frames of 204 (25 ms window, 10 ms shift)
    two = audio_features(rng.normal(scale=0.1, size=32_000).astype(np.float32))
    np.testing.assert_allclose(two[0, 0, :, 198:], pad_value, rtol=1e-6)


def test_audio_features_match_kaldi_fbank_by_hand():
    import torchaudio.compliance.kaldi as kaldi

    wave = np.sin(np.linspace(0, 2000, 16_000 * 3)).astype(np.float32)
    features = audio_features(wave)
    segment = torch.from_numpy(wave[:32_000]).reshape(1, -1)
    fbank = kaldi.fbank(segment - segment.mean(), htk_compat=True, sample_frequency=16_000, use_energy=False,
                        window_type="hanning", num_mel_bins=128, dither=0.0, frame_length=25, frame_shift=10)  # fmt: skip
    expected = (fbank.T.numpy() - AUDIO_MEAN) / AUDIO_STD
    np.testing.assert_allclose(features[0, 0, :, : expected.shape[1]], expected, rtol=1e-5, atol=1e-5)


def test_video_frame_indices():
    # 3 s at 25 fps: windows [0,2), [0.25,2.25), ... -> first and last frame inside each
    indices = video_frame_indices(75, 25.0)
    assert indices.shape == (5, 2)
    assert indices[0].tolist() == [0, 49] and indices[-1].tolist() == [25, 74]
    # shorter than 2 s: first and last frame of the clip
    assert video_frame_indices(30, 30.0).tolist() == [[0, 29]] * 5


@pytest.mark.parametrize(
    "samples, upstream",
    [
        (32_046, [(0, 32_000), (22, 32_022), (45, 32_045)]),  # floats: (45, 32_046)
        (52_800, [(0, 32_000), (10_399, 42_399), (20_799, 52_799)]),  # floats: (10_399, 42_400), (20_799, 52_800)
        (32_009, [(0, 32_000), (4, 32_004), (9, 32_009)]),
        (64_001, [(0, 32_000), (16_000, 48_000), (32_001, 64_001)]),
        (20_000, [(0, 32_000)] * 3),
    ],
)
def test_audio_clip_bounds_are_the_official_samplers_in_fractions(samples, upstream):
    """facebookresearch/pytorchvideo pytorchvideo/data/clip_sampling.py (6cdc929) l.375-379 and l.402:
    ConstantClipsPerVideoSampler's starts are Fractions of the float duration (`Fraction(max(duration - 2,
    0))` / (clips - 1)), ends start + Fraction(2); ImageBind imagebind/data.py (53680b0) l.148-153 cuts
    samples `int(t * 16000)` of those Fractions. The bounds above are what that code gives; computed in
    floats, 853 of 2,487 lengths (0.25-6 s, step 37 samples) end one sample apart."""
    windows = clip_windows(samples / 16_000, 3)
    assert [(int(start * 16_000), int(end * 16_000)) for start, end in windows] == upstream


@pytest.mark.parametrize(
    "n_frames, fps, upstream",
    [
        (51, 25.0, [[0, 49], [1, 50], [1, 50], [1, 50], [2, 50]]),  # 25 x 0.04000000000000004 > 1: frame 2
        (79, 24_000 / 1001, [[0, 47], [8, 55], [16, 63], [24, 71], [32, 78]]),
        (100, 30.0, [[0, 59], [11, 69], [21, 80], [30, 89], [41, 99]]),
    ],
)
def test_video_frames_are_the_ones_pytorchvideos_decord_clip_reads(n_frames, fps, upstream):
    """pytorchvideo/data/encoded_video_decord.py (6cdc929) l.117 (duration = frames / fps) and l.170-173
    (frames ceil(fps x start) .. ceil(fps x end) - 1 of the sampler's Fraction windows, a float product),
    then ImageBind data.py l.328 UniformTemporalSubsample(2): the first and the last. The frames above are
    what that code gives (with a tolerance of 1e-6 on the products, 178 of 1,975 (frames, fps) pairs at
    23.976-30 fps and 5-399 frames picked another frame)."""
    assert video_frame_indices(n_frames, fps).tolist() == upstream


def test_mean_removal_acts_in_place_on_the_whole_waveform_as_imagebind():
    """facebookresearch/ImageBind imagebind/data.py (53680b0) l.34 `waveform -= waveform.mean()` runs on
    the view l.148-153 cuts out of the loaded waveform: under 6 s the 3 clips overlap, and a later clip
    loses the earlier clips' means too. A 3.3 s stereo clip with a DC offset: clips 2 and 3 differ from
    clips whose means are removed one by one (~1 fbank unit), and equal upstream's in-place loop."""
    import torchaudio.compliance.kaldi as kaldi

    rng = np.random.default_rng(0)
    wave = (rng.normal(scale=0.05, size=(2, 52_800)) + [[0.02], [0.01]]).astype(np.float32)
    before = wave.copy()
    features = audio_features(wave)
    np.testing.assert_array_equal(wave, before)  # the caller's samples are left alone

    def fbank(segment):
        bank = kaldi.fbank(segment, htk_compat=True, sample_frequency=16_000, use_energy=False, window_type="hanning",
                           num_mel_bins=128, dither=0.0, frame_length=25, frame_shift=10).T  # fmt: skip
        return ((bank[:, :204] - AUDIO_MEAN) / AUDIO_STD).numpy()

    in_place, one_by_one = torch.from_numpy(before.copy()), torch.from_numpy(before)
    for clip, (start, end) in enumerate([(0, 32_000), (10_399, 42_399), (20_799, 52_799)]):
        view = in_place[:, start:end]
        view -= view.mean()  # upstream's way: the shared samples stay changed for the next clip
        np.testing.assert_allclose(features[clip, 0, :, :198], fbank(view)[:, :198], rtol=1e-5, atol=1e-4)
        alone = one_by_one[:, start:end]
        gap = np.abs(features[clip, 0, :, :198] - fbank(alone - alone.mean())[:, :198]).max()
        assert gap < 1e-4 if clip == 0 else gap > 0.3, (clip, gap)


def test_vision_inputs_normalisation_and_crops():
    frames = np.full((5, 2, 224, 398, 3), 128, np.uint8)
    x = vision_inputs(frames)
    assert x.shape == (15, 3, 2, 224, 224)  # 5 clips x 3 spatial crops
    expected = (128 / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(x[0, :, 0, 0, 0].numpy(), expected, rtol=1e-5)
    ramp = np.tile(np.arange(398, dtype=np.uint8)[None, :, None], (224, 1, 3))
    crops = vision_inputs(np.broadcast_to(ramp, (1, 2, 224, 398, 3)))
    left, centre, right = (crops[i, 0, 0, 0, 0].item() for i in range(3))
    assert left < centre < right  # left, centre, right crops of a wide frame
    square = vision_inputs(np.zeros((5, 2, 224, 224, 3), np.uint8))
    assert square.shape == (5, 3, 2, 224, 224)  # the 3 crops of a square frame are the same pixels


def test_short_side_resize_keeps_squares_square():
    assert short_side_resize(np.zeros((2, 284, 284, 3), np.uint8)).shape == (2, 224, 224, 3)
    assert short_side_resize(np.zeros((1, 480, 854, 3), np.uint8)).shape == (1, 224, 398, 3)


def _small_state(tmp_path, mutate=None, prefix=""):
    state = build_model(SIZES["small"]).state_dict()
    if mutate:
        mutate(state)
    path = tmp_path / "ckpt.pth"
    torch.save({prefix + k: v for k, v in state.items()}, path)
    return path


def test_checkpoint_loads_strictly(tmp_path):
    path = _small_state(tmp_path, prefix="module.")
    model = build_model(SIZES["small"])
    load_checkpoint(model, path)
    reference = torch.load(path, weights_only=True)
    key = next(iter(reference))
    assert torch.equal(model.state_dict()[key.removeprefix("module.")], reference[key])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.pop(next(iter(s))), "1 missing"),
        (lambda s: s.__setitem__("extra.weight", torch.zeros(1)), "1 unexpected: extra.weight"),
        (lambda s: s.__setitem__(next(iter(s)), torch.zeros(3, 3)), "1 of the wrong shape"),
    ],
)
def test_checkpoint_mismatch_fails_loudly(tmp_path, mutate, message):
    path = _small_state(tmp_path, mutate)
    with pytest.raises(CheckpointMismatch, match=message):
        load_checkpoint(build_model(SIZES["small"]), path)


def test_huge_architecture_has_the_checkpoint_layout():
    from pipelines.imagebind import HUGE_TENSORS

    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on the meta device: no 4.8 GB allocation
        model = build_model(SIZES["huge"])
    assert len(model.state_dict()) == HUGE_TENSORS


def test_encoder_outputs_imagebind_head_norms():
    encoder = ImageBindEncoder(seed=0)
    audio = encoder.encode_audio(np.zeros((2, 3, 1, 128, 204), np.float32))
    vision = encoder.encode_vision(np.zeros((2, 5, 2, 224, 224, 3), np.uint8))
    assert audio.shape == vision.shape == (2, SIZES["small"].out_embed_dim)
    np.testing.assert_allclose(np.linalg.norm(vision, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(audio, axis=1), 20.0, rtol=1e-2)  # unit x logit scale 20
    again = ImageBindEncoder(seed=0).encode_audio(np.zeros((1, 3, 1, 128, 204), np.float32))
    np.testing.assert_allclose(again[0], audio[0], atol=1e-5)  # seeded: reproducible


def test_encoder_dtype_casts_the_same_weights_and_rejects_unknown_ones():
    frames = np.random.default_rng(0).integers(0, 256, (2, 5, 2, 224, 224, 3), dtype=np.uint8)
    fp32 = ImageBindEncoder(seed=0).encode_vision(frames)
    bf16 = ImageBindEncoder(seed=0, dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    out = bf16.encode_vision(frames)
    assert out.dtype == np.float32  # the store's dtype whatever the compute dtype
    cosine = (out * fp32).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(fp32, axis=1))
    assert cosine.min() > 0.99
    with pytest.raises(ValueError, match="encoder dtype"):
        ImageBindEncoder(seed=0, dtype="int8")


def test_audio_is_channel_0_of_a_stereo_file_as_imagebind_loads_it(tmp_path):
    """facebookresearch/ImageBind imagebind/data.py `load_and_transform_audio_data` ~l.138-157: torchaudio
    loads every channel, `torchaudio.functional.resample`s to 16 kHz, removes the clip's mean over all
    channels (~l.34) and `kaldi.fbank` takes channel 0, its default: no downmix."""
    import av
    import torchaudio.compliance.kaldi as kaldi
    import torchaudio.functional

    from pipelines.decode import read_audio
    from pipelines.imagebind import resample_channels

    t = np.arange(48_000 * 2) / 48_000
    left, right = 0.3 * np.sin(2 * np.pi * 300 * t), 0.3 * np.sin(2 * np.pi * 2500 * t)
    path = tmp_path / "stereo.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=48_000, layout="stereo")
        frame = av.AudioFrame.from_ndarray((np.stack([left, right]) * 32767).astype(np.int16).T.reshape(1, -1).copy(), format="s16", layout="stereo")
        frame.sample_rate = 48_000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    audio = read_audio(path)
    channels, rate, downmix_16k = audio.channels, audio.rate, audio.mono_16k
    assert channels.shape == (2, 96_000) and rate == 48_000
    np.testing.assert_allclose(channels[0], left, atol=1e-4)
    features = audio_features(resample_channels(channels, rate))

    wave = torchaudio.functional.resample(torch.from_numpy(channels), 48_000, 16_000)[:, :32_000]
    wave = wave - wave.mean()
    fbank = kaldi.fbank(wave, htk_compat=True, sample_frequency=16_000, use_energy=False, window_type="hanning",
                        num_mel_bins=128, dither=0.0, frame_length=25, frame_shift=10)  # fmt: skip
    np.testing.assert_allclose(features[0, 0, :, :198], (fbank.T.numpy() - AUDIO_MEAN) / AUDIO_STD, rtol=1e-5, atol=1e-5)
    downmix = audio_features(downmix_16k)
    assert np.abs(downmix - features).max() > 0.5  # the downmix is not what ImageBind was trained on


def test_centre_crop_offset_is_ceil_as_pytorchvideo_uniform_crop():
    """facebookresearch/ImageBind imagebind/data.py `uniform_crop` ~l.226-227: offsets are
    ceil((size - 224) / 2), so an odd surplus puts the extra pixel on the left."""
    ramp = np.tile(np.arange(225, dtype=np.uint8)[None, :, None], (224, 1, 3))
    crops = vision_inputs(np.broadcast_to(ramp, (1, 2, 224, 225, 3)))
    first_column = crops[1, 0, 0, 0, 0].item() * CLIP_STD[0] + CLIP_MEAN[0]
    assert round(first_column * 255) == 1  # centre crop starts at column ceil(1 / 2) = 1


def test_vision_resize_is_in_float_as_short_side_scale():
    """data.py ~l.317-347: frames / 255 then pytorchvideo ShortSideScale (bilinear on floats), then
    Normalize: no rounding back to uint8 in between."""
    frames = np.random.default_rng(0).integers(0, 255, (1, 2, 300, 451, 3), dtype=np.uint8)
    x = vision_inputs(frames)
    video = torch.from_numpy(frames[0]).float().div(255).permute(0, 3, 1, 2)  # T, C, H, W
    scaled = torch.nn.functional.interpolate(video, size=(224, int(np.floor(451 / 300 * 224))), mode="bilinear", align_corners=False)
    scaled = (scaled - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    offset = int(np.ceil((scaled.shape[-1] - 224) / 2))
    np.testing.assert_allclose(x[1].permute(1, 0, 2, 3).numpy(), scaled[..., offset : offset + 224].numpy(), atol=1e-5)
