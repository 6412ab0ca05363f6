"""S3FD (Zhang et al., 2017), the face detector of TalkNet's demo, loadable from a local `sfd_face.pth`.

Plain PyTorch with the checkpoint's layout (`vgg.N.*`, `L2Norm3_3.weight`, `L2Norm4_3.weight`,
`L2Norm5_3.weight`, `extras.N.*`, `loc.N.*`, `conf.N.*`): a VGG-16 trunk with L2-normalised taps at
conv3_3/4_3/5_3, fc6/fc7 as convolutions, two extra stages, and per-level box and score heads with
one square anchor per cell (sizes 16..512 at strides 4..128). The first level uses the "max-out
background" trick (3 background scores, the largest kept).

It needs real weights: merg never detects with a random S3FD (the stage uses Haar cascades unless
a checkpoint is given). Post-processing is the demo's (`suppress`: threshold 0.9, NMS 0.3, NMS 0.1);
`detect_batch` runs a batch of frames through one forward.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipelines.checkpoints import load_strict

STEPS = (4, 8, 16, 32, 64, 128)
ANCHORS = (16, 32, 64, 128, 256, 512)
VARIANCE = (0.1, 0.2)
MEAN_RGB = (123.0, 117.0, 104.0)  # the demo subtracts the BGR means (104, 117, 123) per channel
_VGG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512, "M")


class L2Norm(nn.Module):
    def __init__(self, channels: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight[None, :, None, None] * x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)


class S3FD(nn.Module):
    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in _VGG:
            if item in ("M", "C"):
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=item == "C"))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=True)]
                channels = item
        layers += [nn.Conv2d(512, 1024, 3, padding=6, dilation=6), nn.ReLU(inplace=True), nn.Conv2d(1024, 1024, 1), nn.ReLU(inplace=True)]
        self.vgg = nn.ModuleList(layers)  # taps after index 15 (conv3_3), 22 (conv4_3), 29 (conv5_3)
        self.L2Norm3_3, self.L2Norm4_3, self.L2Norm5_3 = L2Norm(256, 10), L2Norm(512, 8), L2Norm(512, 5)
        self.extras = nn.ModuleList([
            nn.Conv2d(1024, 256, 1), nn.Conv2d(256, 512, 3, 2, padding=1), nn.Conv2d(512, 128, 1), nn.Conv2d(128, 256, 3, 2, padding=1),
        ])  # fmt: skip
        widths = (256, 512, 512, 1024, 512, 256)
        self.loc = nn.ModuleList(nn.Conv2d(w, 4, 3, padding=1) for w in widths)
        self.conf = nn.ModuleList(nn.Conv2d(w, 4 if i == 0 else 2, 3, padding=1) for i, w in enumerate(widths))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """[B, 3, H, W] mean-subtracted RGB -> (box offsets [B, A, 4], face probability [B, A], level sizes)."""
        sources = []
        taps = {15: self.L2Norm3_3, 22: self.L2Norm4_3, 29: self.L2Norm5_3}
        for index, layer in enumerate(self.vgg):
            x = layer(x)
            if index in taps:
                sources.append(taps[index](x))
        sources.append(x)
        for index, layer in enumerate(self.extras):
            x = F.relu(layer(x))
            if index % 2:
                sources.append(x)
        locs, confs, sizes = [], [], []
        for level, source in enumerate(sources):
            conf = self.conf[level](source)
            if level == 0:  # max-out background: three background channels, keep the largest
                conf = torch.cat([conf[:, :3].max(dim=1, keepdim=True).values, conf[:, 3:]], dim=1)
            sizes.append(tuple(source.shape[-2:]))
            locs.append(self.loc[level](source).permute(0, 2, 3, 1).reshape(x.shape[0], -1, 4))
            confs.append(conf.permute(0, 2, 3, 1).reshape(x.shape[0], -1, 2))
        return torch.cat(locs, 1), torch.cat(confs, 1).softmax(-1)[..., 1], sizes


def priors(image_hw: tuple[int, int], sizes: list[tuple[int, int]]) -> torch.Tensor:
    """One square anchor per cell and level, (cx, cy, w, h) relative to the image: [A, 4]."""
    height, width = image_hw
    out = []
    for (rows, cols), step, anchor in zip(sizes, STEPS, ANCHORS):
        ys, xs = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        cx, cy = (xs.flatten() + 0.5) * step / width, (ys.flatten() + 0.5) * step / height
        out.append(torch.stack([cx, cy, torch.full_like(cx, anchor / width), torch.full_like(cy, anchor / height)], 1))
    return torch.cat(out)


def decode(loc: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """SSD box decoding -> (x0, y0, x1, y1) relative to the image."""
    centre = anchors[:, :2] + loc[:, :2] * VARIANCE[0] * anchors[:, 2:]
    size = anchors[:, 2:] * torch.exp(loc[:, 2:] * VARIANCE[1])
    return torch.cat([centre - size / 2, centre + size / 2], 1)


DEMO_SCALE = 0.25  # the demo's --facedetScale: S3FD sees the full frame at a quarter of its size
DEMO_THRESHOLD = 0.9  # detect_faces(conf_th=0.9)
NMS_IOU, DEMO_NMS_IOU = 0.3, 0.1  # the detector's own NMS, then detect_faces' second one


def suppress(boxes: torch.Tensor, scores: torch.Tensor, threshold: float = DEMO_THRESHOLD) -> np.ndarray:
    """The demo's post-processing of decoded boxes: scores above `threshold`, NMS at IoU 0.3 (the
    detector's `Detect`), then a second NMS at IoU 0.1 over the kept boxes (`S3FD.detect_faces`).

    Thresholding first keeps the same boxes as the detector's NMS over scores > 0.05 followed by the
    threshold: a box above it can only be suppressed by a higher-scoring one, also above it.
    """
    from torchvision.ops import nms

    keep = scores > threshold
    boxes, scores = boxes[keep], scores[keep]
    first = nms(boxes, scores, NMS_IOU)
    boxes, scores = boxes[first], scores[first]
    return boxes[nms(boxes, scores, DEMO_NMS_IOU)].numpy()


def preprocess(frame_rgb: np.ndarray, scale: float) -> torch.Tensor:
    """One RGB frame -> the detector's input [3, h, w]: resized by `scale` (bilinear), BGR means removed."""
    import cv2

    image = frame_rgb if scale == 1.0 else cv2.resize(frame_rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    return torch.from_numpy(image.astype(np.float32) - np.array(MEAN_RGB, np.float32)).permute(2, 0, 1)


@torch.inference_mode()
def detect_batch(model: S3FD, frames_rgb: np.ndarray, threshold: float = DEMO_THRESHOLD, scale: float = DEMO_SCALE) -> list[np.ndarray]:
    """Face boxes (x0, y0, x1, y1) in the frames' pixels, for a batch of same-sized RGB frames: one
    forward for all of them, each frame's boxes post-processed as the demo does."""
    height, width = frames_rgb.shape[1:3]
    x = torch.stack([preprocess(frame, scale) for frame in frames_rgb]).to(next(model.parameters()).device)
    if x.device.type == "cpu":  # oneDNN's channels-last convolutions: ~1.2x faster on CPU, scores equal to ~1e-6
        x = x.contiguous(memory_format=torch.channels_last)
    loc, score, sizes = model(x)
    anchors = priors(tuple(x.shape[-2:]), sizes)
    to_pixels = torch.tensor([width, height, width, height])
    return [suppress(decode(loc[i].float().cpu(), anchors) * to_pixels, score[i].float().cpu(), threshold) for i in range(len(x))]


def detect(model: S3FD, frame_rgb: np.ndarray, threshold: float = DEMO_THRESHOLD, scale: float = DEMO_SCALE) -> np.ndarray:
    """Face boxes (x0, y0, x1, y1) in `frame_rgb`'s pixels, as the TalkNet demo runs S3FD (0.25 scale)."""
    return detect_batch(model, frame_rgb[None], threshold, scale)[0]


def load_s3fd(path: Path | str) -> S3FD:
    """S3FD with a user's `sfd_face.pth`, loaded strictly (keys and shapes)."""
    model = S3FD()
    load_strict(model, path, "S3FD")
    return model.eval()
