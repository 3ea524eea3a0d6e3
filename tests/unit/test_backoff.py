"""The one back-off policy (core.runtime.backoff) and the loops that use it: the worker's
batch retries and the supervisor's restarts keep the figures they always had."""

from __future__ import annotations

import pytest

from consumer.recovery import RetryPolicy
from consumer.supervisor import RESTART_BACKOFF
from core.runtime.backoff import Backoff


@pytest.mark.parametrize(
    ("first_s", "max_s", "failures", "expected"),
    [
        (1.0, 30.0, 0, 0.0),  # no failure, no wait
        (1.0, 30.0, 1, 1.0),
        (1.0, 30.0, 2, 2.0),
        (1.0, 30.0, 5, 16.0),
        (1.0, 30.0, 6, 30.0),  # 32 capped
        (1.0, 30.0, 10_000, 30.0),  # no overflow, no huge integers
        (0.5, 0.5, 3, 0.5),
        (0.0, 0.0, 4, 0.0),
    ],
)
def test_delay_doubles_from_first_and_stops_at_the_cap(
    first_s: float, max_s: float, failures: int, expected: float
) -> None:
    assert Backoff(first_s, max_s).delay_s(failures) == expected


@pytest.mark.parametrize(("first_s", "max_s"), [(-1.0, 1.0), (2.0, 1.0)])
def test_a_policy_that_cannot_hold_is_refused(first_s: float, max_s: float) -> None:
    with pytest.raises(ValueError, match="first_s"):
        Backoff(first_s, max_s)


def test_supervisor_restarts_wait_1_2_4_up_to_30_seconds() -> None:
    assert [RESTART_BACKOFF.delay_s(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


@pytest.mark.parametrize(
    ("first_s", "max_s", "expected"),
    [
        (0.5, 10.0, [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]),  # the defaults (500 ms, 10 s)
        (0.5, 0.8, [0.5, 0.8, 0.8, 0.8, 0.8, 0.8]),
        (2.0, 1.0, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),  # first above the cap: the cap
    ],
)
def test_batch_retries_keep_their_figures(
    first_s: float, max_s: float, expected: list[float]
) -> None:
    policy = RetryPolicy(3, first_s, max_s)
    assert [policy.delay_s(n) for n in range(1, 7)] == expected
