"""Nothing lost, nothing stuck: workers under kills, churn and broker restarts.

Every scenario publishes ``CHAOS_IMAGES`` images at ``CHAOS_RATE`` per second into a
6-partition ``qr.images`` while something goes wrong, then counts what a
``read_committed`` reader of ``qr.detections`` sees: images sent, results, request ids
without a result (must be 0), duplicates (bounded; 0 with exactly-once), worker restarts,
and the longest time a partition with images waiting produced no result.

The model is the tiny image-dependent ONNX graph of the worker tests, so the figures are
about delivery, not inference speed.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core.runtime.settings import Settings
from producer_tools.topics import create_topics
from tests.chaos.harness import (
    IMAGES,
    RATE,
    ROWS,
    Pod,
    Publisher,
    Row,
    Tracker,
    every,
    figures,
    log,
)
from tests.integration.conftest import KAFKA_SH, _free_port
from tests.integration.kafka_topics import fresh_settings
from tests.unit.onnx_models import make_dark_cell_model

SESSION_TIMEOUT_MS = 10_000
TXN_TIMEOUT_MS = 10_000
KILL_EVERY_S = 3.0
CHURN_EVERY_S = 2.0
BROKER_DOWN_S = 15.0
CHURN_STREAM_S = 30.0


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dark_cell_model(tmp_path_factory.mktemp("model") / "dark.onnx", imgsz=160, cell=32)


def chaos_settings(base: Settings, model: Path, state: Path, **update: object) -> Settings:
    extra = {
        **base.kafka_extra,
        "session.timeout.ms": str(SESSION_TIMEOUT_MS),
        "transaction.timeout.ms": str(TXN_TIMEOUT_MS),
    }
    values: dict[str, object] = {
        "model_path": model,
        "verifier_path": None,
        "conf_threshold": 0.5,
        "metrics_port": 0,
        "ort_intra_threads": 1,
        "decode_threads": 1,
        "shutdown_timeout_s": 8.0,
        "state_dir": state,
        "kafka_extra": extra,
    }
    values.update(update)
    return base.model_copy(update=values)


@pytest.fixture
def make(
    kafka_settings_factory: Callable[..., Settings], model_path: Path, tmp_path: Path
) -> Callable[..., Settings]:
    def build(**update: object) -> Settings:
        base = kafka_settings_factory(topic_partitions=6)
        return chaos_settings(base, model_path, tmp_path / "state", **update)

    return build


@pytest.fixture
def logdir(request: pytest.FixtureRequest) -> Path:
    """Pod logs, kept after the run (pytest prunes its temp dirs): ``CHAOS_LOGS``/<test>."""
    root = Path(os.environ.get("CHAOS_LOGS", tempfile.gettempdir() + "/qrsight-chaos"))
    path = root / request.node.name.replace("/", "_")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


@pytest.fixture
def pods() -> Iterator[list[Pod]]:
    made: list[Pod] = []
    yield made
    for pod in made:
        if pod.proc.poll() is None:
            pod.kill_all()


def drain_timeout() -> float:
    return 120 + IMAGES / 20


def finish(
    scenario: str,
    settings: Settings,
    *,
    publisher: Publisher,
    tracker: Tracker,
    pods: list[Pod],
    started: float,
    kills: int,
    bound: int,
    recovery: str = "",
) -> Row:
    publisher.join(drain_timeout())
    assert not publisher.errors, publisher.errors[:5]
    tracker.wait_for(publisher.ids, drain_timeout())
    results, missing, duplicates, stall = figures(publisher, tracker)
    row = Row(
        scenario,
        settings.processing_guarantee,
        publisher.sent,
        results,
        missing,
        duplicates,
        f"<= {bound}" if bound >= 0 else "not bounded",
        kills,
        sum(p.restarts() for p in pods),
        stall,
        recovery,
        time.monotonic() - started,
    )
    ROWS.append(row)
    log(f"{scenario}: {row}")
    return row


def killer(
    pods: list[Pod], kills: list[int], rng: random.Random, busy: Callable[[], bool]
) -> Callable[[], None]:
    """Every call: SIGKILL one worker at random, while at least one other keeps running."""

    def kill() -> None:
        alive = [p for p in pods if p.proc.poll() is None for _ in p.workers()]
        if not busy() or len(alive) < 2:
            return
        victim = rng.choice(alive).kill_worker(rng)
        if victim is not None:
            kills.append(victim)

    return kill


def kill_run(
    name: str,
    settings: Settings,
    tracker: Tracker,
    pods: list[Pod],
    *,
    rate: float,
    tag: str,
    seed: int,
) -> tuple[Row, list[int]]:
    """Publish IMAGES at ``rate`` while one worker is SIGKILLed every KILL_EVERY_S; the
    scenario's row (duplicates bounded by one batch per kill) and the pids killed."""
    started = time.monotonic()
    publisher = Publisher(settings, IMAGES, rate, tag)
    publisher.start()
    kills: list[int] = []
    stop = threading.Event()
    every(KILL_EVERY_S, killer(pods, kills, random.Random(seed), publisher.is_alive), stop)
    publisher.join(drain_timeout())
    stop.set()
    row = finish(
        name,
        settings,
        publisher=publisher,
        tracker=tracker,
        pods=pods,
        started=started,
        kills=len(kills),
        bound=len(kills) * settings.max_batch,
    )
    return row, kills


def test_kill_9_of_one_of_two_supervised_workers_every_3_s_loses_nothing(
    make: Callable[..., Settings], pods: list[Pod], logdir: Path
) -> None:
    """At-least-once: duplicates at most one batch per kill (a commit per batch)."""
    settings = make()
    tracker = Tracker(settings)
    tracker.start()
    pods.append(Pod(settings, "pod-a", 2, logdir))
    pods[0].wait_ready(2)
    row, kills = kill_run(
        "kill -9 every 3 s, 2 supervised workers",
        settings,
        tracker,
        pods,
        rate=RATE,
        tag="alo",
        seed=16,
    )
    tracker.stop()
    assert pods[0].stop() == 0
    assert row.missing == 0
    assert row.duplicates <= len(kills) * settings.max_batch
    assert row.restarts == len(kills) > 0


DEFAULTS_RATE = 40.0  # images per second, as the report that found the wait sent them
DEFAULT_SESSION_S = 45.0  # librdkafka's session.timeout.ms, which these settings keep


@pytest.fixture
def make_defaults(
    kafka_settings_factory: Callable[..., Settings], model_path: Path, tmp_path: Path
) -> Callable[..., Settings]:
    """Settings a new user has: nothing about membership, session or shutdown set; only the
    test's broker and topics, the tiny model, no metrics port, a state folder of its own."""

    def build(**update: object) -> Settings:
        base = kafka_settings_factory(topic_partitions=6)
        values: dict[str, object] = {
            "model_path": model_path,
            "verifier_path": None,
            "conf_threshold": 0.5,
            "metrics_port": 0,
            "state_dir": tmp_path / "state",
        }
        return base.model_copy(update={**values, **update})

    return build


def test_repeated_kills_with_default_settings_neither_wait_out_a_session_nor_redo_work(
    make_defaults: Callable[..., Settings], pods: list[Pod], logdir: Path
) -> None:
    """``qrsight-consumer --workers 2`` with nothing set, images at a steady 40 per second,
    one of the workers SIGKILLed every 3 s. Were each restarted worker a new group member,
    the group would wait out the dead one's session (45 s by default) and fence every
    commit of the survivor meanwhile, whose work is then done again when its partitions
    move: duplicates far above one batch per kill (not every run: it takes the survivor's
    partitions moving), and no result at all for a minute or more (every run)."""
    settings = make_defaults()
    tracker = Tracker(settings)
    tracker.start()
    pods.append(Pod(settings, None, 2, logdir, as_configured=True))
    pods[0].wait_ready(2)
    row, kills = kill_run(
        "kill -9 every 3 s, `--workers 2`, default settings",
        settings,
        tracker,
        pods,
        rate=min(RATE, DEFAULTS_RATE),
        tag="defaults",
        seed=28,
    )
    tracker.stop()
    stopped = pods[0].stop()
    assert row.missing == 0
    assert row.duplicates <= len(kills) * settings.max_batch
    assert row.restarts == len(kills) > 0
    assert row.stall_s < DEFAULT_SESSION_S, "no partition waited out a dead member's session"
    assert stopped == 0, "a graceful stop does not wait for the group"


def test_exactly_once_under_kills_and_a_restart_under_a_new_identity_shows_no_duplicate(
    make: Callable[..., Settings], pods: list[Pod], logdir: Path
) -> None:
    """Two one-worker pods (StatefulSet pods: stable names); a worker is killed every 3 s
    and restarted under its name; half-way, pod-a vanishes and pod-c (a new name, so a new
    ``transactional.id``) takes over: read_committed readers see each result once."""
    settings = make(processing_guarantee="exactly_once")
    tracker = Tracker(settings)
    tracker.start()
    pods += [Pod(settings, "pod-a", 1, logdir), Pod(settings, "pod-b", 1, logdir)]
    for pod in pods:
        pod.wait_ready(1)
    started = time.monotonic()
    publisher = Publisher(settings, IMAGES, RATE, "eos")
    publisher.start()
    kills: list[int] = []
    live = list(pods)
    stop = threading.Event()
    every(KILL_EVERY_S, killer(live, kills, random.Random(17), publisher.is_alive), stop)
    while publisher.is_alive() and publisher.progress() < 0.5:
        time.sleep(0.1)
    renamed_at = time.monotonic()
    live[0].kill_all()  # the pod is gone; Kubernetes starts one under a new name
    kills.append(live[0].proc.pid)
    newcomer = Pod(settings, "pod-c", 1, logdir)
    pods.append(newcomer)
    live[0] = newcomer
    publisher.join(drain_timeout())
    stop.set()
    row = finish(
        "exactly-once: kill -9 every 3 s + a pod under a new name",
        settings,
        publisher=publisher,
        tracker=tracker,
        pods=pods,
        started=started,
        kills=len(kills),
        bound=0,
        recovery=f"new identity at {renamed_at - started:.0f} s",
    )
    tracker.stop()
    for pod in live:
        pod.stop()
    assert row.missing == 0
    assert row.duplicates == 0, "read_committed readers see every result once"


def test_a_worker_joining_and_leaving_every_2_s_shows_no_duplicate(
    make: Callable[..., Settings], pods: list[Pod], logdir: Path
) -> None:
    """Exactly-once under churn: a second worker joins, stays 2 s, leaves (SIGTERM), and
    2 s later joins again, for the whole stream; each join and leave is a rebalance."""
    settings = make(processing_guarantee="exactly_once")
    tracker = Tracker(settings)
    tracker.start()
    pods.append(Pod(settings, "pod-base", 1, logdir))
    pods[0].wait_ready(1)
    started = time.monotonic()
    # a churn cycle (start, join, 2 s in, leave, 2 s out) takes ~8 s: stream for >= 30 s
    publisher = Publisher(settings, IMAGES, min(RATE, IMAGES / CHURN_STREAM_S), "churn")
    publisher.start()
    joins = 0
    while publisher.is_alive():
        churner = Pod(settings, None, 1, logdir)
        pods.append(churner)
        churner.wait_ready(1)
        joins += 1
        time.sleep(CHURN_EVERY_S)
        assert churner.stop() == 0, churner.log.read_text()[-2000:]
        time.sleep(CHURN_EVERY_S)
    row = finish(
        "exactly-once: a worker joins and leaves every 2 s",
        settings,
        publisher=publisher,
        tracker=tracker,
        pods=pods,
        started=started,
        kills=0,
        bound=0,
        recovery=f"{joins} joins, {joins} leaves",
    )
    tracker.stop()
    assert pods[0].stop() == 0
    assert joins >= 3
    assert row.missing == 0
    assert row.duplicates == 0
    assert row.restarts == 0


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[tuple[str, Callable[[str], None]]]:
    """A broker of this test's own, to stop and start (not the shared one)."""
    port = _free_port()
    env = {
        **os.environ,
        "KAFKA_HOME_DIR": str(tmp_path / "kafka"),
        "QRSIGHT_KAFKA_PORT": str(port),
        "KAFKA_START_TIMEOUT": "180",
    }
    env.pop("KAFKA_CONTROLLER_PORT", None)

    def kafka(command: str) -> None:
        done = subprocess.run(
            [str(KAFKA_SH), command],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"kafka.sh {command}: {done.stdout}\n{done.stderr}"

    kafka("up")
    try:
        yield f"127.0.0.1:{port}", kafka
    finally:
        subprocess.run(
            [str(KAFKA_SH), "down"], env=env, capture_output=True, timeout=120, check=False
        )


def test_the_broker_stopped_15_s_mid_stream_loses_nothing(
    own_broker: tuple[str, Callable[[str], None]],
    model_path: Path,
    pods: list[Pod],
    tmp_path: Path,
    logdir: Path,
) -> None:
    bootstrap, kafka = own_broker
    base = fresh_settings(bootstrap, "broker", topic_partitions=6)
    create_topics(base)
    settings = chaos_settings(base, model_path, tmp_path / "state")
    tracker = Tracker(settings)
    tracker.start()
    pods.append(Pod(settings, "pod-a", 2, logdir))
    pods[0].wait_ready(2)
    started = time.monotonic()
    publisher = Publisher(settings, IMAGES, RATE, "broker")
    publisher.start()
    while publisher.is_alive() and publisher.progress() < 0.3:
        time.sleep(0.1)
    log("stopping the broker")
    down_at = time.monotonic()
    kafka("down")
    stopped_at = time.monotonic()
    time.sleep(BROKER_DOWN_S)
    log("starting the broker again")
    kafka("up")
    back = time.monotonic()
    publisher.join(drain_timeout())
    tracker.wait_for(publisher.ids, drain_timeout())
    after = sorted(t for times in tracker.arrivals.values() for t in times if t >= back)
    rebuilt = pods[0].log.read_text(errors="replace").count("consumer failed for good")
    recovery = (
        f"broker away {back - down_at:.0f} s (stop {stopped_at - down_at:.0f} s, down "
        f"{BROKER_DOWN_S:.0f} s, start {back - stopped_at - BROKER_DOWN_S:.0f} s); first "
        f"result {after[0] - back:.1f} s after it was back; {rebuilt} consumer(s) fenced "
        "and replaced in place"
        if after
        else "no result after the restart"
    )
    row = finish(
        "broker stopped 15 s mid-stream",
        settings,
        publisher=publisher,
        tracker=tracker,
        pods=pods,
        started=started,
        kills=0,
        bound=-1,
        recovery=recovery,
    )
    tracker.stop()
    assert pods[0].stop() == 0
    assert row.missing == 0
    assert row.restarts == 0, "an outage is waited out, not crashed on"


@pytest.mark.parametrize("static", [True, False], ids=["static-membership", "dynamic"])
def test_the_stall_after_a_kill_with_and_without_static_membership(
    make: Callable[..., Settings], pods: list[Pod], logdir: Path, static: bool
) -> None:
    """One of two one-worker pods loses its worker to SIGKILL once; its supervisor restarts
    it. A static member takes its partitions back when it returns; a dynamic one leaves
    them stalled until the dead member's session times out (session.timeout.ms)."""
    settings = make()
    tracker = Tracker(settings)
    tracker.start()
    names = ("pod-a", "pod-b") if static else (None, None)
    pods += [Pod(settings, names[0], 1, logdir), Pod(settings, names[1], 1, logdir)]
    for pod in pods:
        pod.wait_ready(1)
    count = max(int(RATE * 2.0 * SESSION_TIMEOUT_MS / 1000), IMAGES // 4)
    started = time.monotonic()
    publisher = Publisher(settings, count, RATE, "stall")
    publisher.start()
    while publisher.is_alive() and publisher.progress() < 0.25:
        time.sleep(0.1)
    victim = pods[0].kill_worker(random.Random(5))
    row = finish(
        f"kill -9 once, {'static' if static else 'dynamic'} membership",
        settings,
        publisher=publisher,
        tracker=tracker,
        pods=pods,
        started=started,
        kills=1,
        bound=settings.max_batch,
        recovery=f"session.timeout.ms={SESSION_TIMEOUT_MS}",
    )
    tracker.stop()
    for pod in pods:
        pod.stop()
    assert victim is not None and row.restarts == 1
    assert row.missing == 0
    session_s = SESSION_TIMEOUT_MS / 1000
    if static:
        assert row.stall_s < session_s, "the restarted member took its partitions back"
    else:
        assert row.stall_s >= 0.8 * session_s, "the dead member's partitions waited"
