"""``docker-compose.yml`` for real: the project's images, built from its Dockerfiles, run as
the compose file says (podman's Docker API under docker-compose; ``deploy/local/containers.sh``
builds the images and the local stand-ins for the base images first).

The tests run in order on one stack: up (on free host ports, a project of its own), ready,
the sample images through the API and through ``qr.images``, exactly one result event per
request, Prometheus scraping the workers and the API, then down, which must leave no
container, network or volume behind.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from core.runtime.settings import REPO_ROOT, load_settings
from tests.unit import deploy_checks as dc

CONTAINERS_SH = REPO_ROOT / "deploy" / "local" / "containers.sh"
SAMPLES = REPO_ROOT / "samples"
UP_TIMEOUT_S = 600.0  # compose up waits for Kafka's healthcheck, then the topics job
READY_TIMEOUT_S = 180.0
IMAGE_USER = "10001:10001"
QRSIGHT_SERVICES = ("consumer", "api")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def expected() -> dict[str, dict[str, Any]]:
    rows = [json.loads(line) for line in (SAMPLES / "manifest.jsonl").read_text().splitlines()]
    return {row["path"]: row for row in rows}


@dataclass
class Stack:
    project: str
    env: dict[str, str]
    api: str
    kafka: str
    prometheus: str
    # request id -> sample, for every request this module sent
    sent: dict[str, str] = field(default_factory=dict)
    down: subprocess.CompletedProcess[str] | None = None

    def containers_sh(
        self, *args: str, timeout: float = UP_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(CONTAINERS_SH), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def tear_down(self) -> subprocess.CompletedProcess[str]:
        if self.down is None:
            self.down = self.containers_sh("down", timeout=180)
        return self.down


def podman_json(*args: str) -> Any:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, check=True, timeout=60)
    return json.loads(done.stdout or "[]")


def containers(project: str, service: str | None = None) -> list[dict[str, Any]]:
    filters = ["--filter", f"label=com.docker.compose.project={project}"]
    if service:
        filters += ["--filter", f"label=com.docker.compose.service={service}"]
    found: list[dict[str, Any]] = podman_json("ps", "-a", *filters, "--format", "json")
    return found


def inspect(container_id: str) -> dict[str, Any]:
    (found,) = podman_json("inspect", container_id)
    return dict(found)


def http_json(
    url: str, data: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read() or b"null")


def multipart(name: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    body = head.encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def wait_ready(url: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            status, body = http_json(url)
            if status == 200:
                return dict(body)
            last = (status, body)
        except (OSError, ValueError) as exc:
            last = exc
        time.sleep(1.0)
    raise AssertionError(f"{url} not ready in {timeout_s:.0f} s: {last}")


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    project = f"qrsight-test-{uuid.uuid4().hex[:8]}"
    ports = {name: free_port() for name in ("KAFKA", "API", "PROMETHEUS", "GRAFANA")}
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("QRSIGHT_")},
        "COMPOSE_PROJECT_NAME": project,
        **{f"{name}_HOST_PORT": str(port) for name, port in ports.items()},
    }
    stack = Stack(
        project=project,
        env=env,
        api=f"http://127.0.0.1:{ports['API']}",
        kafka=f"127.0.0.1:{ports['KAFKA']}",
        prometheus=f"http://127.0.0.1:{ports['PROMETHEUS']}",
    )
    started = time.monotonic()
    try:
        up = stack.containers_sh("up")
        assert up.returncode == 0, f"containers.sh up failed:\n{up.stdout}\n{up.stderr}"
        ready = wait_ready(f"{stack.api}/api/v1/ready", READY_TIMEOUT_S)
        took = time.monotonic() - started
        report(request, f"compose stack {project}: up and ready in {took:.0f} s ({ready})")
        yield stack
    finally:
        if request.session.testsfailed:
            logs = stack.containers_sh("compose", "logs", "--no-color", "--tail", "40", timeout=120)
            print(logs.stdout[-20000:], logs.stderr[-2000:], file=sys.stderr)
        down = stack.tear_down()
        restarts = down.stdout.count("aardvark-dns had stopped")
        report(request, f"compose stack {project}: down; aardvark-dns restarted {restarts} times")


def report(request: pytest.FixtureRequest, line: str) -> None:
    """A line in pytest's own output (not captured), for CI logs."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)


def kafka_settings(stack: Stack, **extra: str) -> Any:
    # as a client on the host sees the stack: the broker's EXTERNAL listener; a reply
    # partition the API's two gunicorn workers (0 and 1) do not read
    return load_settings({"QRSIGHT_KAFKA_BOOTSTRAP": stack.kafka, **extra})


# --- the containers ---------------------------------------------------------------------
def test_topics_job_created_the_topics_and_exited_0(stack: Stack) -> None:
    (topics,) = containers(stack.project, "topics")
    assert topics["ExitCode"] == 0, topics
    from confluent_kafka.admin import AdminClient

    settings = kafka_settings(stack)
    metadata = AdminClient({"bootstrap.servers": stack.kafka}).list_topics(timeout=30)
    partitions = {name: len(topic.partitions) for name, topic in metadata.topics.items()}
    assert partitions[settings.topic_images] == 6
    assert partitions[settings.topic_detections] == 6
    assert partitions[settings.topic_replies] == 16
    assert partitions[settings.topic_dlq] == 6


@pytest.mark.parametrize("service", QRSIGHT_SERVICES)
def test_qrsight_runs_as_the_image_user_never_root(stack: Stack, service: str) -> None:
    (container,) = containers(stack.project, service)
    assert inspect(container["Id"])["Config"]["User"] == IMAGE_USER
    done = subprocess.run(
        ["podman", "top", container["Id"], "huser", "args"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    processes = done.stdout.splitlines()[1:]
    assert processes, done.stdout
    for line in processes:
        user = line.split()[0]
        assert user in ("10001", "qrsight"), line


@pytest.mark.parametrize("service", ["kafka", *QRSIGHT_SERVICES, "prometheus"])
def test_healthchecks_pass(stack: Stack, service: str) -> None:
    """The images' HEALTHCHECK (qrsight) and the compose file's (Kafka, Prometheus) pass."""
    (container,) = containers(stack.project, service)
    deadline = time.monotonic() + 90
    while True:
        health = inspect(container["Id"])["State"]["Health"]
        if health["Status"] == "healthy" or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert health["Status"] == "healthy", health.get("Log", [])[-3:]


ERROR_MARKS = ("[ERROR]", "level=ERROR", "level=CRITICAL", "Traceback (most recent call last)")


def error_lines(container_id: str) -> list[str]:
    done = subprocess.run(
        ["podman", "logs", container_id], capture_output=True, text=True, check=True, timeout=60
    )
    lines = (done.stdout + done.stderr).splitlines()
    return [line for line in lines if any(mark in line for mark in ERROR_MARKS)]


def log_tail(container_id: str, lines: int = 8) -> list[str]:
    done = subprocess.run(
        ["podman", "logs", "--tail", str(lines), container_id],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return (done.stdout + done.stderr).splitlines()


@pytest.mark.parametrize("service", ["topics", *QRSIGHT_SERVICES])
def test_qrsight_containers_start_without_an_error(stack: Stack, service: str) -> None:
    # the API logged "Control server error: Permission denied: '/app/.gunicorn'" at every
    # start (gunicorn 25+'s control socket in a HOME the image user cannot write)
    (container,) = containers(stack.project, service)
    assert error_lines(container["Id"]) == []


# --- images through the API and through qr.images ----------------------------------------
def check_detections(name: str, detections: list[dict[str, Any]], image: dict[str, int]) -> None:
    want = expected()[name]
    texts = sorted(d["text"] for d in detections if d.get("text"))
    assert texts == sorted(want["texts"]), name
    assert (image["width"], image["height"]) == (want["width"], want["height"]), name


@pytest.mark.parametrize("name", sorted(expected()))
def test_sample_through_the_api(stack: Stack, name: str) -> None:
    body, content_type = multipart("image", name, (SAMPLES / name).read_bytes())
    status, reply = http_json(
        f"{stack.api}/api/v1/detect", data=body, headers={"Content-Type": content_type}
    )
    assert status == 200, reply
    check_detections(name, reply["results"], reply["image"])
    stack.sent[reply["request_id"]] = name


def test_not_an_image_through_the_api_is_a_clear_error(stack: Stack) -> None:
    body, content_type = multipart("image", "notes.txt", b"these are not pixels")
    status, reply = http_json(
        f"{stack.api}/api/v1/detect", data=body, headers={"Content-Type": content_type}
    )
    assert status in (400, 415), reply
    assert reply["error"]["code"] and reply["error"]["request_id"]


def publish(stack: Stack, *args: str) -> list[dict[str, Any]]:
    env = {
        **stack.env,
        "QRSIGHT_KAFKA_BOOTSTRAP": stack.kafka,
        "QRSIGHT_API_REPLY_PARTITION": "8",
    }
    done = subprocess.run(
        [sys.executable, "-m", "producer_tools.publish", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_samples_through_qr_images(stack: Stack) -> None:
    results = publish(stack, str(SAMPLES), "--wait", "--quiet")
    by_name = {Path(r["source"]).name: r for r in results}
    assert set(by_name) == set(expected())
    for name, result in by_name.items():
        assert result["status"] == "OK", result
        check_detections(name, result["detections"], result["image"])
        stack.sent[result["request_id"]] = name


def test_every_request_got_exactly_one_result_event(stack: Stack) -> None:
    """Downstream view: ``qr.detections`` holds one event per request, none lost or doubled."""
    from producer_tools.results import follow

    assert len(stack.sent) == 2 * len(expected())
    seen: dict[str, int] = {}
    for result in follow(kafka_settings(stack), from_beginning=True, idle_exit_s=5.0):
        seen[result["request_id"]] = seen.get(result["request_id"], 0) + 1
    missing = sorted(set(stack.sent) - set(seen))
    doubled = sorted(rid for rid, count in seen.items() if count > 1)
    assert (missing, doubled) == ([], [])


# --- the Kubernetes pod specs, as a kubelet would run them ------------------------------------
def podman_run_args(stack: Stack, doc: dc.Doc, container: dc.Doc, name: str) -> list[str]:
    """``podman run`` for one container of a pod template: its user, read-only root, dropped
    capabilities, emptyDir volumes, environment (ConfigMap, literals) and arguments, on the
    compose network with this stack's broker."""
    spec = dc.pod_spec(doc) or {}
    pod_security = spec.get("securityContext", {})
    security = container.get("securityContext", {})
    args = ["run", "-d", "--name", name, "--network", f"{stack.project}_default"]
    # labels of this project: `compose down --remove-orphans` removes whatever is left
    args += ["--label", f"com.docker.compose.project={stack.project}"]
    args += ["--label", f"com.docker.compose.service={name}"]
    args += ["--user", f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}"]
    if security.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]
    args += [f"--cap-drop={cap}" for cap in security.get("capabilities", {}).get("drop", [])]
    if security.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        assert "emptyDir" in volumes[mount["name"]], mount
        args += ["--tmpfs", f"{mount['mountPath']}:rw,mode=1777"]
    env = dict(dc.find(dc.render_kustomization(dc.K8S / "base"), "ConfigMap")["data"])
    env |= dc.literal_env(container)
    env |= {  # this stack's one broker, a group and a reply partition of the check's own
        "QRSIGHT_KAFKA_BOOTSTRAP": "kafka:29092",
        "QRSIGHT_REPLICATION_FACTOR": "1",
        "QRSIGHT_CONSUMER_GROUP": f"k8s-check-{uuid.uuid4().hex[:6]}",
        "QRSIGHT_API_REPLY_PARTITION": "12",
    }
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    image = compose_image()
    return [*args, image, *container.get("command", []), *container.get("args", [])]


def compose_image() -> str:
    services = dc.load_compose(REPO_ROOT / "docker-compose.yml")["services"]
    return str(services["api"]["image"])


def probe_url(container: dc.Doc, probe: str) -> str | None:
    get = container.get(probe, {}).get("httpGet")
    if get is None:
        return None
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    return f"http://127.0.0.1:{ports.get(get['port'], get['port'])}{get['path']}"


def answers_200(container_id: str, url: str) -> bool:
    check = (
        "import sys, urllib.request\n"
        f"try: sys.exit(urllib.request.urlopen({url!r}, timeout=3).status != 200)\n"
        "except Exception: sys.exit(1)"
    )
    done = subprocess.run(
        ["podman", "exec", container_id, "python", "-c", check],
        capture_output=True,
        check=False,
        timeout=60,
    )
    return done.returncode == 0


def wait_jobs_done(started: dict[str, dc.Doc], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    for name, container in started.items():
        while container["kind"] == "Job" and inspect(name)["State"]["Status"] != "exited":
            assert time.monotonic() < deadline, f"{name} still running: {error_lines(name)}"
            time.sleep(1)


def test_k8s_pod_specs_run_with_their_security_context(stack: Stack) -> None:
    """Each container of deploy/k8s/base, run as its pod spec says (user, read-only root,
    no capabilities, its emptyDirs), works: the topics Job exits 0, the others pass their
    readiness probe; none logs an error."""
    docs = dc.render_kustomization(dc.K8S / "base")
    # the Job first, as it would be applied before the rest is scaled up
    pods = sorted(
        ((doc, c) for doc in docs if dc.pod_spec(doc) for c in dc.containers(doc)),
        key=lambda pair: pair[0]["kind"] != "Job",
    )
    started: dict[str, dc.Doc] = {}
    try:
        for doc, container in pods:
            if doc["kind"] != "Job":
                wait_jobs_done(started)
            name = f"{stack.project}-k8s-{doc['metadata']['name']}-{container['name']}"
            done = subprocess.run(
                ["podman", *podman_run_args(stack, doc, container, name)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, done.stderr
            started[name] = {**container, "kind": doc["kind"]}
        assert {c["kind"] for c in started.values()} >= {"Job"}, started
        pending = dict(started)
        deadline = time.monotonic() + 180
        while pending and time.monotonic() < deadline:
            for name, container in list(pending.items()):
                state = inspect(name)["State"]
                if container["kind"] == "Job":
                    if state["Status"] == "exited":
                        assert state["ExitCode"] == 0, error_lines(name)
                        del pending[name]
                    continue
                assert state["Status"] == "running", (name, error_lines(name))
                url = probe_url(container, "readinessProbe")
                if url is None or answers_200(name, url):
                    del pending[name]
            time.sleep(2)
        assert pending == {}, {name: log_tail(name) for name in pending}
        for name in started:
            assert error_lines(name) == [], name
    finally:
        if started:
            subprocess.run(
                ["podman", "rm", "-f", "-t", "10", *started],
                capture_output=True,
                check=False,
                timeout=120,
            )


# --- Prometheus ----------------------------------------------------------------------------
def prometheus_value(stack: Stack, query: str) -> float:
    url = f"{stack.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    status, body = http_json(url)
    assert status == 200, body
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def test_prometheus_scrapes_the_workers_and_the_api(stack: Stack) -> None:
    deadline = time.monotonic() + 90
    while True:
        status, body = http_json(f"{stack.prometheus}/api/v1/targets")
        assert status == 200, body
        health: dict[str, list[str]] = {}
        for target in body["data"]["activeTargets"]:
            health.setdefault(target["labels"]["job"], []).append(target["health"])
        scraped = {job: states for job, states in health.items() if job != "prometheus"}
        images = prometheus_value(stack, "sum(qrsight_worker_images_total)")
        detects = prometheus_value(stack, 'sum(qrsight_api_requests_total{route="/api/v1/detect"})')
        done = (
            scraped.get("qrsight-workers") == ["up"]
            and scraped.get("qrsight-api") == ["up"]
            and images >= len(stack.sent)
            and detects >= len(expected())
        )
        if done or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert scraped.get("qrsight-workers") == ["up"], body
    assert scraped.get("qrsight-api") == ["up"], body
    assert images >= len(stack.sent)
    assert detects >= len(expected())


def test_prometheus_loaded_every_alert_rule(stack: Stack) -> None:
    """The rules file compose mounts parses in Prometheus and every alert is loaded."""
    rule_files = dc.load_one(REPO_ROOT / "deploy/prometheus/prometheus.yml").get("rule_files", [])
    want = set()
    for name in rule_files:
        rules = dc.load_one(REPO_ROOT / "deploy/prometheus" / name)
        want |= {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    status, body = http_json(f"{stack.prometheus}/api/v1/rules?type=alert")
    assert status == 200, body
    loaded = {r["name"] for g in body["data"]["groups"] for r in g["rules"]}
    assert loaded == want


# --- down ----------------------------------------------------------------------------------
def test_down_leaves_no_container_network_or_volume(stack: Stack) -> None:
    done = stack.tear_down()
    assert done.returncode == 0, done.stdout + done.stderr
    label = f"label=com.docker.compose.project={stack.project}"
    assert containers(stack.project) == []
    assert podman_json("network", "ls", "--filter", label, "--format", "json") == []
    assert podman_json("volume", "ls", "--filter", label, "--format", "json") == []
