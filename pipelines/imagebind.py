"""ImageBind audio and vision encoders: the official model code, the official preprocessing recipe.

Model code comes from `imagebind-unofficial` (facebookresearch's ImageBind, packaged). Its package
`__init__` imports `imagebind.data`, which needs pytorchvideo (broken with current torchvision), so
the model module is imported with that `__init__` bypassed. Preprocessing is written here to match
`imagebind.data` without importing it:

- audio: every channel resampled to 16 kHz (torchaudio), 3 clips of 2 s spread uniformly over the
  utterance, each clip's mean (over all channels) removed, kaldi fbank of channel 0 (kaldi.fbank's
  default channel: ImageBind never downmixes) with 128 mel bins (25 ms window, 10 ms shift, hanning,
  htk_compat, dither 0), padded/cut to 204 frames, normalised with mean -4.268 and std 9.138;
- vision: 5 clips of 2 s spread the same way, 2 frames per clip (the first and last of the window),
  short side scaled to 224 (bilinear, in float: no rounding back to uint8), CLIP mean/std, 3 spatial
  crops of 224 (left, centre with offset ceil((w - 224) / 2), right).

Shorter utterances than 2 s (common in MELD) get windows that start at 0 and run past the end,
exactly as the official sampler does; the real duration is recorded by the job.

Without a checkpoint the same architecture is built at a small size with seeded random weights,
and its provenance says `random-init:<seed>`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import sys
import types
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.checkpoints import CheckpointMismatch, load_strict  # noqa: F401 - CheckpointMismatch is part of this door

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
AUDIO_CLIPS, VIDEO_CLIPS, CLIP_SECONDS = 3, 5, 2.0
FRAMES_PER_CLIP, SPATIAL_CROPS, IMAGE_SIZE = 2, 3, 224
MEL_BINS, TARGET_FRAMES = 128, 204
AUDIO_MEAN, AUDIO_STD = -4.268, 9.138
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AUDIO_LOGIT_SCALE = 20.0  # ImageBind's audio postprocessor multiplies the unit vector by 20
HUGE_TENSORS = 1311  # entries in imagebind_huge.pth
# the encoder's compute dtype (`preprocess.encoder_dtype`): inputs are prepared in fp32, cast on the device
ENCODER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ImageBindSize:
    """Widths and depths of the ImageBind architecture (the six modality trunks)."""

    out_embed_dim: int
    vision_embed_dim: int
    vision_num_blocks: int
    vision_num_heads: int
    audio_embed_dim: int
    audio_num_blocks: int
    audio_num_heads: int
    text_embed_dim: int
    text_num_blocks: int
    text_num_heads: int
    depth_embed_dim: int = 384
    depth_num_blocks: int = 12
    depth_num_heads: int = 8
    thermal_embed_dim: int = 768
    thermal_num_blocks: int = 12
    thermal_num_heads: int = 12
    imu_embed_dim: int = 512
    imu_num_blocks: int = 6
    imu_num_heads: int = 8


SIZES = {
    "huge": ImageBindSize(1024, 1280, 32, 16, 768, 12, 12, 1024, 24, 16),
    # The default without a checkpoint: same architecture, small enough for a 2-core CPU.
    "small": ImageBindSize(128, 96, 2, 4, 96, 2, 4, 64, 1, 4, 32, 1, 4, 32, 1, 4, 32, 1, 4),
}


def resolve_size(checkpoint: str | Path | None, size: str | None) -> str:
    """A checkpoint means the huge model unless a size is named; no checkpoint means small."""
    return size or ("huge" if checkpoint else "small")


def checkpoint_id(checkpoint: str | Path | None, seed: int) -> str:
    """Provenance of the weights: the checkpoint's sha256, or `random-init:<seed>`."""
    return file_sha256(Path(checkpoint)) if checkpoint else f"random-init:{seed}"


def _imagebind_model_module():
    """Import imagebind.models.imagebind_model without running the package's __init__."""
    if "imagebind.models.imagebind_model" in sys.modules:
        return sys.modules["imagebind.models.imagebind_model"]
    spec = importlib.util.find_spec("imagebind")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("imagebind-unofficial is not installed (run `make install`)")
    if "imagebind" not in sys.modules:
        package = types.ModuleType("imagebind")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["imagebind"] = package
    from imagebind.models import imagebind_model

    return imagebind_model


def build_model(size: ImageBindSize) -> torch.nn.Module:
    module = _imagebind_model_module()
    return module.ImageBindModel(video_frames=FRAMES_PER_CLIP, **asdict(size))


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(model: torch.nn.Module, path: Path | str) -> None:
    """Load `imagebind_huge.pth` strictly (memory-mapped): every key, every shape."""
    load_strict(model, path, "ImageBind", mmap=True)


# ---- preprocessing (CPU) ---------------------------------------------------------------------------
def clip_windows(duration: float, clips: int, clip_seconds: float = CLIP_SECONDS) -> list[tuple[Fraction, Fraction]]:
    """pytorchvideo's ConstantClipsPerVideoSampler: `clips` windows spread uniformly, in exact fractions
    of the float duration (in floats, 853 of 2,487 audio lengths' clip ends would be one sample off)."""
    last_start = Fraction(max(duration - clip_seconds, 0.0))
    step = last_start / max(clips - 1, 1)
    return [(i * step, i * step + Fraction(clip_seconds)) for i in range(clips)]


def resample_channels(channels: np.ndarray, rate: int) -> np.ndarray:
    """float32 [C, N] at `rate` -> [C, N'] at 16 kHz, with torchaudio's resampler, as ImageBind's loader."""
    import torchaudio.functional

    wave = torch.as_tensor(np.asarray(channels, np.float32))
    return wave.numpy() if rate == SAMPLE_RATE else torchaudio.functional.resample(wave, rate, SAMPLE_RATE).numpy()


def audio_features(waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """16 kHz waveform, mono [N] or channels [C, N] -> normalised fbank clips, float32 [3, 1, 128, 204].

    With several channels, as the official loader: each clip's mean over all channels is removed, then
    `kaldi.fbank` takes channel 0 (its default). As there, the mean is removed in place from the whole
    waveform (a copy of it here): where clips overlap (utterances under 6 s), a later clip has lost the
    earlier clips' means too."""
    import torchaudio.compliance.kaldi as kaldi

    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"audio must be resampled to {SAMPLE_RATE} Hz first (got {sample_rate})")
    wave = torch.as_tensor(waveform, dtype=torch.float32).clone()  # the clips below change it in place
    wave = wave.reshape(1, -1) if wave.ndim == 1 else wave
    clips = []
    for start, end in clip_windows(wave.shape[1] / sample_rate, AUDIO_CLIPS):
        segment = wave[:, int(start * sample_rate) : int(end * sample_rate)]  # a view
        segment -= segment.mean()
        fbank = kaldi.fbank(
            segment, htk_compat=True, sample_frequency=sample_rate, use_energy=False, window_type="hanning",
            num_mel_bins=MEL_BINS, dither=0.0, frame_length=25, frame_shift=10,
        ).transpose(0, 1)  # fmt: skip
        pad = TARGET_FRAMES - fbank.shape[1]
        fbank = F.pad(fbank, (0, pad)) if pad > 0 else fbank[:, :TARGET_FRAMES]
        clips.append(((fbank - AUDIO_MEAN) / AUDIO_STD).unsqueeze(0))
    return torch.stack(clips).numpy()


def video_frame_indices(n_frames: int, fps: float) -> np.ndarray:
    """Frame indices [5 clips, 2 frames]: the first and last frame inside each 2 s window."""
    duration = n_frames / fps
    out = np.zeros((VIDEO_CLIPS, FRAMES_PER_CLIP), dtype=np.int64)
    for c, (start, end) in enumerate(clip_windows(duration, VIDEO_CLIPS)):
        # pytorchvideo's decord `get_clip`: frames ceil(fps x start) .. ceil(fps x end) - 1, where a float
        # times a Fraction is a float
        first = min(math.ceil(fps * start), n_frames - 1)
        last = max(first, min(math.ceil(fps * end) - 1, n_frames - 1))
        out[c] = np.round(np.linspace(first, last, FRAMES_PER_CLIP)).astype(np.int64)
    return out


def short_side_resize(frames: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 frames [..., H, W, 3] -> short side `size` (bilinear, as ShortSideScale)."""
    lead, (h, w, c) = frames.shape[:-3], frames.shape[-3:]
    if min(h, w) == size:
        return frames
    # pytorchvideo's ShortSideScale arithmetic (w / h * size, floored): a square stays square.
    new_h, new_w = (size, int(np.floor(w / h * size))) if h <= w else (int(np.floor(h / w * size)), size)
    x = torch.from_numpy(np.ascontiguousarray(frames.reshape(-1, h, w, c))).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy().reshape(*lead, new_h, new_w, c)


def vision_inputs(frames: np.ndarray) -> torch.Tensor:
    """uint8 [clips, 2, H, W, 3] -> [clips * crops, 3, 2, 224, 224], CLIP-normalised.

    As the official recipe: to [0, 1], short side scaled to 224 in float (pytorchvideo ShortSideScale,
    bilinear), normalised, three spatial crops per clip (uniform_crop: the centre offset is
    ceil((w - 224) / 2)); when the frames are already square the three crops are the same pixels, so
    one is kept (their embeddings' mean is that embedding).
    """
    x = torch.from_numpy(np.ascontiguousarray(frames)).float().div_(255.0)  # S, T, H, W, C
    x = x.permute(0, 4, 1, 2, 3)  # S, C, T, H, W
    h, w = x.shape[-2:]
    if min(h, w) != IMAGE_SIZE:
        new_h, new_w = (IMAGE_SIZE, int(np.floor(w / h * IMAGE_SIZE))) if h <= w else (int(np.floor(h / w * IMAGE_SIZE)), IMAGE_SIZE)
        s, c, t = x.shape[:3]
        x = F.interpolate(x.permute(0, 2, 1, 3, 4).reshape(s * t, c, h, w), size=(new_h, new_w), mode="bilinear", align_corners=False)
        x = x.reshape(s, t, c, new_h, new_w).permute(0, 2, 1, 3, 4)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1, 1)
    x = (x - mean) / std
    h, w = x.shape[-2:]
    if h == w == IMAGE_SIZE:
        return x
    crops = []
    for index in range(SPATIAL_CROPS):  # pytorchvideo uniform_crop: 0 = left/top, 1 = centre, 2 = right/bottom
        if w >= h:
            x0 = {0: 0, 1: -(-(w - IMAGE_SIZE) // 2), 2: w - IMAGE_SIZE}[index]
            y0 = -(-(h - IMAGE_SIZE) // 2)
        else:
            y0 = {0: 0, 1: -(-(h - IMAGE_SIZE) // 2), 2: h - IMAGE_SIZE}[index]
            x0 = -(-(w - IMAGE_SIZE) // 2)
        crops.append(x[..., y0 : y0 + IMAGE_SIZE, x0 : x0 + IMAGE_SIZE])
    return torch.stack(crops, dim=1).flatten(0, 1)


# ---- the encoder (an actor in the job) ---------------------------------------------------------------
class ImageBindEncoder:
    """Holds the model; `encode_audio` / `encode_vision` take preprocessed batches.

    Outputs are what ImageBind's heads produce: vision unit vectors, audio unit vectors x 20.
    """

    def __init__(self, checkpoint: str | None = None, size: str | None = None, seed: int = 0, device: str | None = None,
                 dtype: str = "float32"):  # fmt: skip
        size = resolve_size(checkpoint, size)
        if dtype not in ENCODER_DTYPES:
            raise ValueError(f"unknown encoder dtype {dtype!r}: {', '.join(ENCODER_DTYPES)}")
        if size not in SIZES:
            raise ValueError(f"unknown ImageBind size {size!r}: {', '.join(SIZES)}")
        torch.manual_seed(seed)
        self.model = build_model(SIZES[size]).eval()
        self.embed_dim = SIZES[size].out_embed_dim
        self.name = f"imagebind-{size}"
        if checkpoint:
            load_checkpoint(self.model, checkpoint)
        else:
            log.warning("ImageBind (%s) has no checkpoint: seeded random weights (random-init:%d)", size, seed)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # weights are built and loaded in fp32 (the checkpoint's dtype), then cast: same seed, same values
        self.dtype = ENCODER_DTYPES[dtype]
        self.model.to(self.device, self.dtype)

    @torch.inference_mode()
    def encode_audio(self, features: np.ndarray) -> np.ndarray:
        """[B, 3, 1, 128, 204] -> [B, D]"""
        x = torch.as_tensor(features, dtype=torch.float32, device=self.device).to(self.dtype)
        return self.model({"audio": x})["audio"].float().cpu().numpy()

    @torch.inference_mode()
    def encode_vision(self, frames: np.ndarray) -> np.ndarray:
        """uint8 [B, clips, 2, H, W, 3] -> [B, D]"""
        x = torch.stack([vision_inputs(f) for f in frames]).to(self.device, self.dtype)
        return self.model({"vision": x})["vision"].float().cpu().numpy()
