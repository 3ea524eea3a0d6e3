"""Batch-wide post-processing (core/vision/batch_nms.py) returns exactly what the per-image
post-processing (core/vision/postprocess.py) returns: same boxes, scores, classes, same order."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.runtime.errors import ModelError
from core.vision.batch_nms import nms_batch, postprocess_batch_vectorized
from core.vision.detections import Detections
from core.vision.postprocess import Layout, Letterbox, nms, postprocess_batch


def same(a: list[Detections], b: list[Detections]) -> bool:
    return len(a) == len(b) and all(
        np.array_equal(x.xyxy, y.xyxy)
        and np.array_equal(x.confidence, y.confidence)
        and np.array_equal(x.class_id, y.class_id)
        for x, y in zip(a, b, strict=True)
    )


def random_output(rng: np.random.Generator, layout: Layout, b: int, nc: int, n: int) -> np.ndarray:
    """Boxes that overlap often; scores on a 0.1 grid, so ties are common."""
    xy = rng.uniform(0, 100, (b, n, 2))
    wh = rng.uniform(1, 40, (b, n, 2))
    if layout == "yolov8":
        scores = np.round(rng.uniform(0, 1, (b, n, nc)), 1)
        return np.concatenate([xy, wh, scores], 2).transpose(0, 2, 1).astype(np.float32)
    if layout == "yolov5":
        scores = np.round(rng.uniform(0, 1, (b, n, 1 + nc)), 1)
        return np.concatenate([xy, wh, scores], 2).astype(np.float32)
    score = np.round(rng.uniform(0, 1, (b, n, 1)), 1)
    cls = rng.integers(0, nc, (b, n, 1))
    return np.concatenate([xy, xy + wh, score, cls], 2).astype(np.float32)


CASES = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**32 - 1),
        "layout": st.sampled_from(["yolov8", "yolov5", "end2end"]),
        "b": st.integers(1, 6),
        "nc": st.integers(1, 3),
        "n": st.integers(1, 60),
        "max_det": st.integers(1, 8),
        "iou": st.one_of(st.none(), st.floats(0.0, 1.0)),
        "per_image": st.booleans(),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=CASES)
def test_batch_wide_equals_per_image(case: dict[str, Any]) -> None:
    seed, layout, b, nc, n = (case[k] for k in ("seed", "layout", "b", "nc", "n"))
    max_det, iou, per_image = case["max_det"], case["iou"], case["per_image"]
    rng = np.random.default_rng(seed)
    raw = random_output(rng, layout, b, nc, n)
    lbs = [
        Letterbox(float(rng.uniform(0.5, 2)), *(int(v) for v in rng.integers(0, 10, 2)), 200, 150)
        for _ in range(b)
    ]
    conf: Any = (
        [None if rng.random() < 0.3 else float(rng.uniform(0.1, 0.6)) for _ in range(b)]
        if per_image
        else float(rng.uniform(0.1, 0.5))
    )
    want = postprocess_batch(raw, layout, lbs, conf=conf, iou=iou, max_det=max_det)
    got = postprocess_batch_vectorized(raw, layout, lbs, conf=conf, iou=iou, max_det=max_det)
    assert same(got, want)


def test_nms_batch_keeps_per_image_greedy_order_across_classes() -> None:
    boxes = np.array(
        [[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10]],
        np.float32,
    )
    scores = np.array([0.9, 0.8, 0.7, 0.7, 0.95], np.float32)
    classes = np.array([0, 0, 1, 0, 0])
    image = np.array([0, 0, 0, 0, 1])
    kept = nms_batch(image, boxes, scores, classes, iou_threshold=0.5, max_det=10)
    assert kept.tolist() == [0, 2, 3, 4]  # 1 overlaps 0 (same class); 2 is another class
    mine = image == 0
    per_image = nms(boxes[mine], scores[mine], classes[mine], 0.5, 10)
    assert kept[:3].tolist() == np.flatnonzero(mine)[per_image].tolist()
    limited = nms_batch(image, boxes, scores, classes, iou_threshold=0.5, max_det=2)
    assert limited.tolist() == [0, 2, 4], "max_det per image, best scores first"


def test_nothing_above_the_threshold_gives_empty_detections() -> None:
    raw = np.zeros((3, 5, 40), np.float32)
    out = postprocess_batch_vectorized(raw, "yolov8", [Letterbox(1.0, 0, 0, 10, 10)] * 3)
    assert [len(d) for d in out] == [0, 0, 0]


def test_output_count_must_match_the_images() -> None:
    with pytest.raises(ModelError, match="2 outputs for 1 images"):
        raw = np.zeros((2, 5, 4), np.float32)
        postprocess_batch_vectorized(raw, "yolov8", [Letterbox(1.0, 0, 0, 10, 10)])
