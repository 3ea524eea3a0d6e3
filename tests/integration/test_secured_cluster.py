"""The three-node cluster secured (``make cluster-up KAFKA_SECURITY=sasl_ssl``): every node
authenticates to the others, the roles' settings files name all three nodes, a worker and
the API with their own credentials return a result, and the ACLs refuse what the table does
not grant. The rest of the secured behaviour is the single broker's (test_secured.py).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import KafkaError

from tests.chaos.cluster import LocalCluster
from tests.integration.api_stack import free_port, model_path, start
from tests.integration.test_secured import (
    ROLES,
    SecuredBroker,
    _sourced,
    api_process,
    detect_until_ok,
    produce_error,
    ready_answer,
    stop,
    subscribe,
)


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[LocalCluster, SecuredBroker]]:
    home = tmp_path_factory.mktemp("kafka-secured-cluster")
    local = LocalCluster(home, security="sasl_ssl")
    try:
        local.up()
        roles = {role: _sourced(home / "clients" / f"{role}.env") for role in ROLES}
        yield local, SecuredBroker(home, local.ports[1], roles)
    finally:
        local.down()


def test_a_worker_and_the_api_with_their_own_credentials_return_a_result(
    cluster: tuple[LocalCluster, SecuredBroker], tmp_path: Path
) -> None:
    local, secured = cluster
    for role in ROLES:
        assert secured.roles[role]["QRSIGHT_KAFKA_BOOTSTRAP"] == local.bootstrap
    model, real = model_path(tmp_path)
    worker_env = secured.env(
        "worker",
        QRSIGHT_MODEL_PATH=str(model),
        QRSIGHT_METRICS_PORT=str(free_port()),
        QRSIGHT_ORT_INTRA_THREADS="1",
        QRSIGHT_PROCESSING_GUARANTEE="exactly_once",  # transactions on min ISR 2 topics
    )
    worker_log = tmp_path / "worker.log"
    worker = start([sys.executable, "-m", "consumer.cli", "--workers", "1"], worker_env, worker_log)
    url, api, api_log = api_process(secured, tmp_path)
    try:
        status, body = ready_answer(url, 120, until='"ready"')
        assert status == 200, f"{body}\n{api_log.read_text()[-3000:]}"
        _response, results = detect_until_ok(url, "secured-cluster", worker_log)
        if real:
            assert "secured-cluster" in {r["text"] for r in results}
    finally:
        stop(api)
        stop(worker)
    secured.assert_no_secret(api_log.read_text(), worker_log.read_text())


def test_the_reader_can_neither_write_images_nor_read_replies(
    cluster: tuple[LocalCluster, SecuredBroker],
) -> None:
    _local, secured = cluster
    reader = secured.settings("reader")
    err = produce_error(reader, "reader", "qr.images")
    assert err is not None and err.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, err
    refused = subscribe(reader, "reader", "qr.replies", "qrsight-results-replies")
    assert isinstance(refused, KafkaError), refused
    assert refused.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, refused


def test_a_killed_node_is_restarted_alone_and_rejoins_the_secured_cluster(
    cluster: tuple[LocalCluster, SecuredBroker],
) -> None:
    local, secured = cluster
    before = {node: local.pid(node) for node in (1, 2)}
    local.kill(3)
    out = local.kafka("cluster-up")  # waits until all three are brokers of the cluster again
    assert "started: 3)" in out, out
    assert {node: local.pid(node) for node in (1, 2)} == before
    reader = secured.settings("reader")
    assert subscribe(reader, "reader", "qr.detections", "qrsight-results-rejoined") == "assigned"
