"""One logging setup for every qrsight process: ``key=value`` text (default) or JSON lines.

Each entry point calls :func:`configure_logging` once (the API's gunicorn workers and
gunicorn's own loggers, the detection workers, the tools); ``QRSIGHT_LOG_FORMAT`` picks
the format, ``QRSIGHT_LOG_LEVEL`` the level. Both go to stderr.

Request fields: code serving a request binds its ``request_id`` and ``trace_id`` with
:func:`log_fields` (or :func:`bind`/:func:`unbind`); every line logged meanwhile in that
thread carries them (text: `` request_id=… trace_id=…`` at the end; JSON: keys). A
field passed with ``extra=`` wins over the bound one.

Secrets: the values of the settings' secret fields (:func:`secret_values`) are masked
in every line, whatever logged them, as a last line of defence.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from types import MappingProxyType
from typing import IO, TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from core.runtime.settings import Settings

LogFormat = Literal["text", "json"]
FIELDS = ("request_id", "trace_id")
MASK = "***"
MIN_SECRET_LEN = 6  # shorter values would mask ordinary words; such secrets are unsafe anyway

_EMPTY: Mapping[str, str] = MappingProxyType({})
_fields: ContextVar[Mapping[str, str]] = ContextVar("qrsight_log_fields", default=_EMPTY)
# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


# --- request fields -------------------------------------------------------------------------
def bind(**fields: str | None) -> Token[Mapping[str, str]]:
    """Add fields to every line logged from here in this context; :func:`unbind` ends it."""
    merged = {**_fields.get(), **{k: v for k, v in fields.items() if v}}
    return _fields.set(MappingProxyType(merged))


def unbind(token: Token[Mapping[str, str]]) -> None:
    _fields.reset(token)


@contextmanager
def log_fields(**fields: str | None) -> Iterator[None]:
    token = bind(**fields)
    try:
        yield
    finally:
        unbind(token)


def bound() -> Mapping[str, str]:
    """The fields bound in this context."""
    return _fields.get()


# --- formatting -----------------------------------------------------------------------------
def _extras(record: logging.LogRecord) -> dict[str, Any]:
    """Fields of the line: the bound ones, then the record's own ``extra=`` ones."""
    found: dict[str, Any] = dict(_fields.get())
    for key, value in vars(record).items():
        if key not in _STANDARD and not key.startswith("_") and value is not None:
            found[key] = value
    return found


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


class _Masking(logging.Formatter):
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = sorted(
            {s for s in secrets if s and len(s) >= MIN_SECRET_LEN}, key=len, reverse=True
        )

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text


class TextFormatter(_Masking):
    """``ts=… level=… logger=… pid=… message [key=value …]`` on one line (tracebacks follow)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        parts = [
            f"ts={_timestamp(record)} level={record.levelname} logger={record.name} "
            f"pid={record.process} {message}"
        ]
        for key, value in _extras(record).items():
            pair = f"{key}={value}"
            if pair not in message:
                parts.append(pair)
        text = " ".join(parts)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return self.mask(text)


class JsonFormatter(_Masking):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``pid``, ``message``, the
    request fields and any ``extra=`` fields, ``exception`` with the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "thread": record.threadName,
            "message": record.getMessage(),
        }
        line.update(_extras(record))
        if record.exc_info:
            line["exception"] = "".join(traceback.format_exception(*record.exc_info))
        if record.stack_info:
            line["stack"] = record.stack_info
        return self.mask(json.dumps(line, default=str, ensure_ascii=False))


def formatter(fmt: LogFormat | str, secrets: Iterable[str] = ()) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(secrets)
    if fmt == "text":
        return TextFormatter(secrets)
    raise ValueError(f"unknown log format {fmt!r} (text, json)")


def handler(
    fmt: LogFormat | str = "text", secrets: Iterable[str] = (), stream: IO[str] | None = None
) -> logging.Handler:
    """A stderr handler with qrsight's format (also what gunicorn's loggers get)."""
    out = logging.StreamHandler(sys.stderr if stream is None else stream)
    out.setFormatter(formatter(fmt, secrets))
    return out


def configure_logging(
    level: str = "INFO",
    fmt: LogFormat | str = "text",
    *,
    secrets: Iterable[str] = (),
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Send the root logger's records to one stderr handler; call once per process."""
    out = handler(fmt, secrets, stream)
    root = logging.getLogger()
    root.handlers[:] = [out]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # Python warnings become log lines in the same format
    return out


def configure_from_settings(
    settings: Settings, level: str | None = None, **kwargs: Any
) -> logging.Handler:
    """:func:`configure_logging` with the format and secrets of ``settings`` and its level
    (or ``level``: the CLIs that print results keep to warnings)."""
    return configure_logging(
        level or settings.log_level,
        settings.log_format,
        secrets=secret_values(settings),
        **kwargs,
    )


def secret_values(settings: Settings) -> list[str]:
    """Every secret a log line must not show: the ``SecretStr`` settings (and the password
    half of a ``user:password`` one) and passed-through librdkafka passwords or secrets."""
    from pydantic import SecretStr

    found: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            text = value.get_secret_value()
            found.append(text)
            if ":" in text:
                found.append(text.split(":", 1)[1])
    from core.runtime.settings import is_secret_property

    for prop, value in settings.kafka_extra_values().items():
        if is_secret_property(prop):
            found.append(value)
    return [s for s in found if s]
