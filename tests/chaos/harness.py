"""The chaos harness: pods of supervised workers, a paced publisher, a result tracker that
counts what a ``read_committed`` reader of ``qr.detections`` sees, and the table.

A *pod* is what Kubernetes would run: one ``qrsight-consumer --workers N`` process (the
real supervisor, which restarts crashed workers) with its own ``QRSIGHT_GROUP_INSTANCE_ID``
(the StatefulSet pod name), or dynamic membership, or what the settings give (by default
the host name as identity). Everything is real: Apache
Kafka, the worker processes, SIGKILL.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from core.runtime.kafka import consumer_config, producer_config
from core.runtime.settings import REPO_ROOT, Settings
from schemas import names
from schemas.codec import Codec
from tests.integration.test_worker import children, jpeg, settings_env

RESTART_LINE = "worker exited, restarting"
# Sizes: CHAOS_IMAGES per scenario (CI default; `make chaos` sets 10000).
IMAGES = int(os.environ.get("CHAOS_IMAGES", "1000"))
RATE = float(os.environ.get("CHAOS_RATE", "100"))  # images per second the publisher sends
STALL_GAP_S = 1.0  # a partition with images pending and no result for longer is stalled


def log(text: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --- pods -------------------------------------------------------------------------------------
class Pod:
    """One supervisor process (``qrsight-consumer --workers N``) with its log."""

    def __init__(
        self,
        settings: Settings,
        name: str | None,
        workers: int,
        logdir: Path,
        *,
        as_configured: bool = False,
        **env: str,
    ) -> None:
        """``name``: the pod's stable name (``QRSIGHT_GROUP_INSTANCE_ID``); None: dynamic
        membership. ``as_configured``: neither, the membership ``settings`` give (what
        ``qrsight-consumer`` does with nothing set)."""
        self.name = name or f"{'default' if as_configured else 'dynamic'}-{uuid.uuid4().hex[:6]}"
        self.log = logdir / f"pod-{self.name}.log"
        environ = settings_env(settings)
        if not as_configured:
            environ.pop("QRSIGHT_GROUP_INSTANCE_ID", None)
            if name:
                environ["QRSIGHT_GROUP_INSTANCE_ID"] = name
            else:  # not the host name either
                environ["QRSIGHT_STATIC_MEMBERSHIP"] = "false"
        environ.update(env)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "consumer.cli", "--workers", str(workers)],
                env=environ,
                cwd=REPO_ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def workers(self) -> list[int]:
        return children(self.proc.pid) if self.proc.poll() is None else []

    def restarts(self) -> int:
        return self.log.read_text(errors="replace").count(RESTART_LINE)

    def kill_worker(self, rng: random.Random) -> int | None:
        alive = self.workers()
        if not alive:
            return None
        victim = rng.choice(alive)
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
        return victim

    def kill_all(self) -> None:
        """The pod vanishes (node lost): SIGKILL to the workers, then the supervisor."""
        for pid in self.workers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill_all()
                return -9
        return int(self.proc.returncode)

    def wait_ready(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            assigned = [
                line
                for line in text.splitlines()
                if "partitions assigned" in line and not line.endswith("partitions=-")
            ]
            if len(assigned) >= count:
                return
            time.sleep(0.2)
        raise AssertionError(f"pod {self.name} not ready: {self.log.read_text()[-2000:]}")


# --- the stream -------------------------------------------------------------------------------
Message = tuple[bytes | None, list[tuple[str, bytes]]]


class Publisher(threading.Thread):
    """Sends ``count`` messages at ``rate`` per second (raw JPEGs unless ``make(i, rid)``
    says otherwise); keeps each one's source partition."""

    def __init__(
        self,
        settings: Settings,
        count: int,
        rate: float,
        prefix: str,
        make: Callable[[int, str], Message] | None = None,
    ) -> None:
        super().__init__(name="publisher", daemon=True)
        self.settings, self.count, self.rate, self.prefix = settings, count, rate, prefix
        self.ids = [f"{prefix}-{i}" for i in range(count)]
        self.partition: dict[str, int] = {}
        self.sent_at: dict[str, float] = {}  # when each one was handed to the producer
        self.sent = 0
        self.errors: list[str] = []
        self._halt = threading.Event()
        self._images = [jpeg(i) for i in range(50)]
        self._make = make or self._jpeg

    def _jpeg(self, i: int, rid: str) -> Message:
        return self._images[i % len(self._images)], [(names.H_CORRELATION_ID, rid.encode())]

    def run(self) -> None:
        producer = Producer(producer_config(self.settings, role="chaos-publisher"))
        started = time.monotonic()
        for i, rid in enumerate(self.ids):
            if self._halt.is_set():
                break
            delay = started + i / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)

            def done(err: Any, msg: Any, rid: str = rid) -> None:
                if err is not None:
                    self.errors.append(f"{rid}: {err}")
                else:
                    self.partition[rid] = msg.partition()

            value, headers = self._make(i, rid)
            while True:
                try:
                    producer.produce(
                        self.settings.topic_images,
                        key=rid.encode(),
                        value=value,
                        headers=headers,
                        on_delivery=done,
                    )
                    break
                except BufferError:
                    producer.poll(0.1)
            self.sent_at[rid] = time.monotonic()
            self.sent += 1
            producer.poll(0)
        while producer.flush(5) > 0:
            pass
        self.ids = self.ids[: self.sent]  # stopped early: the stream is what was sent

    def stop(self, timeout_s: float) -> None:
        """End the stream now (for streams that last as long as a fault, not a count)."""
        self._halt.set()
        self.join(timeout_s)

    def progress(self) -> float:
        return self.sent / self.count


class Tracker(threading.Thread):
    """Reads ``qr.detections`` (read_committed) from the start: per request id, how many
    results are visible and when each arrived."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(name="tracker", daemon=True)
        self.settings = settings
        self.arrivals: dict[str, list[float]] = defaultdict(list)
        self.statuses: Counter[str] = Counter()
        self.models: dict[str, list[str]] = defaultdict(list)  # "name version" per result
        self.last_result = time.monotonic()
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        conf = consumer_config(
            self.settings,
            f"chaos-tracker-{uuid.uuid4().hex[:8]}",
            role="chaos-tracker",
            **{"enable.auto.commit": False, "isolation.level": "read_committed"},
        )
        reader = Consumer(conf)
        topic = self.settings.topic_detections
        reader.assign(
            [
                TopicPartition(topic, p, OFFSET_BEGINNING)
                for p in range(self.settings.topic_partitions)
            ]
        )
        codec = Codec("DetectionResult")
        try:
            while not self._halt.is_set():
                for msg in reader.consume(500, 0.2):
                    if msg.error():
                        continue
                    record = codec.decode(msg.value(), topic)
                    now = time.monotonic()
                    with self._lock:
                        self.arrivals[record["request_id"]].append(now)
                        self.statuses[record["status"]] += 1
                        model = record.get("model") or {}
                        self.models[record["request_id"]].append(
                            f"{model.get('name')} {model.get('version')}"
                        )
                        self.last_result = now
        finally:
            reader.close()

    def stop(self) -> None:
        self._halt.set()
        self.join(30)

    def seen(self, ids: list[str]) -> int:
        with self._lock:
            return sum(1 for rid in ids if rid in self.arrivals)

    def wait_for(self, ids: list[str], timeout_s: float, linger_s: float = 3.0) -> bool:
        """Until every id has a result (then ``linger_s`` more, for late duplicates)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.seen(ids) == len(ids):
                time.sleep(linger_s)
                return True
            time.sleep(0.2)
        return False


# --- figures ----------------------------------------------------------------------------------
@dataclass
class Row:
    scenario: str
    guarantee: str
    sent: int
    results: int
    missing: int
    duplicates: int
    bound: str
    kills: int
    restarts: int
    stall_s: float
    recovery: str = ""
    took_s: float = 0.0
    notes: list[str] = field(default_factory=list)


ROWS: list[Row] = []


def figures(publisher: Publisher, tracker: Tracker) -> tuple[int, int, int, float]:
    """(results visible, missing ids, duplicate results, longest per-partition stall)."""
    with tracker._lock:
        arrivals = {rid: list(times) for rid, times in tracker.arrivals.items()}
    mine = {rid: arrivals.get(rid, []) for rid in publisher.ids}
    results = sum(len(t) for t in mine.values())
    missing = sum(1 for t in mine.values() if not t)
    duplicates = sum(len(t) - 1 for t in mine.values() if len(t) > 1)
    return results, missing, duplicates, longest_stall(publisher, mine)


def longest_stall(publisher: Publisher, arrivals: dict[str, list[float]]) -> float:
    """Per source partition, the longest gap between consecutive first results (the
    stream is paced, so a gap well above the pace is a stall)."""
    per_partition: dict[int, list[float]] = defaultdict(list)
    for rid, times in arrivals.items():
        if times and rid in publisher.partition:
            per_partition[publisher.partition[rid]].append(min(times))
    worst = 0.0
    for times in per_partition.values():
        times.sort()
        worst = max([worst, *(b - a for a, b in itertools.pairwise(times))])
    return worst


def table(rows: list[Row]) -> str:
    head = (
        "| scenario | guarantee | images sent | results | missing | duplicates (bound) "
        "| kills | restarts | longest stall | recovery | took |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r.scenario} | {r.guarantee} | {r.sent} | {r.results} | {r.missing} | "
            f"{r.duplicates} ({r.bound}) | {r.kills} | {r.restarts} | {r.stall_s:.1f} s | "
            f"{r.recovery or '-'} | {r.took_s:.0f} s |"
        )
    return "\n".join(lines)


@contextmanager
def running(*threads: threading.Thread) -> Iterator[None]:
    for thread in threads:
        thread.start()
    yield


def every(period_s: float, action: Callable[[], None], stop: threading.Event) -> threading.Thread:
    """Run ``action`` every ``period_s`` seconds in a thread until ``stop`` is set."""

    def loop() -> None:
        while not stop.wait(period_s):
            action()

    thread = threading.Thread(target=loop, name="chaos-every", daemon=True)
    thread.start()
    return thread
