"""``/``: the page to try qrsight in a browser (plain HTML and JS, no build step).

It posts the picked image to ``/api/v1/detect`` and draws the boxes, confidences and
payloads on a canvas; errors are shown in words.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, send_from_directory

STATIC = Path(__file__).resolve().parent / "static"

bp = Blueprint("web", __name__)


@bp.get("/")
def index() -> Response:
    response = send_from_directory(STATIC, "index.html", max_age=0)
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' blob: data:; "
        "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'"
    )
    return response
