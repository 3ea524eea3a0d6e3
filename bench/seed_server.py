"""The seed's serving design, rebuilt here for comparison (bench only, not the product).

The article qrsight grew from serves a YOLO model with ``gunicorn -w 4 -k gevent``: a
Flask app, one ONNX Runtime session per gunicorn worker (ORT's default threads), and one
inference per HTTP request, run inside the request's greenlet. This module is that design,
written from that description; the per-image work is qrsight's own
(:meth:`core.vision.pipeline.Pipeline.run` on a batch of one: decode, letterbox, ONNX Runtime,
NMS and, when asked, payload reading and the crop verifier), so a comparison measures the
serving design and nothing else.

    gunicorn -w 4 -k gevent -b 127.0.0.1:8100 \\
        'bench.seed_server:create_app(model="models/qrsight-qr-v3.onnx")'

``POST /detect`` takes a raw image body or a multipart field ``image`` (``?decode=false``
skips payload reading), and answers the detections as JSON; ``GET /health`` answers 200
once the model is loaded. ``bench/serving.py`` starts it and drives it.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request

from core.runtime.settings import load_settings
from core.vision.pipeline import ImageJob, Pipeline

FALSE = {"0", "false", "no", "off"}


def create_app(model: str | None = None, imgsz: int | None = None, ort_threads: int = 0) -> Flask:
    """The seed's app: one session per process, loaded at import (gunicorn's worker start)."""
    overrides: dict[str, Any] = {
        "max_batch": 1,
        "decode_threads": 1,
        "ort_intra_threads": ort_threads,
        "pad_batch": False,
    }
    if model is not None:
        overrides["model_path"] = Path(model)
    if imgsz is not None:
        overrides["imgsz"] = imgsz
    pipeline = Pipeline(load_settings({}, **overrides))
    app = Flask(__name__)

    @app.get("/health")
    def health() -> Response:
        return jsonify({"status": "ok"})

    @app.post("/detect")
    def detect() -> Response | tuple[Response, int]:
        if request.mimetype == "multipart/form-data":
            upload = request.files.get("image")
            data = upload.read() if upload is not None else b""
        else:
            data = request.get_data(cache=False)
        read = request.args.get("decode", "true").lower() not in FALSE
        result = pipeline.run([ImageJob(uuid.uuid4().hex, data, decode=read)])[0]
        if result["status"] != "OK":
            return jsonify({"error": result["error"]}), 400
        return jsonify({"detections": result["detections"], "timings": result["timings"]})

    return app
