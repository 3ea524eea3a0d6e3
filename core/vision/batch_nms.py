"""Post-processing of a whole batch at once: the same detections as
:func:`core.vision.postprocess.postprocess_batch`, with one numpy pass per step instead of one
per image.

- **Decode**: the confidence threshold (one per image), class argmax and box conversion
  run over the batch's whole output in one go; the candidates carry their image index.
- **NMS**: greedy and class-aware as :func:`core.vision.postprocess.nms`, but every (image,
  class) group at once (:func:`nms_batch`): one numpy round per box kept *per group*
  instead of one per box kept in the batch, with the same float64 IoU, so each image keeps
  what the per-image NMS keeps, in the same order (a property test compares them on
  random outputs).

A GPU worker runs batches of 8 to 64 images; its per-image Python overhead is what this
removes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.runtime.errors import ModelError
from core.vision.detections import Detections
from core.vision.postprocess import (
    LAYOUT_DEFAULTS,
    MAX_NMS,
    Layout,
    Letterbox,
    box_iou_pairs,
    boxes_from_letterbox,
)


def _xyxy(cx: np.ndarray, cy: np.ndarray, w: np.ndarray, h: np.ndarray) -> np.ndarray:
    out = np.empty((len(cx), 4), np.float32)
    half_w, half_h = w / 2, h / 2
    out[:, 0], out[:, 1] = cx - half_w, cy - half_h
    out[:, 2], out[:, 3] = cx + half_w, cy + half_h
    return out


def decode_batch(
    raw: np.ndarray, layout: Layout, conf: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Candidates of the whole batch: (image index, xyxy boxes, scores, class ids), each
    image's candidates in the order the per-image decoders return them."""
    raw = raw.astype(np.float32, copy=False)
    if layout == "yolov8":  # (B, 4+nc, N)
        cls_scores = raw[:, 4:, :]
        cids = cls_scores.argmax(axis=1)  # (B, N)
        scores = np.take_along_axis(cls_scores, cids[:, None, :], axis=1)[:, 0, :]
        b, n = np.nonzero(scores > conf[:, None])
        boxes = _xyxy(raw[b, 0, n], raw[b, 1, n], raw[b, 2, n], raw[b, 3, n])
        return b, boxes, scores[b, n], cids[b, n].astype(np.int64)
    if layout == "yolov5":  # (B, N, 5+nc)
        b, n = np.nonzero(raw[:, :, 4] > conf[:, None])
        rows = raw[b, n]
        cls_scores = rows[:, 5:] * rows[:, 4:5]
        cids = cls_scores.argmax(axis=1)
        scores = np.take_along_axis(cls_scores, cids[:, None], axis=1)[:, 0]
        keep = scores > conf[b]
        rows = rows[keep]
        boxes = _xyxy(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3])
        return b[keep], boxes, scores[keep], cids[keep].astype(np.int64)
    b, n = np.nonzero(raw[:, :, 4] > conf[:, None])  # end2end (B, K, 6)
    rows = raw[b, n]
    return b, rows[:, :4].copy(), rows[:, 4].copy(), np.rint(rows[:, 5]).astype(np.int64)


def _ranked(image: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Candidate indices sorted by image, then score (best first, ties in order), at most
    MAX_NMS per image."""
    pos = np.arange(len(scores))
    order = np.lexsort((pos, -scores, image))
    img = image[order]
    starts = np.searchsorted(img, img, side="left")
    return order[(np.arange(len(order)) - starts) < MAX_NMS]


def nms_batch(
    image: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    class_ids: np.ndarray,
    *,
    iou_threshold: float,
    max_det: int,
) -> np.ndarray:
    """Greedy class-aware NMS of every image at once: kept candidate indices, grouped by
    image, each image's best score first (what :func:`core.vision.postprocess.nms` keeps).

    Suppression never crosses an (image, class) group, so all groups run side by side: each
    round keeps the best candidate still alive in every group and drops the candidates of
    its group that overlap it more than ``iou_threshold``. A group never needs more than
    ``max_det`` rounds; each image's kept boxes, in score order, are then cut to
    ``max_det`` — what the per-image loop, which stops at ``max_det``, keeps.
    """
    if len(scores) == 0:
        return np.empty(0, np.int64)
    ranked = _ranked(image, scores)  # by image, then score: each image's NMS order
    # by image, class, then that order: each (image, class) group is one contiguous run
    order = np.lexsort((np.arange(len(ranked)), class_ids[ranked], image[ranked]))
    cand = ranked[order]
    img, cls = image[cand], class_ids[cand]
    group = np.concatenate([[0], np.cumsum((img[1:] != img[:-1]) | (cls[1:] != cls[:-1]))])
    b = boxes[cand].astype(np.float64)
    alive = np.ones(len(cand), bool)
    kept = np.zeros(len(cand), bool)
    leader_of = np.zeros(int(group[-1]) + 1, np.int64)
    for _ in range(max_det):
        live = np.flatnonzero(alive)
        if live.size == 0:
            break
        first = live[np.concatenate([[True], group[live[1:]] != group[live[:-1]]])]
        kept[first], alive[first] = True, False
        leader_of[group[first]] = first
        rest = np.flatnonzero(alive)
        lead = leader_of[group[rest]]
        alive[rest[~(box_iou_pairs(b[lead], b[rest]) <= iou_threshold)]] = False
    picked = np.sort(order[kept])  # positions in `ranked`: by image, then score
    img_picked = image[ranked[picked]]
    starts = np.searchsorted(img_picked, img_picked, side="left")
    return ranked[picked[(np.arange(len(picked)) - starts) < max_det]]


def postprocess_batch_vectorized(
    raw: np.ndarray,
    layout: Layout,
    letterboxes: Sequence[Letterbox],
    *,
    conf: float | Sequence[float | None] | None = None,
    iou: float | None = None,
    max_det: int = 100,
) -> list[Detections]:
    """What :func:`core.vision.postprocess.postprocess_batch` returns, computed batch-wide."""
    if len(raw) != len(letterboxes):
        raise ModelError(f"model returned {len(raw)} outputs for {len(letterboxes)} images")
    default_conf, default_iou = LAYOUT_DEFAULTS[layout]
    confs = conf if isinstance(conf, Sequence) else [conf] * len(letterboxes)
    thresholds = np.array([default_conf if c is None else c for c in confs], np.float32)
    image, boxes, scores, cids = decode_batch(raw, layout, thresholds)
    iou = default_iou if iou is None or layout == "end2end" else iou
    if iou is None:  # NMS-free: best scores first, at most max_det per image
        ranked = _ranked(image, scores)
        rank = np.arange(len(ranked)) - np.searchsorted(image[ranked], image[ranked])
        keep = ranked[rank < max_det]
    else:
        keep = nms_batch(image, boxes, scores, cids, iou_threshold=iou, max_det=max_det)
    bounds = np.searchsorted(image[keep], np.arange(len(letterboxes) + 1))
    out = []
    for i, lb in enumerate(letterboxes):
        mine = keep[bounds[i] : bounds[i + 1]]
        xyxy = boxes_from_letterbox(boxes[mine], lb)
        valid = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
        out.append(
            Detections(xyxy=xyxy[valid], confidence=scores[mine][valid], class_id=cids[mine][valid])
        )
    return out
