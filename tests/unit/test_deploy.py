"""The deploy files (compose, Kubernetes, Dockerfiles, Prometheus, Grafana) validated
statically and kept true to the code: every ``QRSIGHT_*`` name is a setting, every
probe and scrape hits a path and port the code serves."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from flask import Flask

from core.runtime.kafka import consumer_config, replication_for, topic_specs
from core.runtime.settings import DEFAULT_MODEL, DEFAULT_VERIFIER, Settings, load_settings
from tests.unit import deploy_checks as dc

COMPOSE_FILE = dc.ROOT / "docker-compose.yml"
DOCKERFILES = [dc.ROOT / "deploy/docker/Dockerfile", dc.ROOT / "deploy/docker/Dockerfile.cuda"]
OVERLAYS = ["cpu", "gpu", "cpu-sasl-ssl"]
# oldest supported (the API's pod-index label is on by default from 1.28) and newest bundled
K8S_VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]
CUSTOM_KINDS = {"ScaledObject", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
QRSIGHT_SERVICES = ["topics", "consumer", "consumer-gpu", "api"]


def defaults() -> Settings:
    return load_settings({})


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dc.load_compose(COMPOSE_FILE)


@pytest.fixture(scope="module")
def base_docs() -> list[dc.Doc]:
    return dc.render_kustomization(dc.K8S / "base")


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dc.Doc]]:
    return request.param, dc.render_kustomization(dc.K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def api_routes() -> set[str]:
    """The routes the API serves: the blueprints ``create_app`` registers."""
    from api import detect, health, metrics, openapi

    app = Flask("routes")
    for blueprint in (detect.bp, health.bp, metrics.bp, openapi.bp):
        app.register_blueprint(blueprint)
    return {rule.rule for rule in app.url_map.iter_rules()}


@pytest.fixture(scope="module")
def worker_server() -> Iterator[int]:
    """A real worker metrics/health server on a free port."""
    from consumer.metrics import MetricsServer, WorkerMetrics

    server = MetricsServer(WorkerMetrics(0), 0, live=lambda: True, host="127.0.0.1").start()
    yield server.port
    server.close()


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def worker_serves(port: int, path: str) -> bool:
    return http_status(f"http://127.0.0.1:{port}{path}") != 404


# --- docker compose ---------------------------------------------------------------------
def test_compose_file_passes_docker_compose_config() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing: .ci/run installs Debian's docker-compose")
        pytest.skip("Debian's docker-compose is not installed (apt-get install docker-compose)")
    for args in ([], ["--profile", "gpu"]):
        done = subprocess.run(
            [binary, "-f", str(COMPOSE_FILE), *args, "config", "-q"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr


def test_compose_names_only_real_settings_with_valid_values(compose: dict[str, Any]) -> None:
    assert dc.compose_problems(compose) == []
    for name in QRSIGHT_SERVICES:
        env = dc.compose_env(compose["services"][name])
        settings = load_settings({k: v for k, v in env.items() if k.startswith("QRSIGHT_")})
        assert settings.kafka_bootstrap == "kafka:29092", name


def test_a_wrong_env_name_in_compose_is_reported(compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["consumer"]["environment"]["QRSIGHT_MAX_BATCHES"] = "8"
    assert dc.compose_problems(broken) == [
        "docker-compose.yml service consumer: QRSIGHT_MAX_BATCHES is not a qrsight setting"
    ]


def test_compose_kafka_listens_for_containers_and_the_host(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    env = dc.compose_env(kafka)
    assert kafka["image"].startswith("apache/kafka:4.")
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    advertised = dict(
        reversed(item.split("://", 1)) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    )
    assert set(advertised) == {"kafka:29092", "localhost:9092"}
    assert "9092:9092" in kafka["ports"]
    listener_names = {item.split("://")[0] for item in env["KAFKA_LISTENERS"].split(",")}
    protocol_map = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert listener_names == set(protocol_map)
    assert "kafka:29092" in kafka["healthcheck"]["test"]


def test_compose_services_start_in_order(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["topics"]["command"] == ["qrsight-topics", "create"]
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    for name in ("consumer", "consumer-gpu", "api"):
        condition = services[name]["depends_on"]["topics"]["condition"]
        assert condition == "service_completed_successfully", name
    assert services["consumer"]["command"] == ["qrsight-consumer"]
    assert services["api"]["command"] == ["qrsight-api"]


def test_compose_gpu_workers_reserve_an_nvidia_gpu(compose: dict[str, Any]) -> None:
    gpu = compose["services"]["consumer-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "deploy/docker/Dockerfile.cuda"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "profiles" not in compose["services"]["consumer"]


def test_compose_ports_are_the_settings_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    api_env = load_settings(dc.compose_env(services["api"]))
    assert api_env.api_port == defaults().api_port
    assert f"{api_env.api_port}:{api_env.api_port}" in services["api"]["ports"]
    for name in ("consumer", "consumer-gpu"):
        worker = load_settings(dc.compose_env(services[name]))
        assert worker.workers == 1, "Prometheus scrapes one port per worker container"
        assert str(worker.metrics_port) in services[name]["expose"]


def test_compose_mounts_exist(compose: dict[str, Any]) -> None:
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (dc.ROOT / source).exists(), volume
        build = service.get("build")
        if build:
            assert (dc.ROOT / build["context"] / build["dockerfile"]).is_file()


def test_compose_host_ports_are_variables_and_kafka_advertises_the_published_one() -> None:
    """Another free port on the host (``make compose-test`` on a shared machine) moves the
    published port and the address Kafka gives host clients together."""
    env = {"KAFKA_HOST_PORT": "19092", "API_HOST_PORT": "18000"}
    env |= {"PROMETHEUS_HOST_PORT": "19090", "GRAFANA_HOST_PORT": "13000"}
    services = dc.load_compose(COMPOSE_FILE, env)["services"]
    assert services["kafka"]["ports"] == ["19092:9092"]
    advertised = dc.compose_env(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"]
    assert "EXTERNAL://localhost:19092" in advertised.split(",")
    assert services["api"]["ports"] == [f"18000:{defaults().api_port}"]
    assert services["prometheus"]["ports"] == ["19090:9090"]
    assert services["grafana"]["ports"] == ["13000:3000"]


def test_compose_prometheus_keeps_its_data_in_its_volume(compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    flags = dict(arg.split("=", 1) for arg in prometheus["command"])
    mounts = {v.split(":")[1] for v in prometheus["volumes"] if not v.startswith("./")}
    assert flags["--storage.tsdb.path"] in mounts


# --- Prometheus and Grafana ---------------------------------------------------------------
def test_prometheus_scrapes_what_the_code_serves(
    compose: dict[str, Any], api_routes: set[str], worker_server: int
) -> None:
    config = dc.load_one(dc.ROOT / "deploy/prometheus/prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    for job_name, service in (
        ("qrsight-workers", "consumer"),
        ("qrsight-workers-gpu", "consumer-gpu"),
    ):
        job = jobs[job_name]
        (sd,) = job["dns_sd_configs"]
        assert sd["names"] == [service]
        assert (
            sd["port"] == load_settings(dc.compose_env(compose["services"][service])).metrics_port
        )
        assert http_status(f"http://127.0.0.1:{worker_server}{job['metrics_path']}") == 200
    api = jobs["qrsight-api"]
    assert api["metrics_path"] in api_routes
    assert api["static_configs"][0]["targets"] == [f"api:{defaults().api_port}"]


def metric_labels() -> dict[str, set[str]]:
    """Metric family name -> label names, from the workers' and the API's real metrics."""
    from prometheus_client.metrics import MetricWrapperBase

    from api import metrics as api_metrics
    from consumer.metrics import WorkerMetrics

    found: dict[str, set[str]] = {}
    objects = [*vars(WorkerMetrics(0)).values(), *vars(api_metrics).values()]
    for obj in objects:
        if isinstance(obj, MetricWrapperBase):
            found[obj._name] = set(obj._labelnames)
    return found


def base_metric(series: str, known: dict[str, set[str]]) -> str | None:
    for suffix in ("", "_total", "_bucket", "_sum", "_count", "_info"):
        if series.endswith(suffix) and series[: len(series) - len(suffix)] in known:
            return series[: len(series) - len(suffix)]
    return None


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((dc.ROOT / "deploy/grafana/dashboards/qrsight.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_queries_name_real_metrics_and_labels() -> None:
    known = metric_labels()
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    for expr in exprs:
        names = re.findall(r"\bqrsight_[a-z0-9_]+", expr)
        assert names, expr
        for series in names:
            family = base_metric(series, known)
            assert family, f"{series} in {expr!r} is not a metric the code exports"
            used = set(re.findall(r"\b(\w+)\s*(?:=|!=|=~|!~)\s*\"", expr))
            for group in re.findall(r"by \(([^)]*)\)", expr):
                used |= {label.strip() for label in group.split(",")}
            assert used <= known[family] | {"le"}, f"{expr!r}: labels {used - known[family]}"


def test_dashboard_covers_what_operators_watch() -> None:
    joined = " ".join(dashboard_exprs())
    for family in (
        "qrsight_worker_images_total",
        "qrsight_worker_batch_size",
        "qrsight_worker_stage_seconds",
        "qrsight_worker_consumer_lag",
        "qrsight_worker_dlq_messages_total",
        "qrsight_api_requests_total",
        "qrsight_api_request_seconds",
    ):
        assert family in joined, family


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard(
    compose: dict[str, Any],
) -> None:
    datasource = dc.load_one(dc.ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml")
    (ds,) = datasource["datasources"]
    assert ds["url"] == "http://prometheus:9090"
    dashboard = json.loads((dc.ROOT / "deploy/grafana/dashboards/qrsight.json").read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] for t in p.get("targets", [])}
    assert uids == {ds["uid"]}
    provider = dc.load_one(dc.ROOT / "deploy/grafana/provisioning/dashboards/qrsight.yml")
    path = provider["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{path}:ro" in compose["services"]["grafana"]["volumes"]


# --- Kubernetes -----------------------------------------------------------------------------
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_k8s_core_objects_match_the_kubernetes_schemas(
    overlay: tuple[str, list[dc.Doc]], version: str
) -> None:
    _, docs = overlay
    core = [doc for doc in docs if doc["kind"] not in CUSTOM_KINDS]
    assert {d["kind"] for d in core} >= {
        "Namespace",
        "ConfigMap",
        "Job",
        "StatefulSet",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    for doc in core:
        kubernetes_validate.validate(doc, version, strict=True)


def test_k8s_example_secret_is_a_valid_secret_with_placeholders() -> None:
    secret = dc.load_one(dc.K8S / "base/secret.example.yaml")
    kubernetes_validate.validate(secret, K8S_VERSIONS[-1], strict=True)
    assert all(v.startswith("REPLACE-") for v in secret["stringData"].values())
    base = dc.load_one(dc.K8S / "base/kustomization.yaml")
    assert "secret.example.yaml" not in base["resources"]


def test_k8s_names_only_real_settings_with_valid_values(base_docs: list[dc.Doc]) -> None:
    assert dc.k8s_problems(base_docs) == []
    config = dc.find(base_docs, "ConfigMap", "qrsight-config")["data"]
    for doc in base_docs:
        for container in dc.containers(doc):
            load_settings({**config, **dc.literal_env(container)})


def test_a_wrong_env_name_in_k8s_is_reported(base_docs: list[dc.Doc]) -> None:
    broken = json.loads(json.dumps(base_docs))
    dc.find(broken, "ConfigMap")["data"]["QRSIGHT_KAFKA_BOOTSTRAP_SERVERS"] = "k:9092"
    workers = dc.find(broken, "StatefulSet", "qrsight-workers")
    next(dc.containers(workers))["env"].append({"name": "QRSIGHT_WORKER", "value": "2"})
    assert dc.k8s_problems(broken) == [
        "ConfigMap/qrsight-config: QRSIGHT_KAFKA_BOOTSTRAP_SERVERS is not a qrsight setting",
        "StatefulSet/qrsight-workers: QRSIGHT_WORKER is not a qrsight setting",
    ]


def test_k8s_secrets_come_from_secret_refs(base_docs: list[dc.Doc]) -> None:
    config = dc.find(base_docs, "ConfigMap", "qrsight-config")["data"]
    secret_settings = {"QRSIGHT_AUTH_JWT_SECRET", "QRSIGHT_KAFKA_SASL_PASSWORD"}
    assert not secret_settings & set(config)
    api = next(dc.containers(dc.find(base_docs, "StatefulSet", "qrsight-api")))
    refs = {e["name"] for e in api["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs == secret_settings
    for doc in base_docs:
        for container in dc.containers(doc):
            assert not secret_settings & set(dc.literal_env(container))


def port_number(container: dc.Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def probes(container: dc.Doc) -> dict[str, tuple[str, int]]:
    return {
        kind: (
            container[kind]["httpGet"]["path"],
            port_number(container, container[kind]["httpGet"]["port"]),
        )
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }


def test_k8s_worker_probes_hit_what_the_worker_serves(
    base_docs: list[dc.Doc], worker_server: int
) -> None:
    config = dc.find(base_docs, "ConfigMap", "qrsight-config")["data"]
    container = next(dc.containers(dc.find(base_docs, "StatefulSet", "qrsight-workers")))
    settings = load_settings({**config, **dc.literal_env(container)})
    assert settings.workers == 1
    found = probes(container)
    assert found["livenessProbe"] == ("/healthz", settings.metrics_port)
    assert found["readinessProbe"] == ("/readyz", settings.metrics_port)
    for path, _ in found.values():
        assert worker_serves(worker_server, path), path
    assert http_status(f"http://127.0.0.1:{worker_server}/healthz") == 200


def test_k8s_api_probes_hit_what_the_api_serves(
    base_docs: list[dc.Doc], api_routes: set[str]
) -> None:
    config = dc.find(base_docs, "ConfigMap", "qrsight-config")["data"]
    container = next(dc.containers(dc.find(base_docs, "StatefulSet", "qrsight-api")))
    settings = load_settings({**config, **dc.literal_env(container)})
    found = probes(container)
    assert found["livenessProbe"] == ("/api/v1/health", settings.api_port)
    assert found["readinessProbe"] == ("/api/v1/ready", settings.api_port)
    assert settings.api_port == defaults().api_port
    for path, _ in found.values():
        assert path in api_routes


def test_k8s_api_pods_each_own_a_reply_partition(base_docs: list[dc.Doc]) -> None:
    config = load_settings(dc.find(base_docs, "ConfigMap", "qrsight-config")["data"])
    api = dc.find(base_docs, "StatefulSet", "qrsight-api")
    container = next(dc.containers(api))
    env = {e["name"]: e for e in container["env"]}
    field = env["QRSIGHT_API_REPLY_PARTITION"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert field == "metadata.labels['apps.kubernetes.io/pod-index']"
    workers_per_pod = int(env["QRSIGHT_API_WORKERS"]["value"])
    hpa = dc.find(base_docs, "HorizontalPodAutoscaler", "qrsight-api")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "qrsight-api",
    }
    assert hpa["spec"]["maxReplicas"] * workers_per_pod <= config.replies_partitions
    assert "replicas" not in api["spec"], "the HPA owns the API's replicas"


def test_k8s_keda_scales_workers_on_images_lag_up_to_the_partitions(
    base_docs: list[dc.Doc],
) -> None:
    settings = load_settings(dc.find(base_docs, "ConfigMap", "qrsight-config")["data"])
    scaled = dc.find(base_docs, "ScaledObject", "qrsight-workers")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == "qrsight-workers"
    dc.find(base_docs, spec["scaleTargetRef"]["kind"], spec["scaleTargetRef"]["name"])
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] == settings.topic_partitions
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["bootstrapServers"] == settings.kafka_bootstrap
    assert meta["topic"] == settings.topic_images
    assert meta["consumerGroup"] == settings.consumer_group
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata are strings"
    assert int(meta["lagThreshold"]) > 0
    assert meta["allowIdleConsumers"] == "false"
    workers_conf = consumer_config(settings, settings.consumer_group)
    assert meta["offsetResetPolicy"] == workers_conf["auto.offset.reset"]
    assert "replicas" not in dc.find(base_docs, "StatefulSet", "qrsight-workers")["spec"]


def test_k8s_workers_keep_their_identity_across_restarts(
    overlay: tuple[str, list[dc.Doc]], tmp_path: Path
) -> None:
    """StatefulSet pod name → QRSIGHT_GROUP_INSTANCE_ID → group.instance.id and
    transactional.id, the same after a restart (and no service-account token)."""
    _, docs = overlay
    assert dc.worker_identity_problems(docs) == []
    workers = dc.find(docs, "StatefulSet", "qrsight-workers")
    config = dc.find(docs, "ConfigMap", "qrsight-config")["data"]
    container = next(dc.containers(workers))
    pod = "qrsight-workers-3"  # what Kubernetes puts in metadata.name
    settings = load_settings(
        {**config, **dc.literal_env(container), "QRSIGHT_GROUP_INSTANCE_ID": pod},
        state_dir=tmp_path,
    )
    from consumer.worker import Worker

    worker = Worker(settings, 0)
    assert worker.group_instance_id == f"{pod}-0"
    assert worker.transactional_id == f"{settings.consumer_group}-{pod}-0"
    grace = workers["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.shutdown_timeout_s, "SIGTERM finishes the batch before SIGKILL"


@pytest.mark.parametrize(
    ("breakage", "problem"),
    [
        ("deployment", "a StatefulSet keeps them"),
        ("no-instance-id", "QRSIGHT_GROUP_INSTANCE_ID must be the pod name"),
        ("token", "automountServiceAccountToken must be false"),
        ("no-service", "names no headless Service"),
    ],
)
def test_a_worker_identity_lost_on_restart_is_reported(
    base_docs: list[dc.Doc], breakage: str, problem: str
) -> None:
    broken = json.loads(json.dumps(base_docs))
    workers = dc.find(broken, "StatefulSet", "qrsight-workers")
    container = next(dc.containers(workers))
    if breakage == "deployment":
        workers["kind"] = "Deployment"
    elif breakage == "no-instance-id":
        container["env"] = [e for e in container["env"] if e["name"] != "QRSIGHT_GROUP_INSTANCE_ID"]
    elif breakage == "token":
        del workers["spec"]["template"]["spec"]["automountServiceAccountToken"]
    else:
        broken = [
            d
            for d in broken
            if d["metadata"]["name"] != workers["spec"]["serviceName"] or d["kind"] != "Service"
        ]
    problems = dc.worker_identity_problems(broken)
    assert len(problems) == 1 and problem in problems[0], problems


def pod_labels(docs: list[dc.Doc]) -> list[dict[str, str]]:
    return [d["spec"]["template"]["metadata"]["labels"] for d in docs if dc.pod_spec(d)]


def test_k8s_selectors_find_their_pods_and_ports(base_docs: list[dc.Doc]) -> None:
    labels = pod_labels(base_docs)
    for kind in ("PodDisruptionBudget", "Deployment", "StatefulSet"):
        for doc in (d for d in base_docs if d["kind"] == kind):
            selector = doc["spec"]["selector"]["matchLabels"]
            assert any(dc.selects(selector, lab) for lab in labels), doc["metadata"]["name"]
    service = dc.find(base_docs, "Service", "qrsight-api")
    api = dc.find(base_docs, "StatefulSet", "qrsight-api")
    assert dc.selects(service["spec"]["selector"], api["spec"]["template"]["metadata"]["labels"])
    api_ports = {p["name"] for p in next(dc.containers(api))["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= api_ports
    assert dc.find(base_docs, "Service", api["spec"]["serviceName"])["spec"]["clusterIP"] == "None"


def test_k8s_monitors_scrape_the_metrics_endpoints(
    base_docs: list[dc.Doc], api_routes: set[str], worker_server: int
) -> None:
    monitor = dc.find(base_docs, "ServiceMonitor", "qrsight-api")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    services = [d for d in base_docs if d["kind"] == "Service"]
    matched = [
        s
        for s in services
        if dc.selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in matched] == ["qrsight-api"], "scrape each API pod once"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in matched[0]["spec"]["ports"]}
    assert endpoint["path"] in api_routes
    pod_monitor = dc.find(base_docs, "PodMonitor", "qrsight-workers")
    workers = dc.find(base_docs, "StatefulSet", "qrsight-workers")
    assert dc.selects(
        pod_monitor["spec"]["selector"]["matchLabels"],
        workers["spec"]["template"]["metadata"]["labels"],
    )
    (pod_endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert pod_endpoint["port"] in {p["name"] for p in next(dc.containers(workers))["ports"]}
    assert http_status(f"http://127.0.0.1:{worker_server}{pod_endpoint['path']}") == 200


def test_k8s_pods_run_as_the_image_user_without_root(overlay: tuple[str, list[dc.Doc]]) -> None:
    _, docs = overlay
    for doc in docs:
        spec = dc.pod_spec(doc)
        if spec is None:
            continue
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001
        for container in dc.containers(doc):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert "memory" in container["resources"]["limits"], container["name"]


def test_k8s_overlays_pick_cpu_or_gpu_workers(overlay: tuple[str, list[dc.Doc]]) -> None:
    name, docs = overlay
    assert dc.k8s_problems(docs) == []
    workers = next(dc.containers(dc.find(docs, "StatefulSet", "qrsight-workers")))
    api = next(dc.containers(dc.find(docs, "StatefulSet", "qrsight-api")))
    limits = workers["resources"]["limits"]
    env = dc.literal_env(workers)
    if name == "gpu":
        assert limits["nvidia.com/gpu"] == 1
        assert workers["image"].endswith(":0.1.0-cuda")
        assert env["QRSIGHT_ONNX_PROVIDERS"].startswith("CUDAExecutionProvider")
    else:
        assert "nvidia.com/gpu" not in limits
        assert workers["image"].endswith(":0.1.0")
        assert int(env["QRSIGHT_ORT_INTRA_THREADS"]) == int(limits["cpu"])
    assert api["image"].endswith(":0.1.0"), "the API never needs the CUDA image"
    assert env["QRSIGHT_WORKERS"] == "1", "the overlay keeps the base's env"


def test_k8s_kustomization_files_exist() -> None:
    for folder in [dc.K8S / "base", *(dc.K8S / "overlays" / o for o in OVERLAYS)]:
        kustomization = dc.load_one(folder / "kustomization.yaml")
        for entry in kustomization.get("resources", []):
            assert (folder / entry).exists(), f"{folder}: {entry}"
        for patch in kustomization.get("patches", []):
            assert (folder / patch["path"]).is_file(), f"{folder}: {patch['path']}"
    rendered = {p.name for p in (dc.K8S / "base").glob("*.yaml")}
    listed = set(dc.load_one(dc.K8S / "base/kustomization.yaml")["resources"])
    assert rendered - listed == {"kustomization.yaml", "secret.example.yaml"}, "unlisted manifests"


def test_kustomize_merge_matches_kubectl_semantics() -> None:
    base = {
        "containers": [
            {
                "name": "w",
                "env": [{"name": "A", "value": "1"}],
                "resources": {"limits": {"memory": "1Gi"}},
            }
        ]
    }
    patch = {
        "containers": [
            {
                "name": "w",
                "env": [{"name": "B", "value": "2"}],
                "resources": {"limits": {"cpu": "2"}},
            }
        ]
    }
    merged = dc.strategic_merge(base, patch)
    (container,) = merged["containers"]
    assert container["env"] == [{"name": "B", "value": "2"}, {"name": "A", "value": "1"}]
    assert container["resources"]["limits"] == {"memory": "1Gi", "cpu": "2"}


# --- Dockerfiles ----------------------------------------------------------------------------
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_the_lint_checks(path: Path) -> None:
    assert dc.dockerfile_problems(path.read_text(), path.name) == []


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_bakes_in_the_default_models_where_the_settings_point(path: Path) -> None:
    text = path.read_text()
    copies = dc.model_copies(text)
    detector = copies[DEFAULT_MODEL.relative_to(dc.ROOT).as_posix()]
    verifier = copies[DEFAULT_VERIFIER.relative_to(dc.ROOT).as_posix()]
    assert dc.final_env(text)["QRSIGHT_MODEL_PATH"] == detector
    assert dc.final_env(text)["QRSIGHT_VERIFIER_PATH"] == verifier
    settings = load_settings(dc.final_env(text))
    assert (settings.model_path, settings.verifier_path) == (Path(detector), Path(verifier))


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_workers_by_default_and_the_api_by_command(path: Path) -> None:
    final = dc.stages(dc.dockerfile_instructions(path.read_text()))[-1]
    last = {instr: args for instr, args in final}
    assert json.loads(last["CMD"]) == ["qrsight-consumer"]
    assert json.loads(last["ENTRYPOINT"])[0] == "tini"
    assert (
        json.loads(last["HEALTHCHECK"].split("CMD", 1)[1])[-1]
        == "/usr/local/bin/qrsight-healthcheck"
    )
    assert {"8000", "9100"} <= set(last["EXPOSE"].split())
    assert (
        str(defaults().api_port) in last["EXPOSE"]
        and str(defaults().metrics_port) in last["EXPOSE"]
    )


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_everything_the_wheel_is_built_from(path: Path) -> None:
    pyproject = tomllib.loads((dc.ROOT / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(dc.copy_sources(path.read_text()))
    assert {"pyproject.toml", pyproject["project"]["readme"]} <= copied
    assert {pattern.rstrip("*") for pattern in packages} <= copied


def test_cuda_image_swaps_in_onnxruntime_gpu_on_a_cudnn_runtime_base() -> None:
    text = DOCKERFILES[1].read_text()
    instructions = dc.dockerfile_instructions(text)
    cuda_arg = next(a for i, a in instructions if i == "ARG" and a.startswith("CUDA_IMAGE="))
    assert re.fullmatch(
        r"CUDA_IMAGE=nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", cuda_arg
    )
    run = " ".join(a for i, a in instructions if i == "RUN")
    assert run.index("pip uninstall -y onnxruntime") < run.index('pip install "${ORT_GPU}"')
    ort_gpu = next(a for i, a in instructions if i == "ARG" and a.startswith("ORT_GPU="))
    assert "<1.27" in ort_gpu, "onnxruntime-gpu 1.27+ on PyPI needs CUDA 13"


@pytest.mark.parametrize(
    ("snippet", "problem"),
    [
        ("FROM python:latest\n", "not pinned"),
        ("FROM python\n", "has no tag"),
        ("USER root\n", "non-root USER"),
        ("ENV QRSIGHT_MODEL=/m.onnx\n", "QRSIGHT_MODEL is not a qrsight setting"),
        ("RUN apt-get update && apt-get install -y curl\n", "--no-install-recommends"),
        ("HEALTHCHECK NONE\n", "no HEALTHCHECK"),
        ("CMD qrsight-api\n", "exec (JSON) form"),
    ],
)
def test_dockerfile_lint_catches_mistakes(snippet: str, problem: str) -> None:
    text = DOCKERFILES[0].read_text()
    final_from = text.rindex("FROM ")
    if snippet.startswith("FROM"):
        broken = text[:final_from] + snippet + text[text.index("\n", final_from) + 1 :]
    elif snippet.startswith("HEALTHCHECK"):
        broken = text.replace("HEALTHCHECK --interval", "#", 1) + snippet
    else:
        broken = text + snippet
    problems = dc.dockerfile_problems(broken, "Dockerfile")
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pip_steps_get_the_machines_pip_settings_as_build_secrets(path: Path) -> None:
    # Dockerfile.cuda's pip steps had no secret mounts: behind a proxy with its own CA (as on
    # the machines that build it in CI) its build could not reach PyPI.
    assert dc.pip_secret_problems(path.read_text(), path.name) == []


@pytest.mark.parametrize(
    ("snippet", "problem"),
    [
        ("RUN pip install numpy\n", "runs pip without"),
        ("RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf pip wheel .\n", "pip-ca"),
        ("COPY pip.conf /etc/pip.conf\n", "bakes pip settings"),
        ("ENV PIP_CERT=/etc/ssl/certs/proxy.pem\n", "keeps pip settings"),
    ],
)
def test_pip_secret_check_catches_mistakes(snippet: str, problem: str) -> None:
    broken = DOCKERFILES[0].read_text() + snippet
    problems = dc.pip_secret_problems(broken, "Dockerfile")
    assert any(problem in p for p in problems), problems


def test_dockerignore_keeps_what_the_images_copy() -> None:
    patterns = dc.dockerignore_patterns((dc.ROOT / ".dockerignore").read_text())
    sources = {s for path in DOCKERFILES for s in dc.copy_sources(path.read_text())}
    assert {"models/qrsight-qr-v3.onnx", "models/qrsight-qrverify-v2.onnx"} <= sources
    for source in sources:
        assert not dc.dockerignored(source, patterns), source
        assert (dc.ROOT / source).exists() or source.endswith(".onnx") or source == "README.md", (
            source
        )
    for private in (".git", ".kafka", "tests", "models/run-3/best.onnx", "core/__pycache__"):
        assert dc.dockerignored(private, patterns), private


# Base images deploy/local/containers.sh builds a local stand-in for (no registry reachable
# on the project's machines), and the one it does not have (Grafana: not run there).
STAND_INS = {"python", "nvidia/cuda", "apache/kafka", "prom/prometheus"}
WITHOUT_STAND_IN = {"grafana/grafana"}


def external_images(compose: dict[str, Any]) -> set[str]:
    """Every image the Dockerfiles build FROM and every compose image not built here."""
    found = set()
    for path in DOCKERFILES:
        instructions = dc.dockerfile_instructions(path.read_text())
        args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
        stage_names = set()
        for instr, line in instructions:
            if instr == "FROM":
                words = line.split()
                image = dc.resolve_from(words[0], args)
                if image not in stage_names:
                    found.add(image)
                if len(words) == 3 and words[1].upper() == "AS":
                    stage_names.add(words[2])
    for service in compose["services"].values():
        if "build" not in service:
            found.add(service["image"])
    return found


def test_every_base_image_has_a_local_stand_in_or_is_named_in_the_readme(
    compose: dict[str, Any],
) -> None:
    """A new base image needs a stand-in recipe (or ``make compose-test`` silently runs
    without it), and the README's compose section names each stand-in and its tag."""
    images = external_images(compose)
    assert {image.rsplit(":", 1)[0] for image in images} == STAND_INS | WITHOUT_STAND_IN
    script = (dc.ROOT / "deploy/local/containers.sh").read_text()
    for name in ("python", "kafka", "prometheus"):
        assert (dc.ROOT / "deploy/local/images" / name / "Containerfile").is_file()
    assert "cuda_base()" in script
    section = deploy_section()
    for image in images:
        assert f"`{image}`" in section, image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_healthcheck(metrics_port: int) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(dc.ROOT),
        "QRSIGHT_API_PORT": str(free_port()),
        "QRSIGHT_METRICS_PORT": str(metrics_port),
    }
    return subprocess.run(
        [sys.executable, str(dc.ROOT / "deploy/docker/healthcheck.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_image_healthcheck_passes_on_a_live_worker_and_fails_without_one(
    worker_server: int,
) -> None:
    assert run_healthcheck(worker_server).returncode == 0
    down = run_healthcheck(free_port())
    assert down.returncode == 1
    assert "/healthz" in down.stderr and "/api/v1/health" in down.stderr


# --- the README's Deploy section ---------------------------------------------------------
def deploy_section() -> str:
    text = (dc.ROOT / "README.md").read_text()
    start = text.index("\n## Deploy")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def readme_commands() -> list[str]:
    text = deploy_section()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_readme_compose_commands_match_the_compose_file(compose: dict[str, Any]) -> None:
    commands = [c for c in readme_commands() if c.startswith("docker compose")]
    header = [
        line.lstrip("#").strip()
        for line in COMPOSE_FILE.read_text().splitlines()
        if line.startswith("#   docker compose")
    ]
    assert header, "the compose file's header shows how to start it"
    for line in header:
        assert line in commands, f"README misses the compose file's command: {line}"
    services = set(compose["services"])
    profiles = {p for s in compose["services"].values() for p in s.get("profiles", [])}
    for command in commands:
        words = shlex.split(command.split("#")[0])
        for flag, value in itertools.pairwise(words):
            if flag == "--profile":
                assert value in profiles, command
            if flag == "--scale":
                assert value.split("=")[0] in services, command
            if flag == "-f":
                assert (dc.ROOT / value).is_file(), command


def containers_sh_commands() -> tuple[set[str], str]:
    """``deploy/local/containers.sh``'s subcommands (its final ``case``) and its usage text."""
    text = (dc.ROOT / "deploy/local/containers.sh").read_text()
    case = text[text.rindex('case "$command" in') :]
    usage = text[: text.index("set -euo pipefail")]
    return set(re.findall(r"^  ([a-z][a-z-]*)\)", case, flags=re.M)), usage


def test_readme_container_commands_exist() -> None:
    commands, usage = containers_sh_commands()
    makefile = (dc.ROOT / "Makefile").read_text()
    used = [shlex.split(c.split("#")[0]) for c in readme_commands()]
    assert ["make", "compose-test"] in used
    for words in used:
        if words[:1] == ["deploy/local/containers.sh"]:
            assert words[1] in commands, words
        if words[:1] == ["make"]:
            assert re.search(rf"^{re.escape(words[1])}:", makefile, flags=re.M), words
    for command in commands:
        assert f"containers.sh {command}" in usage, f"containers.sh's usage misses {command}"


def test_readme_names_the_ports_compose_publishes(compose: dict[str, Any]) -> None:
    text = deploy_section()
    for name in ("api", "kafka", "prometheus", "grafana"):
        for mapping in compose["services"][name]["ports"]:
            assert f"localhost:{mapping.split(':')[0]}" in text, (name, mapping)


def kustomize_command() -> list[str]:
    """The real kustomize: `kubectl kustomize`, or the `kustomize` binary (.ci/run builds
    it with `go install`, into ~/go/bin)."""
    if kubectl := shutil.which("kubectl"):
        return [kubectl, "kustomize"]
    gobin = os.pathsep.join([os.environ.get("PATH", ""), str(Path.home() / "go" / "bin")])
    if kustomize := shutil.which("kustomize", path=gobin):
        return [kustomize, "build"]
    pytest.fail(
        "no kustomize to compare with: install kubectl, or "
        "`go install sigs.k8s.io/kustomize/kustomize/v5@v5.7.1`",
        pytrace=False,
    )


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_rendering_agrees_with_kubectl_kustomize(name: str) -> None:
    done = subprocess.run(
        [*kustomize_command(), str(dc.K8S / "overlays" / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    theirs = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    mine = dc.render_kustomization(dc.K8S / "overlays" / name)

    def by_key(docs: list[dc.Doc]) -> dict[tuple[str, str], dc.Doc]:
        return {(d["kind"], d["metadata"]["name"]): d for d in docs}

    assert by_key(mine) == by_key(theirs)


def test_every_name_the_deploy_files_set_is_in_the_readme_table(
    compose: dict[str, Any], base_docs: list[dc.Doc]
) -> None:
    table = (dc.ROOT / "README.md").read_text()
    names = {n for s in compose["services"].values() for n in dc.compose_env(s)}
    names |= {n for doc in base_docs for n in dc.k8s_env_names(doc)}
    names |= {n for path in DOCKERFILES for n in dc.final_env(path.read_text())}
    qrsight = {n for n in names if n.startswith("QRSIGHT_")}
    assert len(qrsight) > 20
    assert [n for n in sorted(qrsight) if f"| `{n}` |" not in table] == []


def deploy_commands(compose: dict[str, Any], docs: list[dc.Doc]) -> list[list[str]]:
    commands = [s["command"] for s in compose["services"].values() if "command" in s]
    commands += [c["args"] for d in docs for c in dc.containers(d) if "args" in c]
    return [c for c in commands if c[0].startswith("qrsight-")]


def test_deploy_commands_are_the_packaged_console_scripts(
    compose: dict[str, Any], base_docs: list[dc.Doc], capsys: pytest.CaptureFixture[str]
) -> None:
    scripts = tomllib.loads((dc.ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    commands = deploy_commands(compose, base_docs)
    assert {c[0] for c in commands} == {"qrsight-topics", "qrsight-consumer", "qrsight-api"}
    for command in commands:
        assert command[0] in scripts, command
    from producer_tools.topics import main as topics_main

    with pytest.raises(SystemExit) as exit_info:
        topics_main(["--help"])
    assert exit_info.value.code == 0
    subcommands = re.search(r"\{([a-z,]+)\}", capsys.readouterr().out)
    assert subcommands and "create" in subcommands.group(1).split(",")
    assert all(c[1:] == ["create"] for c in commands if c[0] == "qrsight-topics")


# --- Kubernetes: the API's pod hardening and the network policies ----------------------
def workload(docs: list[dc.Doc], component: str) -> dc.Doc:
    """The one controller (any kind) whose pods are this component's."""
    found = [
        doc
        for doc in docs
        if dc.pod_spec(doc) is not None
        and doc["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component")
        == component
    ]
    assert len(found) == 1, [d["metadata"]["name"] for d in found]
    return found[0]


def pod_labels_of(doc: dc.Doc) -> dict[str, str]:
    labels: dict[str, str] = doc["spec"]["template"]["metadata"]["labels"]
    return labels


def policies_for(docs: list[dc.Doc], labels: dict[str, str]) -> list[dc.Doc]:
    return [
        doc
        for doc in docs
        if doc["kind"] == "NetworkPolicy"
        and dc.selects(doc["spec"]["podSelector"].get("matchLabels", {}), labels)
    ]


def rule_ports(rules: list[dc.Doc], where: str) -> tuple[set[tuple[str, int]], list[str]]:
    """(protocol, port) pairs the rules allow; a rule without ports opens every port."""
    allowed: set[tuple[str, int]] = set()
    problems = []
    for rule in rules:
        if not rule.get("ports"):
            problems.append(f"{where}: a rule without ports allows every port")
        for port in rule.get("ports", []):
            allowed.add((port.get("protocol", "TCP"), int(port["port"])))
    return allowed, problems


def url_port(url: str, default: int) -> int:
    host = url.split("://", 1)[-1].split("/", 1)[0]
    return int(host.rsplit(":", 1)[1]) if ":" in host else default


def needed_egress(settings: Settings, component: str) -> set[tuple[str, int]]:
    """DNS, every bootstrap broker's port, the registry's and (API) a shared limit store's."""
    ports = {("UDP", 53), ("TCP", 53)}
    ports |= {
        ("TCP", url_port(s.strip(), 9092)) for s in (settings.kafka_bootstrap or "").split(",")
    }
    if settings.schema_registry_url:
        ports.add(("TCP", url_port(settings.schema_registry_url, 8081)))
    uri = settings.rate_limit_storage_uri
    if component == "api" and uri.startswith(("redis://", "rediss://")):
        ports.add(("TCP", url_port(uri, 6379)))
    return ports


def served_ports(docs: list[dc.Doc], component: str) -> set[tuple[str, int]]:
    """The ports the component's container exposes, which its probes and monitors use."""
    container = next(dc.containers(workload(docs, component)))
    ports = {("TCP", p["containerPort"]) for p in container["ports"]}
    for _, port in probes(container).values():
        assert ("TCP", port) in ports
    return ports


def network_policy_problems(docs: list[dc.Doc]) -> list[str]:
    config = dc.find(docs, "ConfigMap", "qrsight-config")["data"]
    problems = []
    for component in ("api", "worker"):
        owner = workload(docs, component)
        settings = load_settings({**config, **dc.literal_env(next(dc.containers(owner)))})
        policies = policies_for(docs, pod_labels_of(owner))
        if len(policies) != 1:
            problems.append(f"{component}: {len(policies)} network policies select its pods")
            continue
        spec = policies[0]["spec"]
        where = f"NetworkPolicy/{policies[0]['metadata']['name']}"
        if set(spec.get("policyTypes", [])) != {"Ingress", "Egress"}:
            problems.append(f"{where}: policyTypes must be Ingress and Egress")
        ingress, bad_in = rule_ports(spec.get("ingress", []), where)
        egress, bad_out = rule_ports(spec.get("egress", []), where)
        problems += bad_in + bad_out
        if ingress != served_ports(docs, component):
            problems.append(f"{where}: ingress {sorted(ingress)} is not the served ports")
        if egress != needed_egress(settings, component):
            wanted = sorted(needed_egress(settings, component))
            problems.append(f"{where}: egress {sorted(egress)}, needed {wanted}")
    return problems


def test_k8s_api_pods_mount_no_service_account_token(overlay: tuple[str, list[dc.Doc]]) -> None:
    _, docs = overlay
    spec = dc.pod_spec(workload(docs, "api"))
    assert spec is not None
    assert spec.get("automountServiceAccountToken") is False


def test_k8s_network_policies_open_only_what_the_api_and_workers_use(
    overlay: tuple[str, list[dc.Doc]],
) -> None:
    _, docs = overlay
    assert network_policy_problems(docs) == []
    for doc in docs:
        if doc["kind"] == "NetworkPolicy":
            kubernetes_validate.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_network_policy_checks_catch_drift(base_docs: list[dc.Doc]) -> None:
    moved = json.loads(json.dumps(base_docs))
    config = dc.find(moved, "ConfigMap", "qrsight-config")["data"]
    config["QRSIGHT_KAFKA_BOOTSTRAP"] = "kafka-0:9093,kafka-1:9093"
    config["QRSIGHT_RATE_LIMIT_STORAGE_URI"] = "redis://redis:6380/0"
    open_all = json.loads(json.dumps(base_docs))
    dc.find(open_all, "NetworkPolicy", "qrsight-workers")["spec"]["ingress"] = [{}]
    relabeled = json.loads(json.dumps(base_docs))
    pods = workload(relabeled, "worker")["spec"]["template"]["metadata"]["labels"]
    pods["app.kubernetes.io/name"] = "renamed"
    assert [p.split(":")[0] for p in network_policy_problems(moved)] == [
        "NetworkPolicy/qrsight-api",
        "NetworkPolicy/qrsight-workers",
    ]
    assert any("allows every port" in p for p in network_policy_problems(open_all))
    assert network_policy_problems(relabeled) == ["worker: 0 network policies select its pods"]


# --- supply chain: requirements.lock -------------------------------------------------------
LOCK = dc.ROOT / "requirements.lock"


def _locked() -> dict[str, list[str]]:
    """Name -> the requirement blocks of the lock (a name may repeat per environment marker)."""
    blocks: dict[str, list[str]] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", LOCK.read_text()):
        match = re.match(r"([A-Za-z0-9_.-]+)==", block)
        if match:
            blocks.setdefault(match.group(1).lower().replace("_", "-"), []).append(block)
    return blocks


def _runtime_requirements() -> dict[str, str]:
    project = tomllib.loads((dc.ROOT / "pyproject.toml").read_text())["project"]
    found = {}
    for requirement in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement)
        assert name is not None
        found[name.group(0).lower().replace("_", "-")] = requirement
    return found


def test_the_lock_pins_every_runtime_dependency_with_hashes() -> None:
    locked = _locked()
    assert set(_runtime_requirements()) <= set(locked), "run `make lock` after editing pyproject"
    for name, blocks in locked.items():
        for block in blocks:
            assert "--hash=sha256:" in block, f"{name} has no hash in requirements.lock"


@pytest.mark.parametrize(
    ("name", "vulnerable"),
    [("pyjwt", "2.10.0"), ("flask", "3.1.0"), ("gunicorn", "22.0.0"), ("cryptography", "44.0.0")],
)
def test_lower_bounds_exclude_known_vulnerable_versions(name: str, vulnerable: str) -> None:
    from packaging.requirements import Requirement

    requirement = Requirement(_runtime_requirements()[name])
    assert not requirement.specifier.contains(vulnerable)
    for block in _locked()[name]:
        locked = block.split("==", 1)[1].split()[0]
        assert requirement.specifier.contains(locked), f"{name} {locked} below its lower bound"


def test_cryptography_and_pydantic_are_declared_where_they_are_imported() -> None:
    assert {"cryptography", "pydantic"} <= set(_runtime_requirements())


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_the_runtime_from_the_lock_with_hashes(path: Path) -> None:
    runs = [args for instr, args in dc.dockerfile_instructions(path.read_text()) if instr == "RUN"]
    installs = [r for r in runs if re.search(r"-r \S*requirements\.lock", r)]
    assert installs and all("--require-hashes" in r for r in installs)
    wheel_installs = [r for r in runs if "qrsight-*.whl" in r]
    assert all(re.search(r"pip install --no-deps \S*qrsight-\*\.whl", r) for r in wheel_installs), (
        "the wheel must not resolve its dependencies past the lock"
    )


def test_make_up_installs_from_the_lock() -> None:
    makefile = (dc.ROOT / "Makefile").read_text()
    recipe = makefile.split("\n.installed:", 1)[1].split("\n\n", 1)[0]
    assert "--require-hashes --no-deps -r requirements.lock" in recipe
    assert "up: .installed" in makefile


# --- secured Kafka and secrets ---------------------------------------------------------------
def test_the_example_jwt_secret_is_refused_if_applied_as_it_is() -> None:
    from api.auth import check_secret
    from core.runtime.errors import ConfigError

    secret = dc.load_one(dc.K8S / "base/secret.example.yaml")["stringData"]["auth-jwt-secret"]
    with pytest.raises(ConfigError, match="QRSIGHT_AUTH_JWT_SECRET"):
        check_secret(secret)
    with pytest.raises(ConfigError, match="placeholder"):  # even when it is long enough
        check_secret(secret + "-" * 32)


def test_the_sasl_ssl_overlay_logs_each_component_in_as_its_own_user() -> None:
    docs = dc.render_kustomization(dc.K8S / "overlays" / "cpu-sasl-ssl")
    config = dc.find(docs, "ConfigMap", "qrsight-config")["data"]
    secret_keys = set(dc.load_one(dc.K8S / "base/secret.example.yaml")["stringData"])
    users = {}
    for kind, name in [("StatefulSet", "qrsight-api"), ("StatefulSet", "qrsight-workers")]:
        doc = dc.find(docs, kind, name)
        container = next(dc.containers(doc))
        settings = load_settings({**config, **dc.literal_env(container)})
        assert settings.kafka_security_protocol == "SASL_SSL"
        assert settings.kafka_sasl_mechanism == "SCRAM-SHA-512"
        password = next(e for e in container["env"] if e["name"] == "QRSIGHT_KAFKA_SASL_PASSWORD")
        ref = password["valueFrom"]["secretKeyRef"]
        assert ref["key"] in secret_keys and ref["optional"] is False
        ca = settings.kafka_ssl_ca_location
        assert ca is not None
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volume = mounts[str(ca.parent)]
        volumes = {v["name"]: v for v in dc.pod_spec(doc)["volumes"]}  # type: ignore[index]
        assert volumes[volume]["secret"]["secretName"] == "qrsight-kafka-ca"
        users[name] = settings.kafka_sasl_username
    assert users == {"qrsight-api": "api", "qrsight-workers": "worker"}


SASL_SSL_COMPOSE = dc.ROOT / "docker-compose.sasl-ssl.yml"


def test_the_sasl_ssl_compose_override_passes_docker_compose_config(tmp_path: Path) -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing: .ci/run installs Debian's docker-compose")
        pytest.skip("Debian's docker-compose is not installed (apt-get install docker-compose)")
    for name in ("kafka-admin-password", "kafka-api-password", "kafka-worker-password"):
        (tmp_path / name).write_text("not-a-real-password\n")
    (tmp_path / "kafka-ca.pem").write_text("not a real CA\n")
    env = {**os.environ, "QRSIGHT_KAFKA_BOOTSTRAP": "b:9093", "KAFKA_SECRETS_DIR": str(tmp_path)}
    done = subprocess.run(
        [binary, "-f", str(COMPOSE_FILE), "-f", str(SASL_SSL_COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr


def test_the_sasl_ssl_compose_override_gives_each_service_its_user_and_secret_files() -> None:
    from core.runtime.settings import SECRET_FILE_FIELDS, SECRET_FILE_SUFFIX, env_name

    override = dc.load_compose(SASL_SSL_COMPOSE, {"QRSIGHT_KAFKA_BOOTSTRAP": "b:9093"})
    file_names = {env_name(f) + SECRET_FILE_SUFFIX for f in SECRET_FILE_FIELDS}
    users = {}
    for name, service in override["services"].items():
        env = dc.compose_env(service)
        assert dc.env_problems(set(env) - file_names, name) == []
        assert env["QRSIGHT_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert "QRSIGHT_KAFKA_SASL_PASSWORD" not in env, "passwords come from secret files"
        secret = env["QRSIGHT_KAFKA_SASL_PASSWORD_FILE"].removeprefix("/run/secrets/")
        ca = env["QRSIGHT_KAFKA_SSL_CA_LOCATION"].removeprefix("/run/secrets/")
        assert {secret, ca} <= set(service["secrets"]) <= set(override["secrets"])
        users[name] = env["QRSIGHT_KAFKA_SASL_USERNAME"]
    assert users == {
        "topics": "admin",
        "consumer": "worker",
        "consumer-gpu": "worker",
        "api": "api",
    }


# --- a Kafka cluster: docker-compose.cluster.yml and the Strimzi overlay --------------------
CLUSTER_COMPOSE_FILE = dc.ROOT / "docker-compose.cluster.yml"
KAFKA_NODES = ["kafka", "kafka-2", "kafka-3"]


@pytest.fixture(scope="module")
def cluster_compose(compose: dict[str, Any]) -> dict[str, Any]:
    """docker-compose.yml with docker-compose.cluster.yml layered over it."""
    return dc.merge_compose(compose, dc.load_compose(CLUSTER_COMPOSE_FILE))


def test_cluster_compose_passes_docker_compose_config() -> None:
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing: .ci/run installs Debian's docker-compose")
        pytest.skip("Debian's docker-compose is not installed (apt-get install docker-compose)")
    files = ["-f", str(COMPOSE_FILE), "-f", str(CLUSTER_COMPOSE_FILE)]
    for args in ([], ["--profile", "gpu"]):
        done = subprocess.run(
            [binary, *files, *args, "config"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        services = yaml.safe_load(done.stdout)["services"]
        assert set(KAFKA_NODES) <= set(services)
        voters = services["kafka"]["environment"]["KAFKA_CONTROLLER_QUORUM_VOTERS"]
        assert voters.count("@") == 3, "node 1 takes the cluster's quorum from the override"


def test_cluster_compose_is_three_nodes_of_one_replicated_cluster(
    cluster_compose: dict[str, Any],
) -> None:
    services = cluster_compose["services"]
    envs = [dc.compose_env(services[name]) for name in KAFKA_NODES]
    assert [int(env["KAFKA_NODE_ID"]) for env in envs] == [1, 2, 3]
    assert len({env["CLUSTER_ID"] for env in envs}) == 1
    voters = {env["KAFKA_CONTROLLER_QUORUM_VOTERS"] for env in envs}
    assert voters == {"1@kafka:29093,2@kafka-2:29093,3@kafka-3:29093"}
    assert len({env["KAFKA_BROKER_RACK"] for env in envs}) == 3
    host_ports = set()
    for name, env in zip(KAFKA_NODES, envs, strict=True):
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
        assert f"INTERNAL://{name}:29092" in env["KAFKA_ADVERTISED_LISTENERS"]
        assert f"{name}:29092" in services[name]["healthcheck"]["test"]
        (mapping,) = services[name]["ports"]
        host_ports.add(mapping.split(":")[0])
        assert f"EXTERNAL://localhost:{mapping.split(':')[0]}" in env["KAFKA_ADVERTISED_LISTENERS"]
        for key, want in dc.STRIMZI_CLUSTER_CONFIG.items():
            assert str(env[f"KAFKA_{key.upper().replace('.', '_')}"]).lower() == str(want).lower()
        assert env["KAFKA_REPLICA_SELECTOR_CLASS"] == dc.RACK_SELECTOR
    assert len(host_ports) == 3
    for node in KAFKA_NODES:
        assert services["topics"]["depends_on"][node]["condition"] == "service_healthy"


def test_cluster_compose_points_every_qrsight_service_at_all_three_nodes(
    cluster_compose: dict[str, Any],
) -> None:
    assert dc.compose_problems(cluster_compose) == []
    for name in QRSIGHT_SERVICES:
        env = dc.compose_env(cluster_compose["services"][name])
        settings = load_settings({k: v for k, v in env.items() if k.startswith("QRSIGHT_")})
        assert settings.kafka_bootstrap == "kafka:29092,kafka-2:29092,kafka-3:29092", name
        assert replication_for(settings, 3) == (3, 2), name


STRIMZI_OVERLAYS = ["strimzi", "strimzi-sasl-ssl"]


@pytest.fixture(scope="module", params=STRIMZI_OVERLAYS)
def strimzi_overlay(request: pytest.FixtureRequest) -> tuple[str, list[dc.Doc]]:
    return request.param, dc.render_kustomization(dc.K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def strimzi_docs(strimzi_overlay: tuple[str, list[dc.Doc]]) -> list[dc.Doc]:
    return strimzi_overlay[1]


def strimzi_topics(docs: list[dc.Doc]) -> dict[str, dict[str, Any]]:
    """What `qrsight-topics create` makes on a three-broker cluster with the overlay's
    settings: the KafkaTopics must say the same."""
    settings = load_settings(dc.find(docs, "ConfigMap", "qrsight-config")["data"])
    replicas, min_isr = replication_for(settings, 3)
    return {
        name: {
            "partitions": spec["partitions"],
            "replicas": replicas,
            "config": {**spec["config"], "min.insync.replicas": str(min_isr)},
        }
        for name, spec in topic_specs(settings).items()
    }


def test_strimzi_overlay_is_a_replicated_kraft_cluster_with_qrsights_topics(
    strimzi_docs: list[dc.Doc],
) -> None:
    settings = load_settings(dc.find(strimzi_docs, "ConfigMap", "qrsight-config")["data"])
    assert dc.strimzi_problems(strimzi_docs, settings, strimzi_topics(strimzi_docs)) == []
    for topic in (d for d in strimzi_docs if d["kind"] == "KafkaTopic"):
        assert (topic["spec"]["replicas"], topic["spec"]["config"]["min.insync.replicas"]) == (
            3,
            2,
        )


def test_strimzi_checks_catch_drift(strimzi_docs: list[dc.Doc]) -> None:
    settings = load_settings(dc.find(strimzi_docs, "ConfigMap", "qrsight-config")["data"])
    broken = json.loads(json.dumps(strimzi_docs))
    dc.find(broken, "KafkaNodePool")["spec"]["replicas"] = 1
    dc.find(broken, "Kafka")["spec"]["kafka"]["config"]["min.insync.replicas"] = 1
    dc.find(broken, "KafkaTopic", "qr-images")["spec"]["replicas"] = 1
    moved = settings.model_copy(update={"kafka_bootstrap": "other-kafka-bootstrap.kafka:9092"})
    problems = dc.strimzi_problems(broken, moved, strimzi_topics(strimzi_docs))
    assert [p.split(":")[0] for p in problems] == [
        "Kafka",
        "KafkaNodePool",
        "Kafka",
        "topic qr.images",
    ], problems


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_strimzi_overlay_core_objects_match_the_kubernetes_schemas(
    strimzi_docs: list[dc.Doc], version: str
) -> None:
    strimzi = {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser"}
    assert {d["kind"] for d in strimzi_docs} >= strimzi - {"KafkaUser"}
    assert dc.k8s_problems(strimzi_docs) == []
    for doc in strimzi_docs:
        if doc["kind"] not in CUSTOM_KINDS | strimzi:
            kubernetes_validate.validate(doc, version, strict=True)


def test_strimzi_overlay_rendering_agrees_with_kubectl_kustomize(
    strimzi_overlay: tuple[str, list[dc.Doc]],
) -> None:
    name, strimzi_docs = strimzi_overlay
    done = subprocess.run(
        [*kustomize_command(), str(dc.K8S / "overlays" / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    theirs = [doc for doc in yaml.safe_load_all(done.stdout) if doc]

    def by_key(docs: list[dc.Doc]) -> dict[tuple[str, str], dc.Doc]:
        return {(d["kind"], d["metadata"]["name"]): d for d in docs}

    assert by_key(strimzi_docs) == by_key(theirs)


# --- Strimzi, secured: KafkaUsers with the ACL table ---------------------------------------
STRIMZI_RESOURCE = {"TOPIC": "topic", "GROUP": "group", "TRANSACTIONAL_ID": "transactionalId"}


@pytest.fixture(scope="module")
def strimzi_secured() -> list[dc.Doc]:
    return dc.render_kustomization(dc.K8S / "overlays" / "strimzi-sasl-ssl")


def strimzi_acls(docs: list[dc.Doc]) -> dict[str, set[dc.Acl]]:
    """`qrsight-topics acls` (role_acls) with the overlay's settings, in Strimzi's words:
    the KafkaUsers must hold exactly these."""
    from producer_tools.topics import DEFAULT_USERS, role_acls

    settings = load_settings(dc.find(docs, "ConfigMap", "qrsight-config")["data"])
    acls: dict[str, set[dc.Acl]] = {}
    for grant in role_acls(settings):
        prefixed = grant.pattern.name == "PREFIXED"
        acls.setdefault(DEFAULT_USERS[grant.role], set()).add(
            (
                STRIMZI_RESOURCE[grant.resource.name],
                grant.name,
                "prefix" if prefixed else "literal",
                grant.operation.name.capitalize(),
            )
        )
    return acls


def test_strimzi_sasl_ssl_users_hold_exactly_the_acl_table(
    strimzi_secured: list[dc.Doc],
) -> None:
    acls = strimzi_acls(strimzi_secured)
    assert set(acls) == {"api", "worker", "reader"}
    assert dc.strimzi_security_problems(strimzi_secured, acls) == []
    assert not [d for d in strimzi_secured if d["kind"] == "Job"]  # Strimzi owns the topics
    config = dc.find(strimzi_secured, "ConfigMap", "qrsight-config")["data"]
    users = {}
    for name in ("qrsight-api", "qrsight-workers"):
        container = next(dc.containers(dc.find(strimzi_secured, "StatefulSet", name)))
        settings = load_settings({**config, **dc.literal_env(container)})
        assert (settings.kafka_security_protocol, settings.kafka_sasl_mechanism) == (
            "SASL_SSL",
            "SCRAM-SHA-512",
        )
        users[name] = settings.kafka_sasl_username
    assert users == {"qrsight-api": "api", "qrsight-workers": "worker"}


def test_strimzi_security_checks_catch_drift(strimzi_secured: list[dc.Doc]) -> None:
    acls = strimzi_acls(strimzi_secured)
    broken = json.loads(json.dumps(strimzi_secured))
    kafka = dc.find(broken, "Kafka")["spec"]["kafka"]
    kafka["listeners"].append({"name": "plain", "port": 9092, "type": "internal", "tls": False})
    dc.find(broken, "KafkaUser", "worker")["spec"]["authorization"]["acls"].pop()
    dc.find(broken, "KafkaUser", "reader")["spec"]["authorization"]["acls"][0]["operations"] = [
        "Read",
        "Write",
    ]
    api = next(dc.containers(dc.find(broken, "StatefulSet", "qrsight-api")))
    password = next(e for e in api["env"] if e["name"] == "QRSIGHT_KAFKA_SASL_PASSWORD")
    password["valueFrom"]["secretKeyRef"]["name"] = "qrsight-secrets"
    problems = dc.strimzi_security_problems(broken, acls)
    assert [p.split(":")[0] for p in problems] == [
        "Kafka",
        "user reader",
        "user worker",
        "StatefulSet/qrsight-api",
    ], problems
    assert "transactionalId" in problems[2]
