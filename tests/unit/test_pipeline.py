"""The shared pipeline: bytes in, one DetectionResult dict per job out, in order."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import segno

from core.runtime.errors import CorruptImageError, ModelError
from core.runtime.results import TIMING_KEYS, error_record, expired_record, now_ms
from core.runtime.settings import Settings, load_settings
from core.vision.pipeline import ImageJob, Pipeline, qr_class
from tests.unit.onnx_models import (
    make_dark_cell_model,
    make_fixed_output_model,
    make_single_image_model,
    with_metadata,
)

RESULT_KEYS = {
    "request_id", "source", "status", "error", "image", "model", "detections", "timings",
    "created_at",
}  # fmt: skip
DETECTION_KEYS = {"x1", "y1", "x2", "y2", "confidence", "class_id", "label", "text", "corners"}
PAYLOAD = "https://example.org/qrsight?id=42"


def encode(image: np.ndarray, ext: str = ".png") -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def square_image(
    size: int = 320, square: tuple[int, int] = (64, 128), value: int = 0
) -> np.ndarray:
    """White, with a black square from ``square[0]`` to ``square[1]`` on both axes."""
    image = np.full((size, size, 3), 255, np.uint8)
    image[square[0] : square[1], square[0] : square[1]] = 0
    return image


def qr_image() -> np.ndarray:
    """640x640 white with a QR code (modules 8 px) whose symbol spans 232..400."""
    buf = io.BytesIO()
    segno.make(PAYLOAD, error="m", micro=False).save(buf, kind="png", scale=8, border=0)
    code = cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_COLOR)
    image = np.full((640, 640, 3), 255, np.uint8)
    image[232 : 232 + code.shape[0], 232 : 232 + code.shape[1]] = code
    return image


@pytest.fixture(scope="module")
def dark_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dark_cell_model(tmp_path_factory.mktemp("m") / "dark.onnx")


@pytest.fixture
def settings(dark_model: Path) -> Settings:
    return load_settings({}, model_path=dark_model, max_image_side=1000, decode_payloads=False)


def run(settings: Settings, jobs: list[ImageJob]) -> list[dict[str, Any]]:
    with Pipeline(settings) as pipeline:
        return pipeline.run(jobs)


def test_mixed_good_and_bad_jobs_keep_their_order(settings: Settings) -> None:
    good = encode(square_image())
    jpeg = encode(square_image(size=200), ".jpg")
    jobs = [
        ImageJob("good", good, source="a.png"),
        ImageJob("text", b"hello, I am not an image\n", source="notes.txt"),
        ImageJob("truncated", jpeg[: len(jpeg) // 2]),
        ImageJob("empty", b""),
        ImageJob("good-jpeg", jpeg),
        ImageJob("huge", encode(np.zeros((10, 1200, 3), np.uint8))),
    ]
    results = run(settings, jobs)
    assert [r["request_id"] for r in results] == [j.request_id for j in jobs]
    assert [r["status"] for r in results] == ["OK", "ERROR", "ERROR", "ERROR", "OK", "ERROR"]
    codes = [r["error"]["code"] if r["error"] else None for r in results]
    assert codes == [
        None,
        "unsupported_type",
        "corrupt_image",
        "empty_image",
        None,
        "image_too_large",
    ]
    for r in results:
        assert set(r) == RESULT_KEYS and set(r["timings"]) == set(TIMING_KEYS)
    ok, bad = results[0], results[1]
    assert ok["source"] == "a.png" and ok["image"] == {"width": 320, "height": 320}
    assert ok["model"] == {"name": "dark-cell test model", "version": "0.0-test", "input_size": 640}
    assert ok["detections"] and all(set(d) == DETECTION_KEYS for d in ok["detections"])
    assert bad["image"] is None and bad["detections"] == [] and bad["error"]["message"]
    assert results[4]["image"] == {"width": 200, "height": 200}


def test_boxes_are_in_original_pixels(settings: Settings) -> None:
    """A black square 64..128 in a 320x320 image: one 16 px cell box per covered cell."""
    (result,) = run(settings, [ImageJob("r", encode(square_image()))])
    boxes = np.array([[d[k] for k in ("x1", "y1", "x2", "y2")] for d in result["detections"]])
    assert len(boxes) == 16
    assert np.allclose(boxes[:, 2:] - boxes[:, :2], 16)
    assert np.allclose([boxes[:, 0].min(), boxes[:, 1].min()], 64)
    assert np.allclose([boxes[:, 2].max(), boxes[:, 3].max()], 128)
    assert all(d["confidence"] > 0.9 and d["label"] == "qr" for d in result["detections"])


def test_chunks_of_max_batch_give_the_same_boxes(settings: Settings) -> None:
    jobs = [
        ImageJob(str(i), encode(square_image(size=160 + 40 * i, square=(20 * i, 20 * i + 64))))
        for i in range(5)
    ]
    whole = run(settings, jobs)
    chunked = run(settings.model_copy(update={"max_batch": 2}), jobs)
    assert [r["detections"] for r in chunked] == [r["detections"] for r in whole]
    infer = [r["timings"]["infer_ms"] for r in chunked]
    assert infer[0] == infer[1] and infer[2] == infer[3]  # one run per chunk of two
    assert all(v > 0 for v in infer)


def test_job_conf_overrides_the_settings(settings: Settings) -> None:
    image = square_image()
    image[192:256, 192:256] = 128  # mid grey: darkness ~0.5, 16 more cells
    data = encode(image)
    default, strict = run(settings, [ImageJob("d", data), ImageJob("s", data, conf=0.6)])
    assert len(default["detections"]) == 32
    assert len(strict["detections"]) == 16


def test_queue_and_total_time_from_submission(settings: Settings) -> None:
    submitted = now_ms() - 5000
    (result,) = run(settings, [ImageJob("q", encode(square_image()), submitted_at_ms=submitted)])
    t = result["timings"]
    assert 5000 <= t["queue_ms"] < 60_000
    assert t["total_ms"] >= t["queue_ms"] + t["decode_ms"] + t["infer_ms"]
    assert t["decode_ms"] > 0 and t["post_ms"] > 0


def test_payloads_are_read_per_job_or_settings(tmp_path: Path) -> None:
    # one box around the code: (232, 232)..(232+L, 232+L) for an L px symbol
    side = 232 + segno.make(PAYLOAD, error="m", micro=False).symbol_size(scale=8, border=0)[0]
    box = np.zeros((5, 8400), np.float32)
    box[:, 0] = [(232 + side) / 2, (232 + side) / 2, side - 232, side - 232, 0.9]
    model = make_fixed_output_model(tmp_path / "box.onnx", box, "yolov8")
    data = encode(qr_image())
    on = load_settings({}, model_path=model)
    off = on.model_copy(update={"decode_payloads": False})
    read, skipped = run(on, [ImageJob("a", data), ImageJob("b", data, decode=False)])
    (forced,) = run(off, [ImageJob("c", data, decode=True)])
    assert read["detections"][0]["text"] == PAYLOAD
    corners = read["detections"][0]["corners"]
    assert corners is not None and len(corners) == 4
    assert np.allclose([corners[0]["x"], corners[0]["y"]], 232, atol=3)  # top-left first
    assert skipped["detections"][0]["text"] is None
    assert forced["detections"][0]["text"] == PAYLOAD


def test_a_payload_reader_failure_keeps_the_box(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Payload reading is best effort: if the reader raises, the image is still OK with
    its box (no payload), and the log names the request."""
    box = np.zeros((5, 8400), np.float32)
    box[:, 0] = [320, 320, 160, 160, 0.9]
    model = make_fixed_output_model(tmp_path / "box.onnx", box, "yolov8")

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("reader bug")

    monkeypatch.setattr("core.vision.pipeline.read_payloads", broken)
    settings = load_settings({}, model_path=model, verifier_path="off")
    (result,) = run(settings, [ImageJob("r-1", encode(qr_image()))])
    assert result["status"] == "OK"
    assert len(result["detections"]) == 1 and result["detections"][0]["text"] is None
    assert "payload reading failed request_id=r-1" in caplog.text


def test_a_model_failure_raises_model_error(tmp_path: Path) -> None:
    settings = load_settings({}, model_path=make_single_image_model(tmp_path / "one.onnx"))
    good = encode(square_image())
    assert run(settings, [ImageJob("1", good)])[0]["status"] == "OK"
    with pytest.raises(ModelError, match="ONNX Runtime failed"):
        run(settings, [ImageJob("1", good), ImageJob("2", good)])


def test_no_jobs_no_results(settings: Settings) -> None:
    assert run(settings, []) == []


def test_error_and_expired_records() -> None:
    err = error_record("r1", "s", CorruptImageError("bad bytes"))
    assert err["status"] == "ERROR" and err["error"] == {
        "code": "corrupt_image",
        "message": "bad bytes",
    }
    assert set(err) == RESULT_KEYS and err["created_at"] > 0
    expired = expired_record("r2", None, deadline_ms=1, queue_ms=12.5)
    assert expired["status"] == "EXPIRED" and expired["error"]["code"] == "deadline_expired"
    assert expired["timings"]["queue_ms"] == 12.5 and expired["detections"] == []


@pytest.mark.parametrize(
    ("labels", "qr"),
    [
        ({0: "qr"}, 0),
        ({}, 0),
        ({0: "person", 1: "car"}, None),  # not a QR model: whole-image reads add nothing
        ({0: "barcode", 1: "QR-code"}, 1),
        ({0: "text"}, 0),  # the only class of a one-class detector
    ],
)
def test_qr_class_of_a_model(labels: dict[int, str], qr: int | None) -> None:
    assert qr_class(labels) == qr


def blurred_qr_job(tmp_path: Path) -> tuple[ImageJob, Path, str]:
    """A 640x640 image with a defocused code the standard reads miss, and a model that
    boxes it (score 0.5)."""
    from tests.unit.qr_factory import CodeSpec, scene

    text = "https://example.org/blurred?id=7"
    image, codes = scene([CodeSpec(text, (320, 320), 5, angle=10)], size=(640, 640))
    image = cv2.GaussianBlur(image, (0, 0), 2.8)
    x1, y1, x2, y2 = codes[0].xyxy
    pad = 0.05 * (x2 - x1)
    out = np.zeros((5, 8400), np.float32)
    out[:, 0] = [(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1 + 2 * pad, y2 - y1 + 2 * pad, 0.5]
    model = make_fixed_output_model(tmp_path / "box.onnx", out, "yolov8")
    return ImageJob("blurred", encode(image)), model, text


@pytest.mark.parametrize(
    ("calibration", "want"),
    [
        ("[0.0, 0.0, 20.0]", "read"),  # judged a sure code: read harder, reported at 1.0
        ("[0.0, 0.0, -20.0]", "dropped"),  # judged no code: not read harder, dropped
    ],
)
def test_harder_reads_go_to_the_boxes_the_verifier_finds_plausible(
    tmp_path: Path, calibration: str, want: str
) -> None:
    from core.runtime.settings import DEFAULT_VERIFIER

    job, model, text = blurred_qr_job(tmp_path)
    verifier = with_metadata(
        DEFAULT_VERIFIER, tmp_path / "v.onnx", calibration=calibration, detector_sha256=None
    )
    settings = load_settings({}, model_path=model, verifier_path=verifier, read_whole_image=False)
    (result,) = run(settings, [job])
    if want == "read":
        assert [(d["text"], d["confidence"]) for d in result["detections"]] == [(text, 1.0)]
    else:
        assert result["detections"] == []


def test_without_a_verifier_every_unread_box_is_read_harder(tmp_path: Path) -> None:
    job, model, text = blurred_qr_job(tmp_path)
    settings = load_settings({}, model_path=model, verifier_path="off", read_whole_image=False)
    (result,) = run(settings, [job])
    assert [d["text"] for d in result["detections"]] == [text]
    assert result["detections"][0]["confidence"] == pytest.approx(0.5)  # the detector's


def test_large_jpeg_same_answer_with_reduced_decode(dark_model: Path) -> None:
    """A 2560x2560 JPEG (4x the QR scene) is decoded at 1/2 for the 640 model when
    QRSIGHT_REDUCED_DECODE is on: same boxes, size and payload, in the sent image's pixels."""
    big = cv2.resize(qr_image(), None, fx=4, fy=4, interpolation=cv2.INTER_NEAREST)
    data = encode(big, ".jpg")
    results = {}
    for reduced in (False, True):
        settings = load_settings({}, model_path=dark_model, reduced_decode=reduced)
        (results[reduced],) = run(settings, [ImageJob("big", data)])
    full, small = results[False], results[True]
    assert small["status"] == full["status"] == "OK"
    assert small["image"] == full["image"] == {"width": 2560, "height": 2560}
    assert small["timings"]["decode_ms"] < full["timings"]["decode_ms"]
    assert [d["text"] for d in small["detections"]] == [d["text"] for d in full["detections"]]
    assert PAYLOAD in [d["text"] for d in small["detections"]]

    def boxes(r: dict[str, Any]) -> np.ndarray:
        return np.array([[d[k] for k in ("x1", "y1", "x2", "y2")] for d in r["detections"]])

    assert np.allclose(boxes(small), boxes(full), atol=2)
    (code,) = [d for d in small["detections"] if d["text"]]
    (ref,) = [d for d in full["detections"] if d["text"]]

    def xy(points: list[dict[str, float]]) -> np.ndarray:
        return np.array([[p["x"], p["y"]] for p in points])

    assert np.allclose(xy(code["corners"]), xy(ref["corners"]), atol=8)
