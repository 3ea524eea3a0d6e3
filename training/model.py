"""A compact anchor-free single-class detector (qrsight's QR model).

Backbone: a stem conv then depthwise-separable inverted-residual-free blocks (depthwise
kxk + pointwise) down to stride 32, an SPPF for a large receptive field, a top-down
feature pyramid at strides 8/16/32 and a decoupled head per level (box: ``l, t, r, b``
distances in strides through softplus; class: one logit). ``forward`` returns the
decoded boxes and logits; :class:`ExportWrapper` turns them into the YOLOv8 export
layout ``[B, 4 + nc, N]`` (``cx, cy, w, h`` in input pixels, then sigmoid scores).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

STRIDES = (8, 16, 32)


@dataclass(frozen=True)
class ModelConfig:
    """Widths of the network; ``tiny`` is the CI smoke model."""

    stem: int = 16
    c2: int = 32
    c3: int = 64
    c4: int = 96
    c5: int = 160
    neck: int = 64
    depth: tuple[int, int, int] = (1, 2, 2)
    context: bool = False  # dilated context blocks on P4 and P3 (see QRDet.grow)

    @classmethod
    def tiny(cls) -> ModelConfig:
        return cls(stem=8, c2=8, c3=16, c4=16, c5=24, neck=16, depth=(1, 1, 1))


class ConvBN(nn.Sequential):
    def __init__(
        self,
        c_in: int,
        c_out: int,
        k: int = 1,
        s: int = 1,
        *,
        groups: int = 1,
        pad: int = -1,
        dilation: int = 1,
    ) -> None:
        pad = dilation * (k // 2) if pad < 0 else pad
        super().__init__(
            nn.Conv2d(c_in, c_out, k, s, pad, dilation=dilation, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class DWSep(nn.Sequential):
    """Depthwise kxk (stride s) then pointwise 1x1."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, s: int = 1) -> None:
        super().__init__(ConvBN(c_in, c_in, k, s, groups=c_in), ConvBN(c_in, c_out, 1))


class Block(nn.Module):
    """Residual depthwise-separable block."""

    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.body = DWSep(c, c, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ContextBlock(nn.Module):
    """Residual dilated depthwise 5x5 (dilation 2: a 9x9-cell window) then pointwise.

    The pointwise BatchNorm starts at scale ``init_scale`` (0.1): a block added to a
    trained network perturbs its features a little, and every weight of the block gets
    gradients from the first step (at scale 0 only that scale would, and in a 1,200-step
    fine-tune it stayed near 0 — the blocks learned nothing).
    """

    def __init__(self, c: int, dilation: int = 2, init_scale: float = 0.1) -> None:
        super().__init__()
        self.body = DWSep(c, c, 5)
        self.body[0] = ConvBN(c, c, 5, groups=c, dilation=dilation)
        nn.init.constant_(self.body[1][1].weight, init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class SPPF(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.reduce = ConvBN(c, c // 2, 1)
        self.pool = nn.MaxPool2d(5, 1, 2)
        self.fuse = ConvBN(c * 2, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.fuse(torch.cat([x, y1, y2, self.pool(y2)], 1))


def _stage(c_in: int, c_out: int, depth: int, k: int) -> nn.Sequential:
    return nn.Sequential(DWSep(c_in, c_out, 3, 2), *[Block(c_out, k) for _ in range(depth)])


class Head(nn.Module):
    """Decoupled head of one level: box (4 logits) and class (nc logits)."""

    def __init__(self, c: int, nc: int) -> None:
        super().__init__()
        self.box = nn.Sequential(DWSep(c, c, 5), nn.Conv2d(c, 4, 1))
        self.cls = nn.Sequential(DWSep(c, c, 5), nn.Conv2d(c, nc, 1))
        nn.init.constant_(self.cls[-1].bias, -4.6)  # prior 0.01
        nn.init.constant_(self.box[-1].bias, 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.box(x), self.cls(x)


class QRDet(nn.Module):
    """Returns ``(boxes_xyxy [B, N, 4], logits [B, N, nc])`` in input pixels."""

    def __init__(self, cfg: ModelConfig | None = None, nc: int = 1) -> None:
        super().__init__()
        cfg = cfg or ModelConfig()
        self.cfg = cfg
        self.nc = nc
        # patchify stem (4x4, stride 4): cheap on CPU where full-resolution maps dominate
        self.stem = nn.Sequential(ConvBN(3, cfg.c2, 4, 4, pad=0), Block(cfg.c2, 3))
        self.s8 = _stage(cfg.c2, cfg.c3, cfg.depth[0], 3)
        self.s16 = _stage(cfg.c3, cfg.c4, cfg.depth[1], 5)
        self.s32 = nn.Sequential(_stage(cfg.c4, cfg.c5, cfg.depth[2], 5), SPPF(cfg.c5))
        n = cfg.neck
        self.lat5 = ConvBN(cfg.c5, n, 1)
        self.lat4 = ConvBN(cfg.c4, n, 1)
        self.lat3 = ConvBN(cfg.c3, n, 1)
        self.smooth4 = DWSep(n, n, 5)
        self.smooth3 = DWSep(n, n, 5)
        self.heads = nn.ModuleList([Head(n, nc) for _ in STRIDES])
        if cfg.context:
            self.ctx4, self.ctx3 = ContextBlock(n), ContextBlock(n)

    def grow(self) -> list[nn.Parameter]:
        """Add the context blocks to a trained base model; returns their new parameters.

        They widen what each P4/P3 cell sees (9x9 cells: 144 px at stride 16, 72 px at
        stride 8) so a point can take in all three finder patterns of its code.
        """
        if self.cfg.context:
            return []
        self.cfg = replace(self.cfg, context=True)
        n = self.cfg.neck
        self.ctx4, self.ctx3 = ContextBlock(n), ContextBlock(n)
        device = next(self.heads.parameters()).device
        for block in (self.ctx4, self.ctx3):
            block.to(device=device, memory_format=torch.channels_last).train(self.training)
        return [*self.ctx4.parameters(), *self.ctx3.parameters()]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.s8(self.stem(x))
        c4 = self.s16(c3)
        c5 = self.s32(c4)
        p5 = self.lat5(c5)
        p4 = self.smooth4(self.lat4(c4) + F.interpolate(p5, scale_factor=2.0, mode="nearest"))
        if self.cfg.context:
            p4 = self.ctx4(p4)
        p3 = self.smooth3(self.lat3(c3) + F.interpolate(p4, scale_factor=2.0, mode="nearest"))
        if self.cfg.context:
            p3 = self.ctx3(p3)
        return [p3, p4, p5]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        boxes, logits = [], []
        for feat, head, stride in zip(self.features(x), self.heads, STRIDES, strict=True):
            reg, cls = head(feat)
            b, _, h, w = reg.shape
            ys = (torch.arange(h, dtype=x.dtype, device=x.device) + 0.5) * stride
            xs = (torch.arange(w, dtype=x.dtype, device=x.device) + 0.5) * stride
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            ltrb = F.softplus(reg) * stride  # [B, 4, H, W]
            x1 = cx - ltrb[:, 0]
            y1 = cy - ltrb[:, 1]
            x2 = cx + ltrb[:, 2]
            y2 = cy + ltrb[:, 3]
            boxes.append(torch.stack([x1, y1, x2, y2], -1).reshape(b, h * w, 4))
            logits.append(cls.permute(0, 2, 3, 1).reshape(b, h * w, self.nc))
        return torch.cat(boxes, 1), torch.cat(logits, 1)


def anchor_points(imgsz: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres ``[N, 2]`` and strides ``[N]`` in the order ``QRDet`` emits them."""
    pts, strides = [], []
    for s in STRIDES:
        n = imgsz // s
        c = (torch.arange(n, dtype=torch.float32) + 0.5) * s
        cy, cx = torch.meshgrid(c, c, indexing="ij")
        pts.append(torch.stack([cx, cy], -1).reshape(-1, 2))
        strides.append(torch.full((n * n,), float(s)))
    return torch.cat(pts), torch.cat(strides)


class ExportWrapper(nn.Module):
    """``images [B,3,H,W]`` (RGB, 0..1) → ``output0 [B, 4 + nc, N]`` (YOLOv8 layout)."""

    def __init__(self, model: QRDet, score_bias: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.score_bias = score_bias  # added to the logits: moves the operating point

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        boxes, logits = self.model(images)
        xy = (boxes[..., :2] + boxes[..., 2:]) / 2
        wh = boxes[..., 2:] - boxes[..., :2]
        scores = (logits + self.score_bias).sigmoid()
        return torch.cat([xy, wh, scores], -1).permute(0, 2, 1)


def fuse_bn(model: nn.Module) -> nn.Module:
    """Fold every Conv2d → BatchNorm2d pair into the conv (in place, eval only)."""
    for module in model.modules():
        if isinstance(module, ConvBN):
            conv, bn = module[0], module[1]
            w = conv.weight
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            fused = nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                conv.stride,
                conv.padding,
                dilation=conv.dilation,
                groups=conv.groups,
                bias=True,
            )
            fused.weight.data = w.data * scale.reshape(-1, 1, 1, 1)
            fused.bias.data = bn.bias.data - bn.running_mean * scale
            module[0] = fused
            module[1] = nn.Identity()
    return model


def count_macs(model: nn.Module, imgsz: int = 640) -> int:
    """Multiply-accumulates of one ``imgsz``² image over conv and linear layers."""
    total = 0

    def hook(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
            total += int(out.numel() // out.shape[0]) * k
        elif isinstance(mod, nn.Linear):
            total += int(out.numel() // out.shape[0]) * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, imgsz, imgsz))
    model.train(was_training)
    for h in handles:
        h.remove()
    return total


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
