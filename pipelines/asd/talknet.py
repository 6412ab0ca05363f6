"""TalkNet (Tao et al., 2021): audio-visual active speaker detection, in plain PyTorch.

Written for merg so that the official checkpoint `pretrain_TalkSet.model` loads strictly: module
names, parameter names and shapes follow the official layout (`model.visualFrontend.*`,
`model.visualTCN.*`, `model.visualConv1D.*`, `model.audioEncoder.*`, `model.crossA2V.*`,
`model.crossV2A.*`, `model.selfAV.*`, `lossAV.FC.*`, `lossA.FC.*`, `lossV.FC.*`).

    visual: 112x112 grey mouth-centred face crops at 25 fps -> 3D conv + ResNet-18 -> 5 depthwise
            temporal conv blocks -> 128-d per frame
    audio:  13 MFCC at 100 frames/s (4 per video frame) -> SE-ResNet -> 128-d per video frame
    cross attention both ways, joint self attention over the 256-d concatenation, a linear head:
    a speaking score per frame (the logit of "speaking", > 0 means speaking).

One deliberate difference: the official visual front end runs its temporal 3D convolution over the
whole batch as one sequence, so frames of neighbouring samples leak into each other at the edges;
here each sample is its own sequence (identical for batch size 1, which is how the demo scores).
Scoring a track over many windows shares the visual front end between them (`window_visual_features`,
then `forward_from_visual` per window): its per-frame output sees only 2 frames each side.
Without a checkpoint the model is random and its scores mean nothing: merg then uses `sync`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipelines.checkpoints import CheckpointMismatch, load_strict  # noqa: F401 - CheckpointMismatch is part of this door

GREY_MEAN, GREY_STD = 0.4161, 0.1688  # the visual front end's input normalisation
CROP = 112
MFCC_PER_FRAME = 4  # 100 MFCC frames/s against 25 video frames/s


def normalise_grey(video: torch.Tensor) -> torch.Tensor:
    """Grey uint8-range crops -> the visual front end's input."""
    return (video / 255 - GREY_MEAN) / GREY_STD


# ---- visual front end: 3D conv + ResNet-18 -----------------------------------------------------------
class ResNetLayer(nn.Module):
    """Two residual units; the first may downsample (its 1x1 `downsample` conv exists either way)."""

    def __init__(self, inplanes: int, outplanes: int, stride: int):
        super().__init__()
        bn = dict(momentum=0.01, eps=0.001)
        self.stride = stride
        self.conv1a = nn.Conv2d(inplanes, outplanes, 3, stride=stride, padding=1, bias=False)
        self.bn1a = nn.BatchNorm2d(outplanes, **bn)
        self.conv2a = nn.Conv2d(outplanes, outplanes, 3, padding=1, bias=False)
        self.downsample = nn.Conv2d(inplanes, outplanes, 1, stride=stride, bias=False)
        self.outbna = nn.BatchNorm2d(outplanes, **bn)
        self.conv1b = nn.Conv2d(outplanes, outplanes, 3, padding=1, bias=False)
        self.bn1b = nn.BatchNorm2d(outplanes, **bn)
        self.conv2b = nn.Conv2d(outplanes, outplanes, 3, padding=1, bias=False)
        self.outbnb = nn.BatchNorm2d(outplanes, **bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = self.conv2a(F.relu(self.bn1a(self.conv1a(x)))) + (x if self.stride == 1 else self.downsample(x))
        second = self.conv2b(F.relu(self.bn1b(self.conv1b(F.relu(self.outbna(first)))))) + first
        return F.relu(self.outbnb(second))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = ResNetLayer(64, 64, 1)
        self.layer2 = ResNetLayer(64, 128, 2)
        self.layer3 = ResNetLayer(128, 256, 2)
        self.layer4 = ResNetLayer(256, 512, 2)
        self.avgpool = nn.AvgPool2d(4, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.avgpool(self.layer4(self.layer3(self.layer2(self.layer1(x)))))


class VisualFrontend(nn.Module):
    """[B, T, 112, 112] normalised grey crops -> [B, T, 512]."""

    REACH = 2  # frames each side that a frame's features see: the 3D conv's temporal kernel is 5

    def __init__(self):
        super().__init__()
        self.frontend3D = nn.Sequential(
            nn.Conv3d(1, 64, (5, 7, 7), stride=(1, 2, 2), padding=(2, 3, 3), bias=False),
            nn.BatchNorm3d(64, momentum=0.01, eps=0.001),
            nn.ReLU(),
            nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        )
        self.resnet = ResNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        x = self.frontend3D(x.unsqueeze(1))  # [B, 64, T, 28, 28]
        x = x.transpose(1, 2).reshape(b * t, 64, *x.shape[-2:])
        return self.resnet(x).reshape(b, t, 512)

    def window_features(self, x: torch.Tensor, windows: list[tuple[int, int]], batch: int | None = None) -> list[torch.Tensor]:
        """x [T, 112, 112] normalised, (start, end) windows -> per window [end - start, 512], equal to
        `forward(x[None, start:end])[0]` to float tolerance, with the per-frame work shared: the front end
        runs once over the whole sequence; only frames that a window's edge inside the sequence cuts off
        from their neighbours (within REACH of it: they see zeros there) are computed again, each distinct
        one once. `batch`: frames per ResNet forward (None: all at once)."""
        n = len(x)
        cut = [self._cut_frames(start, end, n) for start, end in windows]
        rows = {seen: n + row for row, seen in enumerate(dict.fromkeys(seen for frames in cut for seen in frames))}
        stems = self.frontend3D(x[None, None])[0].transpose(0, 1)  # [T, 64, 28, 28], the whole sequence
        if rows:
            clips = x.new_zeros(len(rows), 2 * self.REACH + 1, *x.shape[1:])
            for (t, lo, hi), row in rows.items():
                clips[row - n, lo - t + self.REACH : hi - t + self.REACH] = x[lo:hi]
            stems = torch.cat([stems, self._centre_stems(clips)])
        batch = batch or len(stems)
        features = torch.cat([self.resnet(stems[i : i + batch]) for i in range(0, len(stems), batch)]).flatten(1)
        out = []
        for (start, end), frames in zip(windows, cut):
            window = features[start:end].clone()
            for seen in frames:
                window[seen[0] - start] = features[rows[seen]]
            out.append(window)
        return out

    def _centre_stems(self, clips: torch.Tensor) -> torch.Tensor:
        """[K, 5, 112, 112] neighbourhoods (frames t-2..t+2 as a window shows them, zeros beyond its edges)
        -> frontend3D's output for frame t, [K, 64, 28, 28]: the 3D conv without temporal padding."""
        conv = self.frontend3D[0]
        x = F.conv3d(clips.unsqueeze(1), conv.weight, stride=conv.stride, padding=(0, *conv.padding[1:]))
        return self.frontend3D[1:](x)[:, :, 0]

    def _cut_frames(self, start: int, end: int, n: int) -> list[tuple[int, int, int]]:
        """(frame, first frame it sees, last + 1) for the frames of window [start, end) of a sequence of n
        frames that see less of it than of the whole sequence."""
        def sees(t: int, first: int, stop: int) -> tuple[int, int, int]:
            return t, max(t - self.REACH, first), min(t + self.REACH + 1, stop)

        near_edges = sorted({*range(start, min(start + self.REACH, end)), *range(max(end - self.REACH, start), end)})
        return [sees(t, start, end) for t in near_edges if sees(t, start, end) != sees(t, 0, n)]


class GlobalLayerNorm(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(1, channels, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(1, 2), keepdim=True)
        var = (x - mean).pow(2).mean(dim=(1, 2), keepdim=True)
        return self.gamma * (x - mean) / torch.sqrt(var + 1e-8) + self.beta


class DSConv1d(nn.Module):
    """Depthwise-separable temporal conv block with a residual connection."""

    def __init__(self, channels: int = 512):
        super().__init__()
        self.net = nn.Sequential(
            nn.ReLU(),
            nn.BatchNorm1d(channels),
            nn.Conv1d(channels, channels, 3, padding=1, groups=channels, bias=False),
            nn.PReLU(),
            GlobalLayerNorm(channels),
            nn.Conv1d(channels, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + x


class VisualTCN(nn.Module):
    def __init__(self, blocks: int = 5):
        super().__init__()
        self.net = nn.Sequential(*(DSConv1d() for _ in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VisualConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(512, 256, 5, padding=2), nn.BatchNorm1d(256), nn.ReLU(), nn.Conv1d(256, 128, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ---- audio encoder: SE-ResNet over MFCC ----------------------------------------------------------------
class SELayer(nn.Module):
    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(
            nn.Linear(channels, channels // reduction), nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels), nn.Sigmoid(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(self.avg_pool(x).flatten(1))[:, :, None, None]


class SEBasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride=1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.se = SELayer(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.relu(self.conv1(x)))  # ReLU before BN, as the official block does
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class AudioEncoder(nn.Module):
    """[B, 1, 13, 4T] MFCC -> [B, T, 128]."""

    def __init__(self, layers=(3, 4, 6, 3), filters=(16, 32, 64, 128)):
        super().__init__()
        self.conv1 = nn.Conv2d(1, filters[0], 7, stride=(2, 1), padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = filters[0]
        self.layer1 = self._make_layer(filters[0], layers[0], 1)
        self.layer2 = self._make_layer(filters[1], layers[1], (2, 2))
        self.layer3 = self._make_layer(filters[2], layers[2], (2, 2))
        self.layer4 = self._make_layer(filters[3], layers[3], (1, 1))

    def _make_layer(self, planes: int, blocks: int, stride) -> nn.Sequential:
        downsample = None
        if stride not in (1, (1, 1)) or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
        units = [SEBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        units += [SEBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=2).transpose(1, 2)  # average over frequency


# ---- attention and the model ---------------------------------------------------------------------------
class AttentionLayer(nn.Module):
    """`src` attends to `tar` (cross attention), or to itself (self attention), then a feed-forward."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, d_model * 4)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_model * 4, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, src: torch.Tensor, tar: torch.Tensor) -> torch.Tensor:
        src, tar = src.transpose(0, 1), tar.transpose(0, 1)  # [T, B, C]
        src = self.norm1(src + self.dropout1(self.self_attn(tar, src, src)[0]))
        src = self.norm2(src + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(src))))))
        return src.transpose(0, 1)


class TalkNetModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.visualFrontend = VisualFrontend()
        self.visualTCN = VisualTCN()
        self.visualConv1D = VisualConv1D()
        self.audioEncoder = AudioEncoder()
        self.crossA2V = AttentionLayer(128, 8)
        self.crossV2A = AttentionLayer(128, 8)
        self.selfAV = AttentionLayer(256, 8)

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """audio [B, 4T, 13] MFCC, video [B, T, 112, 112] grey uint8-range -> [B, T, 256]."""
        return self.forward_from_visual(audio, self.visualFrontend(normalise_grey(video)))

    def forward_from_visual(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """`forward` after the visual front end: audio [B, 4T, 13], its features [B, T, 512] -> [B, T, 256]."""
        v = self.visualConv1D(self.visualTCN(visual.transpose(1, 2))).transpose(1, 2)  # [B, T, 128]
        a = self.audioEncoder(audio.unsqueeze(1).transpose(2, 3))  # [B, T, 128]
        a, v = self.crossA2V(src=a, tar=v), self.crossV2A(src=v, tar=a)
        joint = torch.cat((a, v), dim=2)
        return self.selfAV(src=joint, tar=joint)


class Head(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.FC = nn.Linear(width, 2)


class TalkNet(nn.Module):
    """The checkpoint's top level: the model plus the audio-visual, audio and visual heads."""

    def __init__(self):
        super().__init__()
        self.model = TalkNetModel()
        self.lossAV = Head(256)
        self.lossA = Head(128)
        self.lossV = Head(128)

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """Speaking logit per frame, [B, T] (> 0: speaking), as the official demo scores."""
        return self.lossAV.FC(self.model(audio, video))[..., 1]

    def forward_from_visual(self, audio: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """`forward` from the visual front end's features [B, T, 512] (`window_visual_features`)."""
        return self.lossAV.FC(self.model.forward_from_visual(audio, visual))[..., 1]

    def window_visual_features(self, video: torch.Tensor, windows: list[tuple[int, int]], batch: int | None = None) -> list[torch.Tensor]:
        """video [T, 112, 112] grey uint8-range, (start, end) windows -> the front end's features of each
        window scored on its own, [end - start, 512], the per-frame work shared (`VisualFrontend.window_features`)."""
        return self.model.visualFrontend.window_features(normalise_grey(video), windows, batch)


def load_talknet(path: Path | str) -> TalkNet:
    """Build TalkNet and load `pretrain_TalkSet.model` strictly (a leading `module.` is stripped)."""
    model = TalkNet()
    load_strict(model, path, "TalkNet")
    return model.eval()


def talknet_inputs(gray_faces: np.ndarray, mfcc: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey face crops [T, 224, 224] (uint8) and MFCC [>= 4T, 13] -> the model's [1, ...] inputs.

    The centre 112x112 of each 224 crop, as the official demo feeds it; audio cut to 4 frames per
    video frame.
    """
    t = min(len(gray_faces), len(mfcc) // MFCC_PER_FRAME)
    lo, hi = 112 - CROP // 2, 112 + CROP // 2
    video = torch.as_tensor(gray_faces[:t, lo:hi, lo:hi], dtype=torch.float32)[None]
    audio = torch.as_tensor(mfcc[: t * MFCC_PER_FRAME], dtype=torch.float32)[None]
    return audio, video


def as_int16_pcm(audio: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1] -> int16 as FFmpeg writes `pcm_s16le` (x * 32768, rounded, clipped).

    The demo reads its 16 kHz wav with `scipy.io.wavfile`, so TalkNet was trained on int16-scale samples.
    """
    if audio.dtype == np.int16:
        return audio
    return np.clip(np.rint(np.asarray(audio, np.float64) * 32768.0), -32768, 32767).astype(np.int16)


def mfcc_100fps(audio_16k: np.ndarray) -> np.ndarray:
    """13 MFCC at 100 frames/s (25 ms window, 10 ms step) of int16-scale samples, as TalkNet was trained:
    [frames, 13]. Float input in [-1, 1] is scaled first (c0 would otherwise be off by 2 ln 32768)."""
    from python_speech_features import mfcc

    return mfcc(as_int16_pcm(audio_16k), 16_000, numcep=13, winlen=0.025, winstep=0.010).astype(np.float32)


# ---- the official demo's face crop and lengths (demoTalkNet.py crop_video / evaluate_network) ----------
CROP_SCALE = 0.40  # the demo's --cropScale
SMOOTH_KERNEL = 13


def demo_crop_track(boxes: np.ndarray) -> np.ndarray:
    """A track's per-frame (x, y, s): box centre and half of its longer side, each median-filtered over 13
    frames with zero padding at the ends (`scipy.signal.medfilt`), as the demo's `crop_video` smooths."""
    from scipy.signal import medfilt

    boxes = np.asarray(boxes, np.float64)
    s = np.maximum(boxes[:, 3] - boxes[:, 1], boxes[:, 2] - boxes[:, 0]) / 2
    y, x = (boxes[:, 1] + boxes[:, 3]) / 2, (boxes[:, 0] + boxes[:, 2]) / 2
    return np.stack([medfilt(v, kernel_size=SMOOTH_KERNEL) for v in (x, y, s)], axis=1)


def demo_face_crop(frame: np.ndarray, x: float, y: float, s: float, crop_scale: float = CROP_SCALE) -> np.ndarray:
    """The demo's 224x224 face crop: the frame padded by int(s(1 + 2 cs)) with grey 110, rows
    [y - s, y + s(1 + 2 cs)] and columns [x - s(1 + cs), x + s(1 + cs)], resized (bilinear) to 224.

    The window sits low on the face (mouth towards the centre): its centre 112x112 is what TalkNet sees.
    """
    import cv2

    pad = int(s * (1 + 2 * crop_scale))
    padded = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), "constant", constant_values=110)
    my, mx = y + pad, x + pad
    face = padded[int(my - s) : int(my + s * (1 + 2 * crop_scale)), int(mx - s * (1 + crop_scale)) : int(mx + s * (1 + crop_scale))]
    return cv2.resize(face, (224, 224))


def demo_grey_centre(face_224_rgb: np.ndarray) -> np.ndarray:
    """What `evaluate_network` takes from a 224 crop: grey, then the centre 112x112 (uint8)."""
    import cv2

    lo, hi = 112 - CROP // 2, 112 + CROP // 2
    return cv2.cvtColor(face_224_rgb, cv2.COLOR_RGB2GRAY)[lo:hi, lo:hi]


def demo_length(n_mfcc: int, n_video: int) -> tuple[int, int]:
    """(MFCC frames, video frames) the demo scores: the shorter of audio (cut to a multiple of 4 MFCC
    frames) and video, in seconds; a track's own audio gives 4n - 1 MFCC frames for n video frames, so
    its last video frame is not scored."""
    length = min((n_mfcc - n_mfcc % 4) / 100, n_video / 25)
    return int(round(length * 100)), int(round(length * 25))
