"""What one app instance holds: its settings, reply client, limits, verifier and admission."""

from __future__ import annotations

from dataclasses import dataclass

from flask import current_app

from api.admission import Admission
from api.auth import JwtVerifier
from api.replies import ReplyClient
from core.runtime.settings import Settings
from core.vision.images import ImageLimits

EXTENSION = "qrsight"


@dataclass(frozen=True)
class ApiState:
    settings: Settings
    replies: ReplyClient
    limits: ImageLimits
    verifier: JwtVerifier | None
    admission: Admission


def api_state() -> ApiState:
    state: ApiState = current_app.extensions[EXTENSION]
    return state
