"""A local three-node Kafka cluster for the failover scenarios, driven only through the
outside interfaces an operator has: ``deploy/local/kafka.sh cluster-up`` (starts every
node that is not running), ``cluster-down [ID]`` and ``pid ID``, plus the cluster's own
metadata (who leads what) read with the admin client.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

from confluent_kafka.admin import AdminClient

REPO = Path(__file__).resolve().parents[2]
KAFKA_SH = REPO / "deploy" / "local" / "kafka.sh"
NODES = (1, 2, 3)


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (held open together so none is handed out twice)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


class LocalCluster:
    """Three combined broker + controller nodes in ``home``, on free ports."""

    def __init__(
        self, home: Path, start_timeout_s: float = 240, security: str = "plaintext"
    ) -> None:
        self.home = home
        ports = free_ports(6)
        self.env = {
            **os.environ,
            "KAFKA_SECURITY": security,  # sasl_ssl: TLS, SCRAM and ACLs (clients/<role>.env)
            "KAFKA_CLUSTER_DIR": str(home),
            "KAFKA_CLUSTER_PORTS": ",".join(map(str, ports[:3])),
            "KAFKA_CLUSTER_CONTROLLER_PORTS": ",".join(map(str, ports[3:])),
            "KAFKA_START_TIMEOUT": str(int(start_timeout_s)),
        }
        self.bootstrap = ",".join(f"127.0.0.1:{p}" for p in ports[:3])
        self.ports = dict(zip(NODES, ports[:3], strict=True))

    # --- the operator's commands ------------------------------------------------------------
    def kafka(self, *args: str, timeout_s: float = 600) -> str:
        done = subprocess.run(
            [str(KAFKA_SH), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        assert done.returncode == 0, f"kafka.sh {' '.join(args)}: {done.stdout}\n{done.stderr}"
        return done.stdout

    def up(self) -> float:
        """``make cluster-up``: start the nodes that are down; seconds it took."""
        started = time.monotonic()
        self.kafka("cluster-up")
        return time.monotonic() - started

    def down(self, node: int | None = None) -> None:
        """A clean stop (SIGTERM: controlled shutdown) of one node, or all."""
        self.kafka("cluster-down", *([str(node)] if node else []))

    def pid(self, node: int) -> int:
        return int(self.kafka("pid", str(node)).strip())

    def kill(self, node: int) -> None:
        """kill -9, as a lost host."""
        pid = self.pid(node)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    # --- what the metadata says --------------------------------------------------------------
    def admin(self) -> AdminClient:
        return AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})

    def leaders(self, topic: str) -> Counter[int]:
        """Node id → partitions of ``topic`` it leads."""
        meta = self.admin().list_topics(topic, timeout=10)
        return Counter(p.leader for p in meta.topics[topic].partitions.values())

    def partitions_led_by(self, topic: str, node: int) -> set[int]:
        meta = self.admin().list_topics(topic, timeout=10)
        return {p.id for p in meta.topics[topic].partitions.values() if p.leader == node}

    def leader_of_most(self, topic: str) -> int:
        return self.leaders(topic).most_common(1)[0][0]

    def active_controller(self) -> int:
        """The KRaft quorum leader, from the quorum state the live nodes keep (the brokers'
        DescribeCluster names any live broker as "controller" in KRaft, KIP-919)."""
        best = (-1, -1)
        for node in NODES:
            path = self.home / f"node-{node}" / "data" / "__cluster_metadata-0" / "quorum-state"
            with contextlib.suppress(OSError, ValueError):
                state = json.loads(path.read_text())
                best = max(best, (int(state["leaderEpoch"]), int(state["leaderId"])))
        assert best[1] > 0, "no quorum leader recorded"
        return best[1]

    def group_coordinator(self, group: str, timeout_s: float = 60) -> int:
        """The broker coordinating ``group`` (asked again while the cluster is busy)."""
        deadline = time.monotonic() + timeout_s
        admin = self.admin()  # kept: a collected client never completes its futures
        while True:
            future = admin.describe_consumer_groups([group], request_timeout=10)[group]
            try:
                return int(future.result(timeout=15).coordinator.id)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def transaction_coordinator(self) -> int:
        """The leader of ``__transaction_state`` partition 0: the cluster has one partition
        of it (cluster.properties.template), so it coordinates every transactional id."""
        topic = "__transaction_state"
        meta = self.admin().list_topics(topic, timeout=10)
        assert topic in meta.topics and meta.topics[topic].error is None, "no transactions yet"
        return int(meta.topics[topic].partitions[0].leader)

    def wait_in_sync(self, timeout_s: float = 120) -> float:
        """Until every partition has all its replicas in sync (what an operator checks
        before restarting the next broker); seconds it took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            with contextlib.suppress(Exception):
                meta = self.admin().list_topics(timeout=5)
                lagging = [
                    (t.topic, p.id)
                    for t in meta.topics.values()
                    for p in t.partitions.values()
                    if len(p.isrs) < len(p.replicas)
                ]
                if len(meta.brokers) == len(NODES) and not lagging:
                    return time.monotonic() - started
            time.sleep(0.5)
        raise AssertionError(f"partitions not back in sync after {timeout_s:g} s")
