"""``POST /api/v1/detect``: validate the image from its header, queue it, await the reply.

Everything that can be refused without a worker is refused before anything is queued:
body size (``MAX_CONTENT_LENGTH``), type by magic bytes, and dimensions read from the
header (so a decompression bomb never reaches Kafka).

The body is read once, into one buffer of its announced size (a multipart file is spooled
to a temporary file by werkzeug first, past 500 KB), and handed to the reply client, which
frees it as soon as the Kafka record is encoded: a request waiting for its reply holds no
copy of its image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import IO, Any, cast

from flask import Blueprint, Response, g, jsonify, request

from api.metrics import DETECT_RESULTS
from api.state import api_state
from core.runtime.errors import (
    BadRequestError,
    KafkaUnavailableError,
    QrsightError,
    ReplyTimeoutError,
    error_classes,
    error_for_code,
)
from core.runtime.errors import all_error_classes as core_error_classes
from core.runtime.results import DetectionResult, error_code
from core.runtime.settings import Settings
from core.vision.images import probe
from schemas.names import STATUS_EXPIRED, STATUS_OK

logger = logging.getLogger(__name__)

bp = Blueprint("detect", __name__, url_prefix="/api/v1")

FIELD = "image"
CHUNK_BYTES = 256 * 1024
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class DetectOptions:
    conf: float | None
    decode: bool
    timeout_s: float


@bp.post("/detect")
def detect() -> Response:
    state = api_state()
    options = parse_options(request.args, state.settings)
    data = read_image()
    # probe() reads any bytes-like buffer; its annotation says bytes
    info = probe(cast(bytes, data), state.limits)
    logger.debug(  # one INFO line per request is enough: app.end_request's
        "detect request format=%s width=%s height=%s bytes=%s",
        info.format,
        info.width,
        info.height,
        len(data),
    )
    result = state.replies.request(
        data,  # consumed: cleared once its Kafka record is encoded
        options.timeout_s,
        content_type=info.content_type,
        conf=options.conf,
        decode=options.decode,
        request_id=g.request_id,
        traceparent=g.span.traceparent,
    )
    check_result(result)
    DETECT_RESULTS.labels("ok").inc()
    return jsonify(reply_body(result))


def parse_options(args: Any, settings: Settings) -> DetectOptions:
    conf = None
    if args.get("conf") not in (None, ""):
        try:
            conf = float(args["conf"])
        except ValueError:
            conf = -1.0
        if not 0.0 <= conf <= 1.0:
            raise BadRequestError(f"conf must be a number in [0, 1], got {args['conf']!r}")
    decode = parse_bool(args.get("decode"), "decode", default=True)
    timeout_ms = settings.api_timeout_ms
    if args.get("timeout_ms") not in (None, ""):
        try:
            timeout_ms = int(args["timeout_ms"])
        except ValueError:
            timeout_ms = 0
        if timeout_ms <= 0:
            raise BadRequestError(
                f"timeout_ms must be a positive integer, got {args['timeout_ms']!r}"
            )
    timeout_ms = min(timeout_ms, settings.api_max_timeout_ms)
    return DetectOptions(conf, decode, timeout_ms / 1000)


def parse_bool(value: str | None, name: str, *, default: bool) -> bool:
    if value in (None, ""):
        return default
    text = value.strip().lower()
    if text in TRUE | FALSE:
        return text in TRUE
    raise BadRequestError(f"{name} must be true or false, got {value!r}")


def read_image() -> bytearray:
    """The image bytes, read once into one buffer: the multipart file field ``image``, else
    the raw body."""
    if request.mimetype == "multipart/form-data":
        upload = request.files.get(FIELD)
        if upload is None:
            raise BadRequestError(f"multipart file field {FIELD!r} is missing")
        stream = upload.stream
        size = stream.seek(0, 2)
        stream.seek(0)
        return read_into(stream, size)
    if request.content_length is not None:
        return read_into(request.stream, request.content_length)
    buffer = bytearray()  # chunked: werkzeug stops it at MAX_CONTENT_LENGTH with 413
    while chunk := request.stream.read(CHUNK_BYTES):
        buffer += chunk
    return buffer  # probe() refuses empty and oversized images with the right codes


def read_into(stream: IO[bytes], size: int) -> bytearray:
    """Exactly ``size`` bytes of ``stream`` (fewer if it ends early), with no extra copy."""
    buffer = bytearray(size)
    filled = 0
    with memoryview(buffer) as view:
        while filled < size:
            got = stream.readinto(view[filled:])  # type: ignore[attr-defined]
            if not got:
                break
            filled += got
    del buffer[filled:]
    return buffer


def error_for(code: str, message: str, request_id: str | None) -> QrsightError:
    """The error for the stable code a worker put into an ERROR result.

    An ERROR result means the input was bad, so a code this API does not know is a 400
    (with the worker's code kept); a known code that is no fault of the input (a model
    that failed) is a 503, to be retried. The code → class lookup is ``core.runtime.errors``'.
    """
    cls = error_classes().get(code)
    if cls is None:
        error = BadRequestError(message, request_id=request_id)
        error.code = code
        return error
    if cls.http_status < 500:
        return error_for_code(code, message, request_id)
    return worker_failed(code, message, request_id)


def worker_failed(code: str, message: str, request_id: str | None) -> QrsightError:
    error = KafkaUnavailableError(f"a worker could not process the image: {message}")
    error.code = code
    error.request_id = request_id
    return error


def all_error_classes() -> list[type[QrsightError]]:
    """Every error the app can raise (the OpenAPI test documents their statuses)."""
    return core_error_classes()


def check_result(result: DetectionResult) -> None:
    """Nothing for an OK result; else the error its status and code name."""
    rid = result.get("request_id")
    status = result.get("status")
    if status == STATUS_OK:
        return
    if status == STATUS_EXPIRED:
        DETECT_RESULTS.labels("expired").inc()
        raise ReplyTimeoutError("the request expired before a worker took it", request_id=rid)
    code = error_code(result) or "internal_error"
    DETECT_RESULTS.labels(code).inc()
    error = result.get("error")
    message = error["message"] if error and error.get("message") else "detection failed"
    raise error_for(code, str(message), rid)


def reply_body(result: DetectionResult) -> dict[str, Any]:
    return {
        "request_id": result["request_id"],
        "image": result.get("image"),
        "results": result.get("detections") or [],
        "timings": result.get("timings"),
        "model": result.get("model"),
    }
