"""Liveness and readiness."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from api.state import api_state
from core.runtime.errors import KafkaUnavailableError

bp = Blueprint("health", __name__, url_prefix="/api/v1")


class NotReadyError(KafkaUnavailableError):
    code = "not_ready"


@bp.get("/health")
def health() -> Response:
    """The process is alive (it answers); says nothing about Kafka."""
    return jsonify({"status": "alive"})


@bp.get("/ready")
def ready() -> Response:
    """Broker reachable, topics there, reply partition assigned; 503 with the reason if not."""
    state = api_state()
    problems = state.replies.check()
    if problems:
        raise NotReadyError("; ".join(problems))
    return jsonify({"status": "ready", "reply_partition": state.replies.partition})
