"""One root error; each subclass carries a stable ``code`` and the HTTP status it maps to.

The API maps these in one error handler; the workers put ``code`` and ``message``
into the ``ERROR`` result and the DLQ headers. Codes are part of the contract:
never rename one.
"""

from __future__ import annotations

from typing import Any


class QrsightError(Exception):
    """Root of every error qrsight raises on purpose."""

    code: str = "internal_error"
    http_status: int = 500

    def __init__(self, message: str, *, request_id: str | None = None, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.context = context

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "request_id": self.request_id}


class ConfigError(QrsightError):
    """A setting or file is wrong; the message names the one to fix."""

    code = "config_error"


class BadRequestError(QrsightError):
    code = "bad_request"
    http_status = 400


class EmptyImageError(BadRequestError):
    code = "empty_image"


class CorruptImageError(BadRequestError):
    code = "corrupt_image"


class BadMessageError(BadRequestError):
    """A Kafka value that is neither a valid ImageRequest nor a raw image."""

    code = "bad_message"


class BadReplyRouteError(BadRequestError):
    """``reply_topic``/``reply_partition`` headers that point anywhere but a partition of
    the configured replies topic (a producer must not choose where a worker writes)."""

    code = "bad_reply_route"


class UnsupportedTypeError(QrsightError):
    code = "unsupported_type"
    http_status = 415


class ImageTooLargeError(QrsightError):
    """Too many bytes, or a side or pixel count over the limits."""

    code = "image_too_large"
    http_status = 413


class MessageTooLargeError(QrsightError):
    """A Kafka record over the size limit that ``QRSIGHT_MAX_IMAGE_BYTES`` sets."""

    code = "message_too_large"
    http_status = 413


class UnauthorizedError(QrsightError):
    code = "unauthorized"
    http_status = 401


class RateLimitedError(QrsightError):
    code = "rate_limited"
    http_status = 429


class KafkaUnavailableError(QrsightError):
    code = "kafka_unavailable"
    http_status = 503


class ReplyTimeoutError(QrsightError):
    code = "timeout"
    http_status = 504


class ModelError(QrsightError):
    """The model could not be loaded or run: not the input's fault, so never a DLQ case."""

    code = "model_error"


class QuarantinedError(QrsightError):
    """A message that failed every retry while the messages around it (or a known-good
    canary image) went through: isolated and copied to the DLQ so its partition moves on."""

    code = "quarantined"


class UndeliverableError(BadRequestError):
    """The broker refused this image's result for good (too large, invalid record)."""

    code = "result_undeliverable"


def all_error_classes() -> list[type[QrsightError]]:
    """:class:`QrsightError` and every subclass defined so far (adapters' too)."""
    found: list[type[QrsightError]] = []
    pending: list[type[QrsightError]] = [QrsightError]
    while pending:
        cls = pending.pop(0)
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def error_classes() -> dict[str, type[QrsightError]]:
    """Stable code → error class (a base class wins over a subclass reusing its code)."""
    found: dict[str, type[QrsightError]] = {}
    for cls in all_error_classes():
        found.setdefault(cls.code, cls)
    return found


def error_for_code(code: str, message: str, request_id: str | None = None) -> QrsightError:
    """The error a stable ``code`` names (e.g. from an ``ERROR`` result), with ``message``.

    An unknown code (a newer worker's) keeps its code on a plain :class:`QrsightError`.
    """
    cls = error_classes().get(code)
    if cls is not None:
        return cls(message, request_id=request_id)
    error = QrsightError(message, request_id=request_id)
    error.code = code
    return error
