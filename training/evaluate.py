"""How the training scores a detector on synthetic images: the one place for it.

``predict_val`` runs a torch detector on ``(image, boxes)`` pairs and keeps its raw
outputs; ``score_predictions`` turns them into image recall, FP-image rate and precision
at a threshold (after the core detector's NMS); ``best_operating_point`` picks the
threshold of :data:`CONF_GRID` with the best :func:`operating_score` and the logit bias
that moves it to the detector's default. ``image_metrics`` does the same for boxes that
are already final (the crop verifier's and the calibrated scorer's). Used by
``training.train`` (checkpoints), ``training.select`` (size), ``training.compare``
(replacing a shipped model) and ``training.verify``.

IoU and NMS are the core detector's (:func:`core.vision.postprocess.box_iou`,
:func:`core.vision.postprocess.nms`): training scores boxes exactly as a worker keeps them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from core.vision.postprocess import box_iou, nms

NMS_IOU = 0.7  # the core detector's default for the YOLOv8 layout


@torch.no_grad()
def predict_val(
    model: torch.nn.Module, val: list[tuple[np.ndarray, np.ndarray]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Raw ``(boxes xyxy, logits)`` of every validation image (runs of equal size batched)."""
    model.eval()
    out: list[tuple[np.ndarray, np.ndarray]] = []
    start = 0
    while start < len(val):
        shape = val[start][0].shape
        end = start + 1
        while end < len(val) and end - start < 32 and val[end][0].shape == shape:
            end += 1
        chunk, start = val[start:end], end
        x = torch.from_numpy(np.stack([c[0] for c in chunk])).permute(0, 3, 1, 2).float() / 255
        boxes, logits = model(x)
        out += list(zip(boxes.numpy(), logits[..., 0].numpy(), strict=True))
    return out


def score_predictions(
    preds: list[tuple[np.ndarray, np.ndarray]],
    val: list[tuple[np.ndarray, np.ndarray]],
    conf: float = 0.25,
    bias: float = 0.0,
) -> dict[str, float]:
    """Box recall (IoU >= 0.5), image recall, FP images and precision at ``conf``."""
    kept = []
    for (_, gt), (b_all, l_all) in zip(val, preds, strict=True):
        s_all = 1 / (1 + np.exp(-(l_all + bias)))
        keep = s_all >= conf
        b, s = b_all[keep], s_all[keep]
        k = nms(b, s, np.zeros(len(s), np.int64), NMS_IOU, max_det=max(len(s), 1))
        kept.append((b[k], gt))
    return match_metrics(kept)


def match_metrics(kept: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """Box recall, image recall, FP-image rate and precision of ``(boxes kept, truth)``
    pairs: a box matches a code at IoU >= 0.5."""
    found = total = fp_dets = tp_dets = 0
    img_hit = img_pos = fp_images = img_neg = 0
    for b, gt in kept:
        if len(gt):
            img_pos += 1
            ious = box_iou(gt, b) if len(b) else np.zeros((len(gt), 0))
            hit = (ious >= 0.5).any(1) if len(b) else np.zeros(len(gt), bool)
            found += int(hit.sum())
            total += len(gt)
            img_hit += int(hit.all())
            matched = (ious >= 0.5).any(0) if len(b) else np.zeros(0, bool)
            tp_dets += int(matched.sum())
            fp_dets += int((~matched).sum())
        else:
            img_neg += 1
            fp_images += int(len(b) > 0)
            fp_dets += len(b)
    return {
        "box_recall": found / max(total, 1),
        "image_recall": img_hit / max(img_pos, 1),
        "fp_images": fp_images / max(img_neg, 1),
        "precision": tp_dets / max(tp_dets + fp_dets, 1),
    }


CONF_GRID = tuple(round(0.1 + 0.05 * i, 2) for i in range(16))  # 0.10 .. 0.85
DEFAULT_CONF = 0.25  # the core detector's default for the YOLOv8 layout


def operating_score(m: dict[str, float]) -> float:
    """What the acceptance asks: every code found, nothing on negatives (then precision)."""
    return m["image_recall"] - m["fp_images"] + 0.1 * m["precision"]


def best_operating_point(
    preds: list[tuple[np.ndarray, np.ndarray]], val: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[float, float, dict[str, float]]:
    """``(score, logit bias, metrics)`` of the best threshold on the grid.

    The bias moves that threshold to :data:`DEFAULT_CONF`, so the exported model works
    at the core detector's default without a setting.
    """
    best: tuple[float, float, dict[str, float]] | None = None
    for conf in CONF_GRID:
        m = score_predictions(preds, val, conf)
        score = operating_score(m)
        if best is None or score > best[0] + 1e-9:
            bias = math.log(DEFAULT_CONF / (1 - DEFAULT_CONF)) - math.log(conf / (1 - conf))
            best = (score, bias, {**m, "conf": conf})
    assert best is not None
    return best


def validate(
    model: torch.nn.Module, val: list[tuple[np.ndarray, np.ndarray]], conf: float = 0.25
) -> dict[str, float]:
    """Metrics of ``model`` on a synthetic validation set at threshold ``conf``."""
    return score_predictions(predict_val(model, val), val, conf)


def image_metrics(
    preds: list[tuple[np.ndarray, np.ndarray]], gts: list[np.ndarray], threshold: float
) -> dict[str, float]:
    """Image recall, FP-image rate and precision of boxes whose verifier score ≥ threshold."""
    kept = [(boxes[score >= threshold], gt) for (boxes, score), gt in zip(preds, gts, strict=True)]
    metrics = match_metrics(kept)
    return {k: metrics[k] for k in ("image_recall", "fp_images", "precision")}
