"""How long a client may take to send a request: a deadline for the headers, and for the body
a deadline, a minimum average rate and a longest pause.

A bound on each read alone (a socket timeout) is not a bound on the request: one byte every
9 s never trips a 10 s timeout, and holds a thread, an in-flight slot and a buffer for as
long as the client likes (slow-loris, slow-drip). So the socket a gunicorn worker reads
from is a :class:`PacedSocket`: before every ``recv`` it computes how long the client may
still take from the phase's :class:`Pace`, the bytes received so far and the clock, and
gives the read no more than that.

- **Headers** (request line and header fields): all of them within
  :data:`HEADER_TIMEOUT_S`. Past it the worker answers 408 and closes the connection.
- **Body**: within :data:`BODY_TIMEOUT_S` in all, at an average of at least
  :data:`BODY_MIN_RATE_BYTES_S` after the first :data:`BODY_GRACE_S`, and never silent for
  :data:`BODY_IDLE_TIMEOUT_S`. Past any of them the read fails, which the app answers 400
  and which gives the in-flight slot back.

A 10 MB image needs about 170 KB/s to arrive within the whole-body deadline; a client that
dribbles gets its slot taken back within seconds.

The decisions are :meth:`Pace.wait_s`, a plain function; :class:`PacedSocket` applies them
to a socket; ``api/gworker.py`` puts one under every connection of a gunicorn worker.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 60.0
BODY_GRACE_S = 5.0
BODY_MIN_RATE_BYTES_S = 16 * 1024
BODY_IDLE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Pace:
    """What a client must keep to while sending one phase of a request."""

    what: str  # "headers" or "body", for messages
    total_s: float  # the whole phase
    min_rate: float = 0.0  # bytes/s on average once the grace has passed (0: none)
    grace_s: float = 0.0
    idle_s: float | None = None  # longest pause between bytes (None: only the above)

    def wait_s(self, elapsed_s: float, received: int) -> float:
        """Seconds the next read may wait, ``elapsed_s`` into the phase with ``received``
        bytes in; zero or less: the client is too slow."""
        left = self.total_s - elapsed_s
        if self.min_rate > 0:
            # the moment the bytes received so far stop meeting the average
            left = min(left, self.grace_s + received / self.min_rate - elapsed_s)
        if self.idle_s is not None:
            left = min(left, self.idle_s)
        return left


HEADERS = Pace("headers", HEADER_TIMEOUT_S)
BODY = Pace(
    "body",
    BODY_TIMEOUT_S,
    min_rate=BODY_MIN_RATE_BYTES_S,
    grace_s=BODY_GRACE_S,
    idle_s=BODY_IDLE_TIMEOUT_S,
)


class BodyTooSlowError(TimeoutError):
    """The body did not keep to its pace: a ``socket.timeout``, which werkzeug already
    answers as a client that went away (400) and gunicorn as a body it cannot drain."""


class HeadersTooSlowError(Exception):
    """The headers did not arrive in time. Not an ``OSError`` on purpose: gunicorn logs
    socket errors with a traceback, but hands other errors of a request it could not parse
    to its worker's ``handle_error`` (``api/gworker.py`` answers 408)."""


class PacedSocket:
    """A socket whose reads keep to a :class:`Pace` (everything else is the socket's)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._timeout: float | None = sock.gettimeout()  # what the server asked for
        self._pace: Pace | None = None
        self._started = 0.0
        self._received = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    @property
    def pace(self) -> Pace | None:
        return self._pace

    def start(self, pace: Pace | None) -> None:
        """Begin a phase now (None: no bound beyond the socket's own timeout)."""
        self._pace = pace
        self._started = time.monotonic()
        self._received = 0

    def settimeout(self, value: float | None) -> None:
        self._timeout = value
        self._sock.settimeout(value)

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0
        self._sock.setblocking(flag)

    def gettimeout(self) -> float | None:
        return self._timeout

    def recv(self, size: int, flags: int = 0) -> bytes:
        wait = self._wait_s()
        if wait is None:
            return self._sock.recv(size, flags)
        self._sock.settimeout(wait)
        try:
            data = self._sock.recv(size, flags)
        except TimeoutError:
            raise self._too_slow() from None
        finally:
            self._sock.settimeout(self._timeout)
        self._received += len(data)
        return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        wait = self._wait_s()
        if wait is None:
            return self._sock.recv_into(buffer, nbytes, flags)
        self._sock.settimeout(wait)
        try:
            got = self._sock.recv_into(buffer, nbytes, flags)
        except TimeoutError:
            raise self._too_slow() from None
        finally:
            self._sock.settimeout(self._timeout)
        self._received += got
        return got

    def _wait_s(self) -> float | None:
        """The timeout of the next read, None when the pace does not apply."""
        if self._pace is None or self._timeout == 0.0:  # non-blocking: the poller's
            return None
        wait = self._pace.wait_s(time.monotonic() - self._started, self._received)
        if self._timeout is not None:
            wait = min(wait, self._timeout)
        if wait <= 0:
            raise self._too_slow()
        return wait

    def _too_slow(self) -> Exception:
        what = self._pace.what if self._pace is not None else "body"
        message = f"the request {what} did not arrive in time ({self._received} bytes)"
        return HeadersTooSlowError(message) if what == HEADERS.what else BodyTooSlowError(message)
