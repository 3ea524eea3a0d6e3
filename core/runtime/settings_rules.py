"""Rules that tie several settings together, checked when the settings are built."""

from __future__ import annotations

from collections.abc import Mapping

MAX_POLL_INTERVAL_MS = 300_000  # librdkafka's default max.poll.interval.ms


def check_watchdog_before_eviction(
    pipeline_timeout_s: float, kafka_properties: Mapping[str, str]
) -> None:
    """A hung worker must end (and its crash note count) before the group evicts it
    and hands its batch to the next worker. Raises ValueError naming both settings."""
    raw = kafka_properties.get("max.poll.interval.ms", str(MAX_POLL_INTERVAL_MS))
    try:
        poll_ms = int(raw)
    except ValueError:
        return  # librdkafka names the bad property when the client is made
    if pipeline_timeout_s > 0 and pipeline_timeout_s * 1000 >= poll_ms:
        raise ValueError(
            f"QRSIGHT_PIPELINE_TIMEOUT_S ({pipeline_timeout_s:g} s) must be below "
            f"the consumer's max.poll.interval.ms ({poll_ms} ms, "
            "QRSIGHT_KAFKA__MAX_POLL_INTERVAL_MS): else a hung worker is evicted and its "
            "batch handed to the next worker before the watchdog ends it"
        )
