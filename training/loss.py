"""Assignment and loss: FCOS-style centre sampling + quality focal loss + GIoU.

A point is positive for a box when it lies inside the box, within ``radius`` strides of
its centre, and the box's largest ``l, t, r, b`` distance from it falls in the level's
range (small codes to stride 8, large ones to stride 32; overlapping ranges). A point
claimed by several boxes takes the smallest. A box no level claims gets its nearest
stride-8 point. The class target of a positive is the IoU of its predicted box with the truth
(so scores rank by localisation quality and NMS keeps the best box); negatives target 0.
Negative points on a *hard* region (a symbol that is not a QR code, a lattice background)
and outside every code can weigh ``hard_weight`` times as much in the class loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

LEVEL_RANGES = {8.0: (0.0, 64.0), 16.0: (32.0, 128.0), 32.0: (96.0, 1e8)}


def box_iou_giou(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and GIoU of matching rows of two ``[K, 4]`` xyxy tensors."""
    lt = torch.maximum(pred[:, :2], gt[:, :2])
    rb = torch.minimum(pred[:, 2:], gt[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area_p = (pred[:, 2:] - pred[:, :2]).clamp(min=0).prod(1)
    area_g = (gt[:, 2:] - gt[:, :2]).clamp(min=0).prod(1)
    union = area_p + area_g - inter + 1e-7
    iou = inter / union
    elt = torch.minimum(pred[:, :2], gt[:, :2])
    erb = torch.maximum(pred[:, 2:], gt[:, 2:])
    enclose = (erb - elt).clamp(min=0).prod(1) + 1e-7
    return iou, iou - (enclose - union) / enclose


def assign(
    points: torch.Tensor, strides: torch.Tensor, gt: torch.Tensor, radius: float = 2.5
) -> torch.Tensor:
    """Index of the assigned box per point (``-1`` = background), shape ``[N]``."""
    n = points.shape[0]
    if gt.numel() == 0:
        return torch.full((n,), -1, dtype=torch.long)
    px, py = points[:, 0][None], points[:, 1][None]  # [1, N]
    x1, y1, x2, y2 = (gt[:, i : i + 1] for i in range(4))  # [G, 1]
    ltrb = torch.stack([px - x1, py - y1, x2 - px, y2 - py], -1)  # [G, N, 4]
    inside = ltrb.min(-1).values > 0
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    r = radius * strides[None]
    central = ((px - cx).abs() < r) & ((py - cy).abs() < r)
    m = ltrb.max(-1).values
    lo = torch.zeros_like(strides)
    hi = torch.zeros_like(strides)
    for s, (a, b) in LEVEL_RANGES.items():
        lo[strides == s] = a
        hi[strides == s] = b
    in_range = (m >= lo[None]) & (m <= hi[None])
    pos = inside & central & in_range  # [G, N]
    # a box no level claims (tiny, or between ranges) gets its nearest stride-8 point
    d = (px - cx) ** 2 + (py - cy) ** 2 + (strides[None] != strides.min()) * 1e12
    nearest = d.argmin(1)
    lonely = ~pos.any(1)
    pos[torch.arange(gt.shape[0])[lonely], nearest[lonely]] = True
    area = ((x2 - x1) * (y2 - y1)).expand(-1, n)
    area = torch.where(pos, area, torch.full_like(area, float("inf")))
    best_area, best = area.min(0)
    return torch.where(torch.isfinite(best_area), best, torch.full_like(best, -1))


def _inside(points: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: the point lies inside at least one of the xyxy ``regions``."""
    if regions.numel() == 0:
        return torch.zeros(points.shape[0], dtype=torch.bool)
    x, y = points[:, :1], points[:, 1:2]
    r = regions.reshape(-1, 4)[None]
    return ((x > r[..., 0]) & (y > r[..., 1]) & (x < r[..., 2]) & (y < r[..., 3])).any(1)


def hard_weights(
    points: torch.Tensor, targets: list[torch.Tensor], hard: list[torch.Tensor], weight: float
) -> torch.Tensor:
    """``[B, N]`` class-loss weights: ``weight`` on a hard region outside every code, else 1."""
    out = torch.ones(len(targets), points.shape[0])
    for i, (gt, h) in enumerate(zip(targets, hard, strict=True)):
        out[i, _inside(points, h) & ~_inside(points, gt)] = weight
    return out


def detection_loss(
    boxes: torch.Tensor,
    logits: torch.Tensor,
    targets: list[torch.Tensor],
    points: torch.Tensor,
    strides: torch.Tensor,
    *,
    box_weight: float = 2.0,
    hard: list[torch.Tensor] | None = None,
    hard_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of a batch: ``boxes [B,N,4]`` xyxy, ``logits [B,N,1]``, targets per image.

    ``hard`` (xyxy regions per image) and ``hard_weight``: see the module docstring.
    """
    cls_target = torch.zeros_like(logits)
    pred_pos, gt_pos = [], []
    pos_index = []
    for i, gt in enumerate(targets):
        idx = assign(points, strides, gt)
        mask = idx >= 0
        if mask.any():
            pred_pos.append(boxes[i][mask])
            gt_pos.append(gt[idx[mask]])
            pos_index.append((i, mask))
    n_pos = sum(int(m.sum()) for _, m in pos_index)
    if pred_pos:
        p = torch.cat(pred_pos)
        g = torch.cat(gt_pos)
        iou, giou = box_iou_giou(p, g)
        loss_box = (1 - giou).sum() / max(n_pos, 1)
        q = iou.detach().clamp(min=0.05)
        start = 0
        for i, mask in pos_index:
            k = int(mask.sum())
            cls_target[i, mask, 0] = q[start : start + k]
            start += k
        mean_iou = float(iou.detach().mean())
    else:
        loss_box = boxes.sum() * 0.0
        mean_iou = 0.0
    prob = logits.sigmoid()
    qfl = F.binary_cross_entropy_with_logits(logits, cls_target, reduction="none")
    qfl = qfl * (prob - cls_target).abs().pow(2)
    if hard is not None and hard_weight != 1.0:
        qfl = qfl * hard_weights(points, targets, hard, hard_weight)[..., None]
    loss_cls = qfl.sum() / max(n_pos, 1)
    total = loss_cls + box_weight * loss_box
    return total, {
        "cls": float(loss_cls.detach()),
        "box": float(loss_box.detach()),
        "pos": float(n_pos),
        "iou": mean_iou,
    }
