"""``DetectionResult`` dicts, exactly as ``schemas/DetectionResult.avsc`` and INTERFACES.md,
and the ``ImageRequest`` dict that asks for one (``schemas/ImageRequest.avsc``)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol, TypedDict, cast

from core.runtime.errors import QrsightError
from schemas.names import STATUS_ERROR, STATUS_EXPIRED

EXPIRED_CODE = "deadline_expired"


class ErrorInfo(TypedDict):
    code: str
    message: str


class ImageSize(TypedDict):
    width: int
    height: int


class ModelRecord(TypedDict):
    name: str
    version: str
    input_size: int


class DetectionRecord(TypedDict):
    x1: float
    y1: float
    x2: float
    y2: float
    confidence: float
    class_id: int
    label: str
    text: str | None
    corners: list[dict[str, float]] | None


class Timings(TypedDict):
    queue_ms: float
    decode_ms: float
    infer_ms: float
    post_ms: float
    total_ms: float


class DetectionResult(TypedDict):
    """One ``DetectionResult`` record (``schemas/DetectionResult.avsc``), as the worker
    publishes it, the codec decodes it and the API, the CLIs and the tests read it."""

    request_id: str
    source: str | None
    status: str  # schemas.names.STATUS_OK | STATUS_ERROR | STATUS_EXPIRED
    error: ErrorInfo | None
    image: ImageSize | None
    model: ModelRecord | None
    detections: list[DetectionRecord]
    timings: Timings
    created_at: int


def error_code(result: DetectionResult | Mapping[str, Any]) -> str | None:
    """The result's error code (``None`` for an ``OK`` result): one reading for every caller
    instead of ``(result.get("error") or {}).get("code")``."""
    error = result.get("error")
    return None if not error else str(error["code"])


class ModelFacts(Protocol):
    """What a result needs of a model (``core.vision.detections.ModelInfo`` is one)."""

    def to_record(self) -> ModelRecord: ...


TIMING_KEYS = ("queue_ms", "decode_ms", "infer_ms", "post_ms", "total_ms")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def image_request(
    request_id: str,
    image: bytes | bytearray,
    *,
    source: str | None = None,
    content_type: str = "",
    options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """An ``ImageRequest`` record, submitted now (``submitted_at`` starts its queue time)."""
    return {
        "request_id": request_id,
        "source": source,
        "image": image,
        "content_type": content_type,
        "submitted_at": now_ms(),
        "options": None if options is None else dict(options),
    }


def timings(**values: float) -> Timings:
    """The ``timings`` record: every key present (0.0 when not measured), rounded to µs."""
    unknown = set(values) - set(TIMING_KEYS)
    if unknown:
        raise ValueError(f"unknown timing keys: {sorted(unknown)}")
    return cast(Timings, {k: round(float(values.get(k, 0.0)), 3) for k in TIMING_KEYS})


def base_record(
    request_id: str,
    source: str | None,
    status: str,
    timing: Mapping[str, float] | None,
    created_at_ms: int | None,
) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "source": source,
        "status": status,
        "error": None,
        "image": None,
        "model": None,
        "detections": [],
        "timings": timings(**(timing or {})),
        "created_at": now_ms() if created_at_ms is None else created_at_ms,
    }


def error_record(
    request_id: str,
    source: str | None,
    error: QrsightError,
    *,
    timing: Mapping[str, float] | None = None,
    model: ModelFacts | None = None,
    created_at_ms: int | None = None,
) -> dict[str, Any]:
    """An ``ERROR`` result carrying the error's stable ``code`` and its message."""
    record = base_record(request_id, source, STATUS_ERROR, timing, created_at_ms)
    record["error"] = {"code": error.code, "message": error.message}
    record["model"] = None if model is None else model.to_record()
    return record


def expired_record(
    request_id: str,
    source: str | None,
    *,
    deadline_ms: int | None = None,
    queue_ms: float = 0.0,
    created_at_ms: int | None = None,
) -> dict[str, Any]:
    """An ``EXPIRED`` result: the request's deadline passed before the model ran."""
    record = base_record(request_id, source, STATUS_EXPIRED, {"queue_ms": queue_ms}, created_at_ms)
    record["timings"]["total_ms"] = record["timings"]["queue_ms"]
    late = "" if deadline_ms is None else f" (deadline {deadline_ms}, now {record['created_at']})"
    record["error"] = {
        "code": EXPIRED_CODE,
        "message": f"the request's deadline passed before it was processed{late}",
    }
    return record
