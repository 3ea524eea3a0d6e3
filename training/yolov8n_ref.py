"""A YOLOv8n-equivalent graph (architecture only, random weights) for speed comparisons.

Rebuilt from the published YOLOv8n structure (depth 0.33, width 0.25, 80 classes, DFL
head with 16 bins), so its ONNX export has the same layers, shapes and cost as an
Ultralytics ``yolov8n.onnx`` without downloading anything. Nothing here is trained.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class Conv(nn.Sequential):
    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2), nn.SiLU(inplace=True)
        )


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool) -> None:
        super().__init__()
        self.cv1, self.cv2, self.add = Conv(c, c, 3), Conv(c, c, 3), shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    def __init__(self, c1: int, c2: int, n: int, shortcut: bool) -> None:
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1: int, c2: int) -> None:
        super().__init__()
        self.cv1, self.cv2 = Conv(c1, c1 // 2, 1), Conv(c1 // 2 * 4, c2, 1)
        self.m = nn.MaxPool2d(5, 1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat([x, y1, y2, self.m(y2)], 1))


class Detect(nn.Module):
    """YOLOv8 head: DFL box branch (16 bins) and class branch, decoded to [B, 4+nc, N]."""

    def __init__(self, nc: int, ch: tuple[int, ...], strides: tuple[int, ...] = (8, 16, 32)):
        super().__init__()
        self.nc, self.reg_max, self.strides = nc, 16, strides
        c2, c3 = max(16, ch[0] // 4, 64), max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 64, 1)) for x in ch
        )
        self.cv3 = nn.ModuleList(
            nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch
        )
        self.dfl = nn.Conv2d(16, 1, 1, bias=False)
        self.dfl.weight.data[:] = torch.arange(16, dtype=torch.float32).view(1, 16, 1, 1)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        boxes, scores = [], []
        for i, x in enumerate(xs):
            b, _, h, w = x.shape
            s = self.strides[i]
            box = self.cv2[i](x).view(b, 4, 16, h * w).transpose(2, 1).softmax(1)
            dist = self.dfl(box).view(b, 4, h * w)
            ys = torch.arange(h, dtype=x.dtype) + 0.5
            xs_ = torch.arange(w, dtype=x.dtype) + 0.5
            gy, gx = torch.meshgrid(ys, xs_, indexing="ij")
            anchor = torch.stack([gx.reshape(-1), gy.reshape(-1)], 0)[None]
            lt, rb = dist[:, :2], dist[:, 2:]
            x1y1, x2y2 = anchor - lt, anchor + rb
            boxes.append(torch.cat([(x1y1 + x2y2) / 2, x2y2 - x1y1], 1) * s)
            scores.append(self.cv3[i](x).view(b, self.nc, h * w).sigmoid())
        return torch.cat([torch.cat(boxes, 2), torch.cat(scores, 2)], 1)


class YOLOv8n(nn.Module):
    def __init__(self, nc: int = 80) -> None:
        super().__init__()
        self.b0 = nn.Sequential(Conv(3, 16, 3, 2), Conv(16, 32, 3, 2), C2f(32, 32, 1, True))
        self.b1 = nn.Sequential(Conv(32, 64, 3, 2), C2f(64, 64, 2, True))  # P3
        self.b2 = nn.Sequential(Conv(64, 128, 3, 2), C2f(128, 128, 2, True))  # P4
        self.b3 = nn.Sequential(Conv(128, 256, 3, 2), C2f(256, 256, 1, True), SPPF(256, 256))
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.h1 = C2f(384, 128, 1, False)
        self.h2 = C2f(192, 64, 1, False)
        self.d1, self.h3 = Conv(64, 64, 3, 2), C2f(192, 128, 1, False)
        self.d2, self.h4 = Conv(128, 128, 3, 2), C2f(384, 256, 1, False)
        self.detect = Detect(nc, (64, 128, 256))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.b1(self.b0(x))
        p4 = self.b2(p3)
        p5 = self.b3(p4)
        t4 = self.h1(torch.cat([self.up(p5), p4], 1))
        o3 = self.h2(torch.cat([self.up(t4), p3], 1))
        o4 = self.h3(torch.cat([self.d1(o3), t4], 1))
        o5 = self.h4(torch.cat([self.d2(o4), p5], 1))
        return self.detect([o3, o4, o5])


def export_reference(path: Path) -> Path:
    """Write the YOLOv8n-sized graph (dynamic batch and size, like the model) to ``path``."""
    from training.export import DETECTOR_AXES, torch_export

    with torch.no_grad():
        torch_export(
            YOLOv8n().eval(),
            torch.zeros(1, 3, 640, 640),
            path,
            inputs=["images"],
            outputs=["output0"],
            dynamic_axes=DETECTOR_AXES,
        )
    return path
