"""Logging with the request id on every line logged while a request is served."""

from __future__ import annotations

import logging

from flask import g, has_request_context

FORMAT = "%(asctime)s %(levelname)s %(name)s request_id=%(request_id)s %(message)s"


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (``-`` outside a request) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = g.get("request_id") if has_request_context() else None
        record.request_id = rid or "-"
        return True


def configure_logging(level: str) -> None:
    """Configure the root logger once, at the entry point."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
