"""What a worker's pipeline may report per image: never more than ``max_detections``."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import segno

from core.runtime.settings import load_settings
from core.vision.pipeline import ImageJob, Pipeline
from tests.unit.onnx_models import make_fixed_output_model


def three_codes() -> bytes:
    """White 900x300 with three different QR codes side by side."""
    image = np.full((300, 900, 3), 255, np.uint8)
    for i in range(3):
        buf = io.BytesIO()
        segno.make(f"code-{i}", error="m", micro=False).save(buf, kind="png", scale=6, border=4)
        code = cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_COLOR)
        h, w = code.shape[:2]
        image[40 : 40 + h, 40 + 300 * i : 40 + 300 * i + w] = code
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def test_the_whole_image_read_cannot_push_detections_past_max_detections(tmp_path: Path) -> None:
    none = np.zeros((5, 8400), np.float32)  # the detector finds nothing
    model = make_fixed_output_model(tmp_path / "none.onnx", none, "yolov8")
    settings = load_settings(
        {}, model_path=model, verifier_path="off", read_whole_image=True, max_detections=2
    )
    with Pipeline(settings) as pipeline:
        (result,) = pipeline.run([ImageJob("r", three_codes())])
    texts = [d["text"] for d in result["detections"]]
    assert len(texts) == 2, texts
    assert set(texts) <= {"code-0", "code-1", "code-2"}
