"""Pure numpy pre- and post-processing of YOLO-style detectors (no ONNX Runtime here).

- :func:`letterbox_batch`: images → one NCHW float32 RGB batch, Ultralytics-style
  letterbox (keep the aspect ratio, centred, pad value 114), with the per-image
  :class:`Letterbox` needed to map boxes back.
- :func:`detect_layout`: which of the three output layouts a model emits.
- ``decode_*``: one image's raw output → candidate boxes (xyxy, letterbox pixels).
- :func:`nms`: class-aware greedy NMS; each step is one vectorised IoU row.
- :func:`postprocess_batch`: all of the above back to :class:`Detections` in original pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import cv2
import numpy as np

from core.runtime.errors import ModelError
from core.vision.detections import Detections

Layout = Literal["yolov5", "yolov8", "end2end"]
LAYOUTS: tuple[Layout, ...] = ("yolov5", "yolov8", "end2end")

PAD_VALUE = 114
END2END_MAX_K = 300  # end-to-end (NMS-free) exports emit at most this many rows
MAX_NMS = 30_000  # candidates kept (by score) before NMS, as Ultralytics

# Per-layout (confidence, IoU) defaults, as the upstream projects' predict defaults.
LAYOUT_DEFAULTS: dict[str, tuple[float, float | None]] = {
    "yolov5": (0.25, 0.45),
    "yolov8": (0.25, 0.7),
    "end2end": (0.25, None),  # NMS-free: no IoU threshold
}


class Letterbox(NamedTuple):
    """How one image was placed in the batch: ``x_lb = x * scale + pad_x``."""

    scale: float
    pad_x: int
    pad_y: int
    width: int  # original image size
    height: int


class Candidates(NamedTuple):
    """Boxes of one image before NMS, in letterbox pixels."""

    boxes: np.ndarray  # (M, 4) float32 xyxy
    scores: np.ndarray  # (M,) float32
    class_ids: np.ndarray  # (M,) int64


# --- letterbox ---------------------------------------------------------------------------


def input_hw(size: int | tuple[int, int], stride: int = 32) -> tuple[int, int]:
    """The batch's (height, width): ``size`` rounded up to a multiple of ``stride``."""
    h, w = (size, size) if isinstance(size, int) else size
    return (math.ceil(h / stride) * stride, math.ceil(w / stride) * stride)


def letterbox_scale(
    height: int, width: int, fit_hw: tuple[int, int], scaleup: bool = True
) -> float:
    """The scale that fits a ``height`` x ``width`` image into ``fit_hw``; with ``scaleup``
    off (Ultralytics' ``LetterBox(scaleup=False)``) an image smaller than that is not
    enlarged."""
    scale = min(fit_hw[0] / height, fit_hw[1] / width)
    return scale if scaleup else min(scale, 1.0)


def letterbox_params(
    height: int, width: int, out_hw: tuple[int, int], scale: float | None = None
) -> Letterbox:
    """Scale and padding that place a ``height`` x ``width`` image in ``out_hw``, centred;
    the scale fits it into ``out_hw`` unless given."""
    out_h, out_w = out_hw
    if scale is None:
        scale = letterbox_scale(height, width, out_hw)
    new_w, new_h = resized_size(width, height, scale)
    pad_x = round((out_w - new_w) / 2 - 0.1)
    pad_y = round((out_h - new_h) / 2 - 0.1)
    return Letterbox(scale, pad_x, pad_y, width, height)


def resized_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The letterboxed image's (width, height): at least one pixel each, so an extreme
    aspect ratio (1 x 1300, 8192 x 4) is squeezed to a line instead of vanishing."""
    return max(1, round(width * scale)), max(1, round(height * scale))


def rect_hw(
    shapes: Sequence[tuple[int, ...]],
    size: int | tuple[int, int],
    stride: int = 32,
    scaleup: bool = True,
) -> tuple[int, int]:
    """The smallest batch input that holds every image letterboxed for ``size``: each
    image's resized height and width rounded up to ``stride``, the largest of each over the
    batch (Ultralytics' minimal-padding ``rect`` letterbox, ``LetterBox(auto=True)``, for a
    whole batch). At most ``size``; a square ``size`` stays square only for square images."""
    out_h, out_w = input_hw(size, stride)
    need_h = need_w = stride
    for shape in shapes:
        height, width = shape[0], shape[1]
        new_w, new_h = resized_size(
            width, height, letterbox_scale(height, width, (out_h, out_w), scaleup)
        )
        need_h, need_w = max(need_h, new_h), max(need_w, new_w)
    return min(out_h, math.ceil(need_h / stride) * stride), min(
        out_w, math.ceil(need_w / stride) * stride
    )


def letterbox_batch(
    images: Sequence[np.ndarray],
    size: int | tuple[int, int],
    stride: int = 32,
    *,
    rect: bool = False,
    scaleup: bool = True,
) -> tuple[np.ndarray, list[Letterbox]]:
    """Letterbox HxWx3 uint8 BGR images into one (B, 3, H, W) float32 RGB 0..1 batch.

    Each image is scaled to fit ``size`` (never enlarged with ``scaleup`` off) and centred.
    The batch is ``size`` (rounded up to ``stride``), or with ``rect`` the smallest
    multiple of ``stride`` that holds the batch's images (:func:`rect_hw`): fewer padded
    pixels for the model to run over, the same scale per image.

    The resize is per image (sizes differ); the canvas fill, channel flip, transpose and
    scaling run once over the whole batch.
    """
    fit_hw = input_hw(size, stride)
    out_h, out_w = rect_hw([im.shape for im in images], size, stride, scaleup) if rect else fit_hw
    canvas = np.full((len(images), out_h, out_w, 3), PAD_VALUE, np.uint8)
    metas = []
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image {i} must be HxWx3 uint8, got {image.shape} {image.dtype}")
        height, width = image.shape[:2]
        scale = letterbox_scale(height, width, fit_hw, scaleup)
        lb = letterbox_params(height, width, (out_h, out_w), scale)
        new_w, new_h = resized_size(lb.width, lb.height, lb.scale)
        resized = image
        if (new_w, new_h) != (lb.width, lb.height):
            resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        canvas[i, lb.pad_y : lb.pad_y + new_h, lb.pad_x : lb.pad_x + new_w] = resized
        metas.append(lb)
    # flip and transpose while still uint8 (a quarter of the bytes), then scale in one pass
    nchw = np.ascontiguousarray(canvas[..., ::-1].transpose(0, 3, 1, 2))
    batch = np.empty(nchw.shape, np.float32)
    np.multiply(nchw, np.float32(1.0 / 255.0), out=batch)
    return batch, metas


def boxes_to_letterbox(boxes: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Original-image xyxy → letterbox xyxy (the inverse of :func:`boxes_from_letterbox`)."""
    out = boxes.astype(np.float32) * np.float32(lb.scale)
    out[:, [0, 2]] += lb.pad_x
    out[:, [1, 3]] += lb.pad_y
    return out


def boxes_from_letterbox(boxes: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Letterbox xyxy → original-image xyxy, clipped to the image."""
    out = boxes.astype(np.float32, copy=True)
    out[:, [0, 2]] -= lb.pad_x
    out[:, [1, 3]] -= lb.pad_y
    out /= np.float32(lb.scale)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, lb.width)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, lb.height)
    return out


# --- layouts -----------------------------------------------------------------------------


def _dim(value: object) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def expected_anchors(imgsz: int, strides: Sequence[int] = (8, 16, 32)) -> int:
    """Anchor-free (v8) prediction count at a square ``imgsz``; YOLOv5 emits 3x this."""
    return sum(math.ceil(imgsz / s) ** 2 for s in strides)


def detect_layout(
    output_shape: Sequence[object], nc_hint: int | None = None, imgsz: int | None = None
) -> Layout:
    """The layout of an output of shape ``(B, d1, d2)``.

    - ``yolov8``: ``[B, 4+nc, N]`` (a few channels, many predictions),
    - ``yolov5``: ``[B, N, 5+nc]`` (objectness x class scores),
    - ``end2end``: ``[B, K, 6]`` rows ``x1, y1, x2, y2, score, class``, ``K`` ≤ 300.

    ``nc_hint`` (the class count from the model's ``names``) settles the ambiguous cases,
    e.g. a one-class YOLOv5 ``[B, N, 6]`` against an end-to-end ``[B, 300, 6]``;
    ``imgsz`` lets a known YOLOv5 prediction count settle it too.
    """
    if len(output_shape) != 3:
        raise ModelError(f"expected a 3-D detector output (B, d1, d2), got {list(output_shape)}")
    d1, d2 = _dim(output_shape[1]), _dim(output_shape[2])
    if d1 is None or d2 is None:
        raise ModelError(f"output dims must be known to detect the layout: {list(output_shape)}")
    v5_n = 3 * expected_anchors(imgsz) if imgsz else None
    if d2 == 6:
        if nc_hint not in (None, 1) or (d1 <= END2END_MAX_K and d1 != v5_n):
            return "end2end"
        return "yolov5"
    if nc_hint is not None:
        v8, v5 = d1 == 4 + nc_hint, d2 == 5 + nc_hint
        if v8 != v5:
            return "yolov8" if v8 else "yolov5"
    if d1 < d2 and d1 >= 5:
        return "yolov8"
    if d2 >= 6:
        return "yolov5"
    raise ModelError(f"unrecognised detector output shape {list(output_shape)}")


def layout_classes(layout: Layout, output_shape: Sequence[int]) -> int | None:
    """Class count implied by the output shape (None for end-to-end outputs)."""
    if layout == "yolov8":
        return int(output_shape[1]) - 4
    if layout == "yolov5":
        return int(output_shape[2]) - 5
    return None


# --- decoders ----------------------------------------------------------------------------


def xywh_to_xyxy(xywh: np.ndarray) -> np.ndarray:
    out = np.empty_like(xywh, dtype=np.float32)
    half = xywh[:, 2:4] / 2
    out[:, :2] = xywh[:, :2] - half
    out[:, 2:] = xywh[:, :2] + half
    return out


def _candidates(boxes: np.ndarray, scores: np.ndarray, cids: np.ndarray) -> Candidates:
    return Candidates(
        boxes.astype(np.float32, copy=False),
        scores.astype(np.float32, copy=False),
        cids.astype(np.int64, copy=False),
    )


def decode_yolov5(pred: np.ndarray, conf: float) -> Candidates:
    """One image's ``(N, 5+nc)`` rows ``cx, cy, w, h, obj, cls…``; score = obj x cls."""
    rows = pred[pred[:, 4] > conf]
    cls_scores = rows[:, 5:] * rows[:, 4:5]
    cids = cls_scores.argmax(axis=1)
    scores = np.take_along_axis(cls_scores, cids[:, None], axis=1)[:, 0]
    keep = scores > conf
    return _candidates(xywh_to_xyxy(rows[keep, :4]), scores[keep], cids[keep])


def decode_yolov8(pred: np.ndarray, conf: float) -> Candidates:
    """One image's ``(4+nc, N)`` columns ``cx, cy, w, h, cls…`` (no objectness)."""
    cls_scores = pred[4:]
    cids = cls_scores.argmax(axis=0)
    scores = np.take_along_axis(cls_scores, cids[None, :], axis=0)[0]
    keep = scores > conf
    return _candidates(xywh_to_xyxy(pred[:4, keep].T), scores[keep], cids[keep])


def decode_end2end(pred: np.ndarray, conf: float) -> Candidates:
    """One image's ``(K, 6)`` rows ``x1, y1, x2, y2, score, class`` (already NMS-free)."""
    rows = pred[pred[:, 4] > conf]
    return _candidates(rows[:, :4], rows[:, 4], np.rint(rows[:, 5]))


DECODERS: dict[str, Callable[[np.ndarray, float], Candidates]] = {
    "yolov5": decode_yolov5,
    "yolov8": decode_yolov8,
    "end2end": decode_end2end,
}


# --- NMS ---------------------------------------------------------------------------------


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of float64 xyxy boxes ``a (..., 4)`` and ``b (..., 4)``, broadcast together."""
    lt = np.maximum(a[..., :2], b[..., :2])
    rb = np.minimum(a[..., 2:], b[..., 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return np.asarray(inter / np.maximum(area_a + area_b - inter, 1e-9))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``(N, M)`` of xyxy boxes ``a (N, 4)`` and ``b (M, 4)``, in float64.

    The one IoU of the project (with :func:`box_iou_pairs`, the same formula): NMS here and
    in :mod:`core.vision.batch_nms`, the training's scoring and the benchmarks use it.
    """
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    return _iou(a[:, None, :], b[None, :, :])


def box_iou_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box ``a[k]`` with box ``b[k]`` for every k (``a`` and ``b`` both ``(K, 4)``),
    in float64: :func:`box_iou`'s diagonal without the matrix."""
    return _iou(np.asarray(a, np.float64), np.asarray(b, np.float64))


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    class_ids: np.ndarray,
    iou_threshold: float,
    max_det: int = 300,
) -> np.ndarray:
    """Class-aware greedy NMS: indices kept, best score first.

    A box is dropped when its IoU with a kept box of the same class exceeds
    ``iou_threshold``. The loop runs once per *kept* box (at most ``max_det``); each
    step suppresses against all remaining boxes in one vectorised operation.
    Ties in score keep the earlier box (stable sort).
    """
    order = np.argsort(-scores, kind="stable")[:MAX_NMS]
    b = boxes[order].astype(np.float64)
    c = class_ids[order]
    remaining = np.arange(len(order))
    keep: list[int] = []
    while remaining.size and len(keep) < max_det:
        i, rest = remaining[0], remaining[1:]
        keep.append(int(i))
        iou = box_iou(b[i : i + 1], b[rest])[0]
        remaining = rest[(iou <= iou_threshold) | (c[rest] != c[i])]
    return order[np.asarray(keep, dtype=np.int64)]


# --- all together ------------------------------------------------------------------------


def postprocess_image(
    pred: np.ndarray,
    layout: Layout,
    lb: Letterbox,
    *,
    conf: float,
    iou: float | None,
    max_det: int,
) -> Detections:
    """One image's raw output → :class:`Detections` in original pixels."""
    cand = DECODERS[layout](pred.astype(np.float32, copy=False), conf)
    if iou is None or layout == "end2end":
        keep = np.argsort(-cand.scores, kind="stable")[:max_det]
    else:
        keep = nms(cand.boxes, cand.scores, cand.class_ids, iou, max_det)
    boxes = boxes_from_letterbox(cand.boxes[keep], lb)
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return Detections(
        xyxy=boxes[valid], confidence=cand.scores[keep][valid], class_id=cand.class_ids[keep][valid]
    )


def postprocess_batch(
    raw: np.ndarray,
    layout: Layout,
    letterboxes: Sequence[Letterbox],
    *,
    conf: float | Sequence[float | None] | None = None,
    iou: float | None = None,
    max_det: int = 100,
) -> list[Detections]:
    """A batch's raw output → one :class:`Detections` per image.

    ``conf`` is one threshold or one per image (None = the layout's default); ``iou``
    None takes the layout's default (end-to-end outputs never get NMS).
    """
    if len(raw) != len(letterboxes):
        raise ModelError(f"model returned {len(raw)} outputs for {len(letterboxes)} images")
    default_conf, default_iou = LAYOUT_DEFAULTS[layout]
    confs: Sequence[float | None] = (
        conf if isinstance(conf, Sequence) else [conf] * len(letterboxes)
    )
    iou = default_iou if iou is None or layout == "end2end" else iou
    return [
        postprocess_image(
            raw[i],
            layout,
            lb,
            conf=_or(confs[i], default_conf),
            iou=iou,
            max_det=max_det,
        )
        for i, lb in enumerate(letterboxes)
    ]


def _or(value: float | None, default: float) -> float:
    return default if value is None else value
