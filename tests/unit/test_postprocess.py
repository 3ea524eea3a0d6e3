"""Pure pre/post-processing: letterbox, layout detection, decoders, NMS, rescale."""

from __future__ import annotations

import numpy as np
import pytest

from core.runtime.errors import ModelError
from core.vision.postprocess import (
    LAYOUT_DEFAULTS,
    PAD_VALUE,
    Letterbox,
    box_iou,
    boxes_from_letterbox,
    boxes_to_letterbox,
    decode_end2end,
    decode_yolov5,
    decode_yolov8,
    detect_layout,
    letterbox_batch,
    nms,
    postprocess_batch,
    rect_hw,
)

# --- letterbox ---------------------------------------------------------------------------


def test_letterbox_batch_is_nchw_rgb_float_with_grey_padding() -> None:
    blue = np.zeros((100, 200, 3), np.uint8)
    blue[..., 0] = 255  # BGR blue
    batch, metas = letterbox_batch([blue, blue[:50]], 64)
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == np.float32
    assert metas[0] == Letterbox(scale=0.32, pad_x=0, pad_y=16, width=200, height=100)
    # content: RGB order, so blue is channel 2
    np.testing.assert_allclose(batch[0, :, 32, 32], [0.0, 0.0, 1.0])
    # padding rows above and below, value 114
    np.testing.assert_allclose(batch[0, :, 0, 0], [PAD_VALUE / 255] * 3, rtol=1e-6)
    np.testing.assert_allclose(batch[0, :, 63, 10], [PAD_VALUE / 255] * 3, rtol=1e-6)


def test_letterbox_rounds_size_up_to_stride_and_refuses_non_bgr() -> None:
    batch, _ = letterbox_batch([np.zeros((10, 10, 3), np.uint8)], 100, stride=32)
    assert batch.shape[2:] == (128, 128)
    with pytest.raises(ValueError, match=r"H.W.3 uint8"):
        letterbox_batch([np.zeros((10, 10), np.uint8)], 64)


def test_rect_batch_is_the_smallest_stride_multiple_that_holds_its_images() -> None:
    frame = np.zeros((1080, 1920, 3), np.uint8)  # 16:9 at 416: 416 x 234, run at 416 x 256
    batch, (lb,) = letterbox_batch([frame], 416, rect=True)
    assert batch.shape == (1, 3, 256, 416)
    square, (same,) = letterbox_batch([frame], 416)
    assert square.shape == (1, 3, 416, 416)
    assert lb.scale == same.scale and lb.pad_x == 0 and lb.pad_y == 11  # centred in 256
    # a portrait and a landscape image together need the whole square
    portrait = np.zeros((1920, 1080, 3), np.uint8)
    assert rect_hw([frame.shape, portrait.shape], 416) == (416, 416)
    assert letterbox_batch([frame, portrait], 416, rect=True)[0].shape == (2, 3, 416, 416)


def test_without_scaleup_a_small_image_keeps_its_size() -> None:
    small = np.zeros((100, 150, 3), np.uint8)
    batch, (lb,) = letterbox_batch([small], 416, rect=True, scaleup=False)
    assert batch.shape == (1, 3, 128, 160) and lb.scale == 1.0
    assert (lb.pad_x, lb.pad_y) == (5, 14)
    batch, (lb,) = letterbox_batch([small], 416, scaleup=False)  # square: same scale, centred
    assert batch.shape == (1, 3, 416, 416) and lb.scale == 1.0
    # a large image is still scaled down to fit
    assert (
        letterbox_batch([np.zeros((832, 640, 3), np.uint8)], 416, scaleup=False)[1][0].scale == 0.5
    )


@pytest.mark.parametrize(("rect", "scaleup"), [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize(
    ("height", "width"),
    [(480, 640), (640, 480), (100, 1000), (1000, 100), (640, 640), (37, 53), (1536, 2048)],
)
def test_letterbox_round_trip_within_one_pixel(
    height: int, width: int, rect: bool, scaleup: bool
) -> None:
    """A drawn box, found again in the letterboxed batch and mapped back, lands within 1 px."""
    box = np.array([[width * 0.2, height * 0.3, width * 0.7, height * 0.9]], np.float32)
    x1, y1, x2, y2 = np.rint(box[0]).astype(int)
    image = np.full((height, width, 3), 255, np.uint8)
    image[y1:y2, x1:x2] = (0, 255, 255)  # BGR yellow: blue off inside the box only
    batch, (lb,) = letterbox_batch([image], 640, rect=rect, scaleup=scaleup)
    # edges sit where bilinear crosses half; the grey padding has red < 0.5
    dark = np.argwhere((batch[0, 2] < 0.5) & (batch[0, 0] > 0.5))
    found = np.array(
        [[dark[:, 1].min(), dark[:, 0].min(), dark[:, 1].max() + 1, dark[:, 0].max() + 1]],
        np.float32,
    )
    drawn = np.array([[x1, y1, x2, y2]], np.float32)
    # in letterbox pixels: where the drawn box must be
    assert np.allclose(found, boxes_to_letterbox(drawn, lb), atol=1.0)
    # and back in original pixels (a letterbox pixel is 1/scale original pixels)
    assert np.allclose(boxes_from_letterbox(found, lb), drawn, atol=max(1.0, 1.0 / lb.scale))
    assert np.allclose(boxes_from_letterbox(boxes_to_letterbox(box, lb), lb), box, atol=1e-3)


def test_boxes_from_letterbox_clips_to_the_image() -> None:
    lb = Letterbox(scale=2.0, pad_x=0, pad_y=80, width=320, height=240)
    out = boxes_from_letterbox(np.array([[-20, 40, 700, 600]], np.float32), lb)
    np.testing.assert_allclose(out, [[0, 0, 320, 240]])


# --- layouts -----------------------------------------------------------------------------

LAYOUT_CASES = [
    # shape, nc_hint, imgsz, expected
    ((1, 5, 8400), 1, 640, "yolov8"),
    ((1, 84, 8400), 80, None, "yolov8"),
    ((1, 84, 8400), None, None, "yolov8"),
    ((1, 25200, 6), 1, 640, "yolov5"),
    ((1, 25200, 85), 80, None, "yolov5"),
    ((1, 25200, 85), None, None, "yolov5"),
    ((1, 300, 6), 1, 640, "end2end"),
    ((1, 300, 6), None, None, "end2end"),
    ((1, 100, 6), 80, None, "end2end"),
    # a one-class YOLOv5 at a small size has few predictions: imgsz settles it
    ((1, 252, 6), 1, 64, "yolov5"),
    ((1, 252, 6), 1, None, "end2end"),
    # a few predictions, many classes: the names count settles it
    ((1, 84, 50), 80, None, "yolov8"),
    ((1, 50, 85), 80, None, "yolov5"),
]


@pytest.mark.parametrize(("shape", "nc", "imgsz", "expected"), LAYOUT_CASES)
def test_detect_layout(
    shape: tuple[int, ...], nc: int | None, imgsz: int | None, expected: str
) -> None:
    assert detect_layout(shape, nc, imgsz=imgsz) == expected


@pytest.mark.parametrize(
    ("shape", "match"),
    [((1, 8400), "3-D"), ((1, "anchors", 6), "known"), ((1, 3, 2), "unrecognised")],
)
def test_detect_layout_refuses_unusable_shapes(shape: tuple[object, ...], match: str) -> None:
    with pytest.raises(ModelError, match=match):
        detect_layout(shape)


# --- decoders ----------------------------------------------------------------------------


def test_decode_yolov5_multiplies_objectness_and_class_scores() -> None:
    pred = np.array(
        [
            [50, 50, 20, 10, 0.9, 0.1, 0.8],  # class 1, 0.72
            [10, 10, 4, 4, 0.2, 1.0, 0.0],  # objectness under conf
            [30, 30, 10, 10, 0.5, 0.4, 0.3],  # 0.2 after multiplying: dropped
        ],
        np.float32,
    )
    cand = decode_yolov5(pred, 0.25)
    np.testing.assert_allclose(cand.boxes, [[40, 45, 60, 55]])
    np.testing.assert_allclose(cand.scores, [0.72], rtol=1e-6)
    assert cand.class_ids.tolist() == [1]


def test_decode_yolov8_takes_the_best_class_per_column() -> None:
    pred = np.array(
        [[50, 10], [50, 10], [20, 4], [10, 4], [0.1, 0.2], [0.6, 0.1]], np.float32
    )  # (4+2, 2)
    cand = decode_yolov8(pred, 0.25)
    np.testing.assert_allclose(cand.boxes, [[40, 45, 60, 55]])
    assert cand.class_ids.tolist() == [1]


def test_decode_end2end_keeps_rows_over_conf() -> None:
    pred = np.array([[1, 2, 3, 4, 0.9, 2], [0, 0, 0, 0, 0.0, 0]], np.float32)
    cand = decode_end2end(pred, 0.25)
    np.testing.assert_allclose(cand.boxes, [[1, 2, 3, 4]])
    assert cand.class_ids.tolist() == [2]


# --- NMS ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),  # the same box
        ([0, 0, 10, 10], [5, 0, 15, 10], 50 / 150),  # half overlaps
        ([0, 0, 10, 10], [2, 2, 4, 4], 4 / 100),  # one inside the other
        ([0, 0, 10, 10], [10, 0, 20, 10], 0.0),  # touching edges
        ([0, 0, 10, 10], [30, 30, 40, 40], 0.0),  # apart
        ([5, 5, 5, 5], [5, 5, 5, 5], 0.0),  # empty boxes: 0, not a division by zero
    ],
)
def test_box_iou_table(a: list[float], b: list[float], want: float) -> None:
    got = box_iou(np.array([a], np.float32), np.array([b], np.float32))
    assert got.shape == (1, 1) and got.dtype == np.float64
    assert got[0, 0] == pytest.approx(want)
    assert box_iou(np.array([b]), np.array([a]))[0, 0] == pytest.approx(want)  # symmetric


def test_box_iou_is_a_matrix_and_takes_empty_sets() -> None:
    a = np.array([[0, 0, 10, 10], [0, 0, 20, 20]], np.float32)
    b = np.array([[0, 0, 10, 10], [10, 10, 20, 20], [100, 100, 110, 110]], np.float32)
    np.testing.assert_allclose(box_iou(a, b), [[1, 0, 0], [0.25, 0.25, 0]])
    assert box_iou(a, b[:0]).shape == (2, 0) and box_iou(a[:0], b).shape == (0, 3)


def reference_nms(
    boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_thr: float, max_det: int
) -> list[int]:
    """Straightforward greedy NMS, one pair at a time."""

    def iou(a: list[float], b: list[float]) -> float:
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return inter / union if union > 0 else 0.0

    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    keep: list[int] = []
    for i in order:
        if len(keep) == max_det:
            break
        if all(
            classes[k] != classes[i] or iou(boxes[i].tolist(), boxes[k].tolist()) <= iou_thr
            for k in keep
        ):
            keep.append(i)
    return keep


def random_boxes(seed: int, n: int, n_classes: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 200, (n, 2))
    wh = rng.uniform(5, 80, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    return boxes, rng.random(n).astype(np.float32), rng.integers(0, n_classes, n)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize(("iou_thr", "n_classes"), [(0.45, 1), (0.7, 1), (0.5, 3), (0.1, 2)])
def test_nms_matches_reference(seed: int, iou_thr: float, n_classes: int) -> None:
    boxes, scores, classes = random_boxes(seed, 300, n_classes)
    keep = nms(boxes, scores, classes, iou_thr, max_det=1000)
    assert keep.tolist() == reference_nms(boxes, scores, classes, iou_thr, 1000)
    assert len(keep) < len(boxes)  # the case is not trivial: something was suppressed


def test_nms_is_class_aware_and_stops_at_max_det() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    classes = np.array([0, 0, 1, 0])
    assert nms(boxes, scores, classes, 0.5).tolist() == [0, 2, 3]
    assert nms(boxes, scores, classes, 0.5, max_det=2).tolist() == [0, 2]
    assert nms(boxes[:0], scores[:0], classes[:0], 0.5).tolist() == []


# --- everything together -----------------------------------------------------------------


def test_postprocess_batch_rescales_and_uses_per_image_conf() -> None:
    lb = Letterbox(scale=2.0, pad_x=0, pad_y=80, width=320, height=240)
    # v8 layout, 1 class, 3 predictions: two overlapping (suppressed at IoU 0.7), one weak
    pred = np.array(
        [
            [150, 152, 400],
            [230, 232, 300],
            [100, 100, 40],
            [100, 100, 40],
            [0.9, 0.8, 0.3],
        ],
        np.float32,
    )
    raw = np.stack([pred, pred])
    out = postprocess_batch(raw, "yolov8", [lb, lb], conf=[None, 0.5])
    np.testing.assert_allclose(out[0].xyxy, [[50, 50, 100, 100], [190, 100, 210, 120]])
    np.testing.assert_allclose(out[0].confidence, [0.9, 0.3])
    np.testing.assert_allclose(out[1].xyxy, [[50, 50, 100, 100]])


def test_postprocess_batch_end2end_skips_nms_and_caps_max_det() -> None:
    lb = Letterbox(scale=1.0, pad_x=0, pad_y=0, width=640, height=640)
    rows = np.array([[0, 0, 10, 10, 0.9, 0], [0, 0, 10, 10, 0.8, 0], [5, 5, 9, 9, 0.7, 0]])
    out = postprocess_batch(rows[None].astype(np.float32), "end2end", [lb], max_det=2)
    np.testing.assert_allclose(out[0].xyxy, [[0, 0, 10, 10], [0, 0, 10, 10]])


def test_postprocess_batch_drops_boxes_entirely_in_the_padding() -> None:
    lb = Letterbox(scale=2.0, pad_x=0, pad_y=80, width=320, height=240)
    pred = np.array([[100], [20], [40], [20], [0.9]], np.float32)  # y in 10..30: padding
    (out,) = postprocess_batch(pred[None], "yolov8", [lb])
    assert len(out) == 0


def test_layout_defaults_follow_upstream() -> None:
    assert LAYOUT_DEFAULTS == {
        "yolov5": (0.25, 0.45),
        "yolov8": (0.25, 0.7),
        "end2end": (0.25, None),
    }
