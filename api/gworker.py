"""The gunicorn worker class of the API: gthread, with every connection's reads paced.

gunicorn's gthread worker waits for a new connection's first byte in its poller, but once
the first byte has come, a pool thread reads the request line and the headers with no
bound at all: a client that sends one header byte every few seconds holds that thread for
ever, and ``QRSIGHT_API_THREADS`` such clients take every thread of the worker, the probes'
too. gunicorn has no setting for it (``timeout`` is the worker's heartbeat,
``limit_request_*`` bound sizes, not time). This class wraps each connection's socket in an
:class:`api.pace.PacedSocket`: the headers must arrive within ``HEADER_TIMEOUT_S`` (else
408 and the connection is closed) and the body at the pace of :data:`api.pace.BODY`.

Kept small on purpose: gunicorn's master imports it (no Flask, no prometheus_client here).
TLS connections keep gunicorn's own socket (the API runs behind a proxy that terminates TLS).
"""

from __future__ import annotations

import logging
from typing import Any

from gunicorn.workers.gthread import ThreadWorker

from api.pace import BODY, HEADERS, HeadersTooSlowError, PacedSocket
from api.protocol_errors import json_error

logger = logging.getLogger(__name__)

REFUSAL_SEND_TIMEOUT_S = 1.0


class PacedThreadWorker(ThreadWorker):
    """gthread with paced reads (see the module docstring)."""

    def enqueue_req(self, conn: Any) -> None:
        if not self.cfg.is_ssl and not isinstance(conn.sock, PacedSocket):
            conn.sock = PacedSocket(conn.sock)
        super().enqueue_req(conn)

    def handle(self, conn: Any) -> Any:
        sock = conn.sock
        if isinstance(sock, PacedSocket):
            sock.start(HEADERS)
        try:
            return super().handle(conn)
        finally:
            if isinstance(sock, PacedSocket) and sock.pace is HEADERS:
                sock.start(None)

    def handle_request(self, req: Any, conn: Any) -> Any:
        if isinstance(conn.sock, PacedSocket):
            conn.sock.start(BODY)
        return super().handle_request(req, conn)

    def handle_error(self, req: Any, client: Any, addr: Any, einfo: BaseException) -> None:
        """A request whose headers came too slowly: 408, then gunicorn closes the connection."""
        if isinstance(einfo, HeadersTooSlowError):
            self.log.warning("request headers too slow client=%s reason=%s", addr, einfo)
            try:
                client.settimeout(REFUSAL_SEND_TIMEOUT_S)
                client.sendall(json_error(408, "Request Timeout", str(einfo)))
            except OSError:
                pass
            return
        super().handle_error(req, client, addr, einfo)
