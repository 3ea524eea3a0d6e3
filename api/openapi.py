"""The OpenAPI 3 document (``api/openapi.json``, kept by hand next to the routes)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, jsonify

DOCUMENT = Path(__file__).with_name("openapi.json")

bp = Blueprint("openapi", __name__, url_prefix="/api/v1")


@cache
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DOCUMENT.read_text())
    return loaded


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(document())
