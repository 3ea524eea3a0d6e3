"""How long a client may take to send its request: the headers' deadline, the body's
deadline, minimum rate and longest pause, as plain decisions and on a socket pair."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from api.pace import (
    BODY,
    BODY_GRACE_S,
    BODY_MIN_RATE_BYTES_S,
    HEADERS,
    BodyTooSlowError,
    HeadersTooSlowError,
    Pace,
    PacedSocket,
)

RATE = BODY_MIN_RATE_BYTES_S


@pytest.mark.parametrize(
    ("elapsed", "received", "wait"),
    [
        (0.0, 0, BODY_GRACE_S),  # the grace: nothing needed yet
        (4.0, 0, BODY_GRACE_S - 4.0),
        (9.0, 1, BODY_GRACE_S + 1 / RATE - 9.0),  # one byte every 9 s: long past its turn
        (6.0, 4 * RATE, min(10.0, BODY_GRACE_S + 4 - 6.0)),  # behind the average: 3 s left
        (1.0, 10 * 1024 * 1024, 10.0),  # fast: only the longest pause bounds the next read
        (59.0, 10 * 1024 * 1024, 1.0),  # ...and the whole-body deadline
    ],
)
def test_the_body_pace(elapsed: float, received: int, wait: float) -> None:
    assert BODY.wait_s(elapsed, received) == pytest.approx(wait)


def test_a_one_byte_every_9_s_drip_is_too_slow_before_its_second_byte() -> None:
    assert BODY.wait_s(0.0, 1) > 0
    assert BODY.wait_s(9.0, 1) <= 0


def test_the_headers_have_one_deadline_whatever_arrives() -> None:
    assert HEADERS.wait_s(2.0, 0) == pytest.approx(HEADERS.total_s - 2.0)
    assert HEADERS.wait_s(HEADERS.total_s, 100_000) <= 0


@pytest.fixture
def pair() -> Iterator[tuple[PacedSocket, socket.socket]]:
    server, client = socket.socketpair()
    server.setblocking(True)
    yield PacedSocket(server), client
    server.close()
    client.close()


def test_a_dripping_body_is_cut_at_the_minimum_rate(
    pair: tuple[PacedSocket, socket.socket],
) -> None:
    paced, client = pair
    paced.start(Pace("body", 10.0, min_rate=1000, grace_s=0.3, idle_s=5.0))
    client.sendall(b"x")
    assert paced.recv(10) == b"x"
    started = time.monotonic()
    with pytest.raises(BodyTooSlowError, match="body did not arrive in time"):
        while True:  # one byte at a time, each well within the longest pause
            client.sendall(b"x")
            paced.recv(10)
            time.sleep(0.1)
    assert time.monotonic() - started < 1.0


def test_slow_headers_raise_what_gunicorn_hands_to_the_worker(
    pair: tuple[PacedSocket, socket.socket],
) -> None:
    paced, client = pair
    paced.start(Pace("headers", 0.3))
    client.sendall(b"GET / HTTP/1.1\r\n")
    assert paced.recv(100)
    with pytest.raises(HeadersTooSlowError):
        paced.recv(100)
    assert not isinstance(HeadersTooSlowError("x"), OSError)  # gunicorn would log a traceback


def test_without_a_pace_the_socket_is_left_alone(pair: tuple[PacedSocket, socket.socket]) -> None:
    paced, client = pair
    paced.settimeout(2.5)
    paced.start(None)
    client.sendall(b"abc")
    buffer = bytearray(3)
    assert paced.recv_into(buffer) == 3
    assert bytes(buffer) == b"abc"
    assert paced.gettimeout() == 2.5


def test_the_servers_own_timeout_still_applies_and_is_restored(
    pair: tuple[PacedSocket, socket.socket],
) -> None:
    paced, _client = pair
    paced.settimeout(0.2)
    paced.start(BODY)
    started = time.monotonic()
    with pytest.raises(BodyTooSlowError):
        paced.recv(10)
    assert time.monotonic() - started < 1.0
    assert paced.gettimeout() == 0.2
