"""Failover under load on a three-node Kafka cluster: nothing lost when brokers die.

One cluster (``deploy/local/kafka.sh cluster-up`` on free ports in a temp dir) serves the
module; topics are created the way an operator does (``qrsight-topics create``: 3 replicas,
``min.insync.replicas`` 2). Each scenario streams images at a steady pace into a
6-partition ``qr.images`` through two supervised workers while an in-process API (the real
app and reply client) takes concurrent calls, injects one fault, streams on for a while,
then counts what a ``read_committed`` reader of ``qr.detections`` sees: images sent,
results, missing (must be 0), duplicates (at-least-once: at most workers x
``QRSIGHT_MAX_BATCH`` per fault; exactly-once: 0), API answers by status (never a 500,
never another request's result) and the time from the fault to the first new result.

``CHAOS_CLUSTER_SIZE=full`` (``make chaos-cluster``) runs every scenario with a longer,
faster stream; the CI size runs the scenarios in ``CI_SCENARIOS`` (a partition leader, the
transaction coordinator, two of three brokers down) and the rack-aware check.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from core.runtime.kafka import consumer_config
from core.runtime.settings import Settings
from producer_tools.topics import create_topics
from tests.chaos.cluster import NODES, LocalCluster
from tests.chaos.harness import ROWS, Pod, Publisher, Row, Tracker, figures, log
from tests.chaos.test_chaos import chaos_settings, logdir, model_path, pods  # noqa: F401
from tests.integration.kafka_topics import fresh_settings
from tests.integration.test_worker import jpeg

FULL = os.environ.get("CHAOS_CLUSTER_SIZE", "ci") == "full"
RATE = float(os.environ.get("CHAOS_CLUSTER_RATE", "50" if FULL else "20"))  # images/s
WARM_S = 20.0 if FULL else 8.0  # steady stream before the fault
TAIL_S = 30.0 if FULL else 10.0  # stream after the fault is over
DOWN_S = 20.0  # a killed broker stays away this long
TWO_DOWN_S = 30.0
WORKERS = 2
API_CALLERS = 2
API_PAUSE_S = 0.2
CI_SCENARIOS = {"leader", "transaction-coordinator", "two-down"}
MODEL_V1, MODEL_V2 = "1.0", "2.0"


def scenario_enabled(name: str) -> None:
    if not FULL and name not in CI_SCENARIOS:
        pytest.skip("full size only: make chaos-cluster (CHAOS_CLUSTER_SIZE=full)")


# --- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(tmp_path_factory.mktemp("cluster"))
    took = local.up()
    log(f"cluster up in {took:.0f} s: {local.bootstrap}")
    try:
        yield local
    finally:
        local.down()


@pytest.fixture
def healthy(cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The cluster whole and in sync before a scenario, and again after it (a scenario
    that fails half-way must not leave a node down for the next)."""
    cluster.up()
    cluster.wait_in_sync()
    yield cluster
    cluster.up()


@dataclass
class Scene:
    """What every scenario needs: the cluster (whole and in sync), its pods, their logs
    and a state dir."""

    cluster: LocalCluster
    pods: list[Pod]
    logdir: Path
    state: Path
    cleanups: list[Callable[[], None]] = field(default_factory=list)


@pytest.fixture
def scene(
    healthy: LocalCluster,
    pods: list[Pod],  # noqa: F811
    logdir: Path,  # noqa: F811
    tmp_path: Path,
) -> Iterator[Scene]:
    """Readers and API threads a scenario started are stopped even when it fails."""
    made = Scene(healthy, pods, logdir, tmp_path / "state")
    yield made
    for cleanup in reversed(made.cleanups):
        cleanup()


@pytest.fixture(scope="module")
def model_v2(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The same graph under a new version, as a retrained model would ship."""
    model = onnx.load(str(model_path))
    for prop in model.metadata_props:
        if prop.key == "version":
            prop.value = MODEL_V2
    path = tmp_path_factory.mktemp("model-v2") / "dark-v2.onnx"
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def model_v1(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    model = onnx.load(str(model_path))
    for prop in model.metadata_props:
        if prop.key == "version":
            prop.value = MODEL_V1
    path = tmp_path_factory.mktemp("model-v1") / "dark-v1.onnx"
    onnx.save(model, str(path))
    return path


# --- the API, called all along ----------------------------------------------------------------
@dataclass
class ApiAnswer:
    at: float
    status: int
    took_s: float
    retry_after: str | None
    mismatched: bool  # a 200 whose result is another request's


class ApiCallers:
    """``API_CALLERS`` threads posting one image each, again and again, to the real app
    (in-process: ``create_app`` with its reply client on the cluster)."""

    def __init__(self, settings: Settings) -> None:
        from api.app import create_app

        self.app = create_app(settings)
        self.answers: list[ApiAnswer] = []
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._call_loop, args=(i,), daemon=True, name=f"api-{i}")
            for i in range(API_CALLERS)
        ]

    def start(self, ready_timeout_s: float = 60) -> ApiCallers:
        assert self.app.extensions["qrsight"].replies.wait_ready(ready_timeout_s), "API not ready"
        for thread in self._threads:
            thread.start()
        return self

    def _call_loop(self, index: int) -> None:
        client = self.app.test_client()
        image = jpeg(1000 + index)
        while not self._halt.is_set():
            started = time.monotonic()
            response = client.post("/api/v1/detect", data=image, content_type="image/jpeg")
            rid = response.headers.get("X-Request-ID")
            body: dict[str, Any] = response.get_json(silent=True) or {}
            mismatched = response.status_code == 200 and body.get("request_id") != rid
            with self._lock:
                self.answers.append(
                    ApiAnswer(
                        started,
                        response.status_code,
                        time.monotonic() - started,
                        response.headers.get("Retry-After"),
                        mismatched,
                    )
                )
            self._halt.wait(API_PAUSE_S)

    def stop(self) -> None:
        if self._halt.is_set():
            return
        self._halt.set()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(60)
        self.app.extensions["qrsight"].replies.close()

    def by_status(self) -> Counter[int]:
        return Counter(a.status for a in self.answers)

    def summary(self) -> str:
        return "API " + " ".join(f"{s}:{n}" for s, n in sorted(self.by_status().items()))


# --- one scenario -----------------------------------------------------------------------------
@dataclass
class Fault:
    """What a scenario did and when (monotonic clock)."""

    at: float = 0.0  # the first blow
    back: float = 0.0  # everything it took away is back
    faults: int = 1  # how many faults the duplicate bound allows for
    partitions: set[int] = field(default_factory=set)  # partitions it hit, if known
    notes: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    row: Row
    fault: Fault
    api: ApiCallers
    tracker: Tracker
    publisher: Publisher


def cluster_settings(cluster: LocalCluster, model: Path, state: Path, **update: object) -> Settings:
    uid = uuid.uuid4().hex[:10]
    base = fresh_settings(cluster.bootstrap, uid, topic_partitions=6, replies_partitions=2)
    create_topics(base, timeout_s=30)
    settings = chaos_settings(base, model, state, rate_limit="off", api_reply_partition=0)
    # The worker-kill scenarios shorten session.timeout.ms to 10 s to measure stalls; a
    # broker failover takes longer than that (9 s before the controller fences a dead
    # broker, then the election and the new coordinator's load), and a session that times
    # out during it loses its partitions and redoes every batch since its last commit.
    # Here the workers keep librdkafka's 45 s, as in production, and its 60 s
    # transaction.timeout.ms (the suite's 10 s hid a stall after the transaction
    # coordinator's death: docs/RELIABILITY.md, the cluster section).
    production = {"session.timeout.ms", "transaction.timeout.ms"}
    extra = {k: v for k, v in settings.kafka_extra.items() if k not in production}
    return settings.model_copy(update={"kafka_extra": extra, **update})


def first_new_result(
    publisher: Publisher, tracker: Tracker, since: float, partitions: set[int] | None = None
) -> float | None:
    """Seconds from ``since`` to the first result of an image sent after it (on
    ``partitions`` only, when given)."""
    with tracker._lock:
        firsts = [
            min(times)
            for rid, times in tracker.arrivals.items()
            if publisher.sent_at.get(rid, 0.0) >= since
            and (partitions is None or publisher.partition.get(rid) in partitions)
        ]
    return min(firsts) - since if firsts else None


def run_scenario(
    name: str,
    scene: Scene,
    settings: Settings,
    act: Callable[[Fault], None],
    *,
    pod_env: dict[str, str] | None = None,
    per_pod: tuple[int, ...] = (WORKERS,),
) -> Outcome:
    """Stream, call the API, ``act`` (the fault, blocking until it is over), stream on,
    then count and check the promises every scenario keeps."""
    crew, logs = scene.pods, scene.logdir
    tracker = Tracker(settings)
    tracker.start()
    scene.cleanups.append(tracker.stop)
    for i, workers in enumerate(per_pod):
        crew.append(Pod(settings, f"pod-{'abc'[i]}", workers, logs, **(pod_env or {})))
    for pod, workers in zip(crew, per_pod, strict=True):
        pod.wait_ready(workers, timeout_s=120)
    api = ApiCallers(settings)
    scene.cleanups.append(api.stop)
    api.start()
    started = time.monotonic()
    publisher = Publisher(settings, int(RATE * 3600), RATE, uuid.uuid4().hex[:8])
    publisher.start()
    fault = Fault()
    try:
        time.sleep(WARM_S)
        act(fault)
        time.sleep(TAIL_S)
    finally:
        publisher.stop(120)
        api.stop()
    assert not publisher.errors, publisher.errors[:5]
    drain = 180 + publisher.sent / 20
    tracker.wait_for(publisher.ids, drain)
    results, missing, duplicates, stall = figures(publisher, tracker)
    bound = (
        0
        if settings.processing_guarantee == "exactly_once"
        else fault.faults * sum(per_pod) * settings.max_batch
    )
    first = first_new_result(publisher, tracker, fault.at)
    after_back = first_new_result(publisher, tracker, fault.back) if fault.back else None
    hit = (
        first_new_result(publisher, tracker, fault.at, fault.partitions)
        if fault.partitions
        else None
    )
    recovery = [
        f"fault→first new result {first:.1f} s" if first is not None else "no new result",
        *([f"on its partitions {hit:.1f} s"] if hit is not None else []),
        *(
            [f"after the return {after_back:.1f} s"]
            if after_back is not None and fault.back > fault.at
            else []
        ),
        *fault.notes,
        api.summary(),
    ]
    row = Row(
        name,
        settings.processing_guarantee,
        publisher.sent,
        results,
        missing,
        duplicates,
        f"<= {bound}",
        fault.faults,
        sum(p.restarts() for p in crew),
        stall,
        "; ".join(recovery),
        time.monotonic() - started,
    )
    ROWS.append(row)
    log(f"{name}: {row}")
    tracker.stop()
    for pod in crew:
        assert pod.stop() == 0, pod.log.read_text(errors="replace")[-3000:]
    assert row.missing == 0
    assert row.duplicates <= bound, row
    assert api.by_status()[500] == 0, api.summary()
    assert not any(a.mismatched for a in api.answers), "a caller got another request's result"
    assert api.by_status()[200] > 0, api.summary()
    return Outcome(row, fault, api, tracker, publisher)


def kill_and_return(cluster: LocalCluster, fault: Fault, node: int, what: str) -> None:
    log(f"kill -9 node {node} ({what})")
    fault.at = time.monotonic()
    cluster.kill(node)
    time.sleep(DOWN_S)
    took = cluster.up()
    fault.back = time.monotonic()
    fault.notes.append(f"node {node} ({what}) away {fault.back - fault.at:.0f} s")
    log(f"node {node} back ({took:.0f} s to start)")


# --- scenarios --------------------------------------------------------------------------------
def test_kill_9_of_the_leader_of_most_image_partitions_loses_nothing(
    scene: Scene,
    model_path: Path,  # noqa: F811
) -> None:
    """The workers are rack-aware and sit in the victim's rack, so they fetch from it
    (KIP-392) even for partitions it only follows: when it dies they fall back to the
    leaders."""
    cluster = scene.cluster
    scenario_enabled("leader")
    settings = cluster_settings(cluster, model_path, scene.state)
    victim = cluster.leader_of_most(settings.topic_images)

    def act(fault: Fault) -> None:
        fault.partitions = cluster.partitions_led_by(settings.topic_images, victim)
        kill_and_return(cluster, fault, victim, f"leader of {len(fault.partitions)}/6")

    run_scenario(
        "kill -9 the leader of most qr.images partitions, back after 20 s",
        scene,
        settings,
        act,
        pod_env={"QRSIGHT_KAFKA_CLIENT_RACK": f"rack-{victim}"},
    )


def test_kill_9_of_the_active_controller_loses_nothing(
    scene: Scene,
    model_path: Path,  # noqa: F811
) -> None:
    cluster = scene.cluster
    scenario_enabled("controller")
    settings = cluster_settings(cluster, model_path, scene.state)

    def act(fault: Fault) -> None:
        node = cluster.active_controller()
        fault.partitions = cluster.partitions_led_by(settings.topic_images, node)
        kill_and_return(cluster, fault, node, "active controller")
        fault.notes.append(f"new controller {cluster.active_controller()}")

    run_scenario("kill -9 the active controller, back after 20 s", scene, settings, act)


def test_kill_9_of_the_workers_group_coordinator_loses_nothing(
    scene: Scene,
    model_path: Path,  # noqa: F811
) -> None:
    cluster = scene.cluster
    scenario_enabled("group-coordinator")
    settings = cluster_settings(cluster, model_path, scene.state)

    def act(fault: Fault) -> None:
        node = cluster.group_coordinator(settings.consumer_group)
        fault.partitions = cluster.partitions_led_by(settings.topic_images, node)
        kill_and_return(cluster, fault, node, "group coordinator")

    run_scenario("kill -9 the workers' group coordinator, back after 20 s", scene, settings, act)


def test_exactly_once_kill_9_of_the_transaction_coordinator_shows_no_duplicate(
    scene: Scene,
    model_path: Path,  # noqa: F811
) -> None:
    cluster = scene.cluster
    scenario_enabled("transaction-coordinator")
    settings = cluster_settings(
        cluster, model_path, scene.state, processing_guarantee="exactly_once"
    )

    def act(fault: Fault) -> None:
        node = cluster.transaction_coordinator()
        fault.partitions = cluster.partitions_led_by(settings.topic_images, node)
        kill_and_return(cluster, fault, node, "transaction coordinator")

    run_scenario(
        "exactly-once: kill -9 the transaction coordinator, back after 20 s",
        scene,
        settings,
        act,
    )


def test_two_of_three_brokers_down_30_s_stops_the_stream_without_loss_and_the_api_answers_503(
    scene: Scene,
    model_path: Path,  # noqa: F811
) -> None:
    """Fewer in-sync replicas than min.insync.replicas (and no controller quorum): no
    write is acknowledged, so workers hold their batches and offsets; the API refuses new
    calls with 503 and Retry-After once its produce timeout passes, not its reply timeout."""
    cluster = scene.cluster
    scenario_enabled("two-down")
    settings = cluster_settings(cluster, model_path, scene.state)
    controller = cluster.active_controller()
    victims = [controller, next(n for n in NODES if n != controller)]

    def act(fault: Fault) -> None:
        log(f"kill -9 nodes {victims}")
        fault.at = time.monotonic()
        for node in victims:
            cluster.kill(node)
        time.sleep(TWO_DOWN_S)
        cluster.up()
        fault.back = time.monotonic()
        fault.notes.append(f"nodes {victims} away {fault.back - fault.at:.0f} s")

    outcome = run_scenario("two of three brokers down 30 s", scene, settings, act)
    row, fault, api = outcome.row, outcome.fault, outcome.api
    # calls begun once the outage was a produce timeout old, until it ended
    settle = settings.api_produce_timeout_ms / 1000
    during = [a for a in api.answers if fault.at + settle < a.at < fault.back - 1]
    refused = [a for a in during if a.status == 503]
    slowest = max((a.took_s for a in refused), default=0.0)
    log(f"API during the outage: {Counter(a.status for a in during)}, slowest 503 {slowest:.1f} s")
    row.recovery += f"; during it {len(refused)}/{len(during)} calls 503 in <= {slowest:.1f} s"
    assert refused, "the API refused nothing while writes were impossible"
    assert all(a.retry_after for a in refused), "every 503 says when to retry"
    assert slowest < settle + 2.0, "a 503 comes within the produce timeout, not the reply wait"


def test_a_rolling_restart_of_the_three_brokers_loses_nothing(
    scene: Scene,
    model_path: Path,  # noqa: F811
) -> None:
    """One broker at a time, as an operator upgrades Kafka: stop (controlled shutdown),
    start, wait until every partition is back in sync, then the next."""
    cluster = scene.cluster
    scenario_enabled("rolling-brokers")
    settings = cluster_settings(cluster, model_path, scene.state)

    def act(fault: Fault) -> None:
        fault.at = time.monotonic()
        fault.faults = len(NODES)
        for node in NODES:
            log(f"rolling restart: node {node}")
            cluster.down(node)
            cluster.up()
            synced = cluster.wait_in_sync()
            fault.notes.append(f"node {node} in sync {synced:.0f} s after its start")
        fault.back = time.monotonic()

    run_scenario("rolling restart of the three brokers", scene, settings, act)


def test_a_rolling_restart_of_the_workers_onto_a_new_model_names_the_model_of_every_result(
    scene: Scene, model_v1: Path, model_v2: Path
) -> None:
    """Two one-worker crew (StatefulSet crew, static membership) are replaced one at a
    time by crew serving model 2.0: every result names 1.0 or 2.0, and every image sent
    once both run 2.0 is answered by 2.0."""
    cluster = scene.cluster
    scenario_enabled("rolling-workers")
    settings = cluster_settings(cluster, model_v1, scene.state)
    crew, logs = scene.pods, scene.logdir
    marks: dict[str, float] = {}

    def act(fault: Fault) -> None:
        fault.at = time.monotonic()
        fault.faults = 2
        for i in range(2):
            old = crew[i]
            log(f"rolling restart: {old.name} onto model {MODEL_V2}")
            assert old.stop() == 0
            new = Pod(settings, old.name, 1, logs, QRSIGHT_MODEL_PATH=str(model_v2))
            crew[i] = new
            new.wait_ready(1, timeout_s=120)
        fault.back = marks["all-v2"] = time.monotonic()

    outcome = run_scenario(
        "rolling restart of the workers onto a new model",
        scene,
        settings,
        act,
        per_pod=(1, 1),
    )
    versions = {
        rid: {name.rsplit(" ", 1)[1] for name in names}
        for rid, names in outcome.tracker.models.items()
        if rid in outcome.publisher.sent_at
    }
    assert set().union(*versions.values()) == {MODEL_V1, MODEL_V2}, "both models served"
    late = [rid for rid, at in outcome.publisher.sent_at.items() if at > marks["all-v2"]]
    assert late, "no image sent after the restart"
    assert all(versions[rid] == {MODEL_V2} for rid in late), "new images go to model 2.0"


def test_a_rack_aware_worker_gets_every_image_and_fetches_from_its_own_rack(
    scene: Scene,
    model_path: Path,  # noqa: F811
) -> None:
    """KIP-392 on the local cluster (broker.rack=rack-<id>, RackAwareReplicaSelector): a
    worker with ``QRSIGHT_KAFKA_CLIENT_RACK`` gets every image, and a reader in rack N
    fetches partitions led by other nodes from node N."""
    cluster, crew, logs = scene.cluster, scene.pods, scene.logdir
    settings = cluster_settings(cluster, model_path, scene.state)
    rack_node = 3
    crew.append(Pod(settings, "pod-a", 1, logs, QRSIGHT_KAFKA_CLIENT_RACK=f"rack-{rack_node}"))
    crew[0].wait_ready(1, timeout_s=120)
    tracker = Tracker(settings)
    tracker.start()
    scene.cleanups.append(tracker.stop)
    publisher = Publisher(settings, 300, 50, "rack")
    publisher.start()
    publisher.join(120)
    assert not publisher.errors
    assert tracker.wait_for(publisher.ids, 180), "a rack-aware worker missed images"
    _, missing, duplicates, _ = figures(publisher, tracker)
    tracker.stop()
    assert crew[0].stop() == 0
    assert (missing, duplicates) == (0, 0)
    fetched_from = fetching_brokers(settings.model_copy(update={"kafka_client_rack": "rack-3"}))
    others = cluster.admin().list_topics(settings.topic_images, timeout=10)
    led_elsewhere = {
        p.id
        for p in others.topics[settings.topic_images].partitions.values()
        if p.leader != rack_node
    }
    assert led_elsewhere, "node 3 leads every partition: nothing to fetch from a follower"
    assert {fetched_from[p] for p in led_elsewhere} == {rack_node}, fetched_from


def fetching_brokers(settings: Settings, timeout_s: float = 60) -> dict[int, int]:
    """Partition → the broker a consumer with these settings fetches it from (librdkafka's
    statistics: ``partitions[p].broker``), once it has read every partition."""
    stats: list[dict[str, Any]] = []
    conf = consumer_config(
        settings,
        f"rack-reader-{uuid.uuid4().hex[:6]}",
        role="rack-reader",
        **{"statistics.interval.ms": 1000, "stats_cb": lambda s: stats.append(json.loads(s))},
    )
    reader = Consumer(conf)
    topic = settings.topic_images
    reader.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(6)])
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for msg in reader.consume(100, 0.5):
                partition = msg.partition()
                if not msg.error() and partition is not None:
                    seen.add(partition)
            if len(seen) == 6 and stats:
                parts = stats[-1]["topics"][topic]["partitions"]
                found = {int(p): int(v["broker"]) for p, v in parts.items() if int(p) >= 0}
                if all(found.get(p, -1) > 0 for p in range(6)):
                    return found
    finally:
        reader.close()
    raise AssertionError(f"read partitions {sorted(seen)}; last stats {stats[-1:]}")
