"""A large JPEG decoded at a reduced scale: its header is read once per stage that needs
it (the memory budget of a batch of several, the decode), and the record still reports
the size it was sent at."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import pytest

from core.runtime.settings import load_settings
from core.vision import pipeline as pipeline_module
from core.vision.pipeline import ImageJob, Pipeline
from tests.unit.onnx_models import make_dark_cell_model
from tests.unit.test_pipeline import PAYLOAD, encode, qr_image


def test_reduced_jpeg_reports_its_odd_size_from_the_decode_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large JPEG whose sides do not divide by the reduction reports the size it was sent
    at, read from the header by the pipeline's decode: the record does not probe the bytes
    again (a probe scans a large JPEG's bytes for its scan count, about 2 ms at 4032x3024)."""
    model = make_dark_cell_model(tmp_path / "dark.onnx")
    big = cv2.resize(qr_image(), (2563, 2561), interpolation=cv2.INTER_NEAREST)
    data = encode(big, ".jpg")
    calls: list[int] = []
    real_probe = pipeline_module.probe

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "probe", counting)
    settings = load_settings({}, model_path=model, reduced_decode=True)
    with Pipeline(settings) as pipeline:
        (result,) = pipeline.run([ImageJob("odd", data)])
    assert result["status"] == "OK"
    assert result["image"] == {"width": 2563, "height": 2561}
    assert PAYLOAD in [d["text"] for d in result["detections"]]
    assert len(calls) == 1  # the decode's (a lone image needs no memory-budget probe)
    calls.clear()
    with Pipeline(settings) as pipeline:
        results = pipeline.run([ImageJob("a", data), ImageJob("b", data)])
    assert [r["image"] for r in results] == [{"width": 2563, "height": 2561}] * 2
    assert len(calls) == 4  # per image: the batch's memory budget, then the decode
