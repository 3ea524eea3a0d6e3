"""Alert rules and the dashboard's end-to-end panels: valid for Prometheus' own promtool,
shipped the same way with compose and Kubernetes, and about metrics the code exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.unit import deploy_checks as dc
from tests.unit.test_deploy import base_metric, metric_labels

PROMETHEUS = dc.ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
PROMETHEUS_RULE = dc.K8S / "base" / "prometheusrule.yaml"
DASHBOARD = dc.ROOT / "deploy" / "grafana" / "dashboards" / "qrsight.json"
# What an operator of qrsight is paged for (issue 20): each must have a rule.
WATCHED = {
    "consumer lag growing": "QrsightConsumerLagGrowing",
    "dead letters": "QrsightDeadLetterRateHigh",
    "quarantine": "QrsightMessageQuarantined",
    "worker restarts": "QrsightWorkerRestarting",
    "API 5xx": "QrsightApiServerErrors",
    "API 504": "QrsightApiReplyTimeouts",
    "reply latency p99": "QrsightReplyLatencyHigh",
}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is missing: deploy/local/test-tools.sh installs it (from Debian's "
            "prometheus package)",
            pytrace=False,
        )
    return found


def run_promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def rules() -> list[dict[str, Any]]:
    return [rule for group in dc.load_one(ALERTS)["groups"] for rule in group["rules"]]


def promql_metrics(expr: str) -> list[str]:
    return re.findall(r"\bqrsight_[a-z0-9_]+", expr)


def promql_labels(expr: str) -> set[str]:
    used = set(re.findall(r"\b(\w+)\s*(?:=|!=|=~|!~)\s*\"", expr))
    for group in re.findall(r"\b(?:by|without) \(([^)]*)\)", expr):
        used |= {label.strip() for label in group.split(",") if label.strip()}
    return used


def test_promtool_accepts_the_rules_and_the_prometheus_config() -> None:
    checked = run_promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = run_promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout


def test_promtool_unit_tests_of_the_key_alerts_pass() -> None:
    done = run_promtool("test", "rules", "alerts.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    tested = {
        case["alertname"]
        for test in dc.load_one(PROMETHEUS / "alerts.test.yml")["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == {rule["alert"] for rule in rules()}, "every alert has a firing test"


def test_promtool_catches_a_broken_rule(tmp_path: Path) -> None:
    broken = ALERTS.read_text().replace("> 0.05", "> > 0.05", 1)
    (tmp_path / "alerts.yml").write_text(broken)
    assert run_promtool("check", "rules", "alerts.yml", cwd=tmp_path).returncode != 0


def test_every_watched_condition_has_an_alert() -> None:
    names = {rule["alert"] for rule in rules()}
    assert set(WATCHED.values()) <= names
    for rule in rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_rules_use_only_metrics_and_labels_the_code_exports() -> None:
    known = metric_labels()
    for rule in rules():
        names = promql_metrics(rule["expr"])
        assert names, rule["alert"]
        for series in names:
            family = base_metric(series, known)
            assert family, f"{rule['alert']}: {series} is not a metric qrsight exports"
            extra = promql_labels(rule["expr"]) - known[family] - {"le"}
            assert not extra, f"{rule['alert']}: labels {extra} are not on {family}"


def test_the_metric_check_catches_a_typo() -> None:
    known = metric_labels()
    assert base_metric("qrsight_worker_dlq_message_total", known) is None
    assert base_metric("qrsight_worker_start_time_seconds", known) is not None
    assert promql_labels('sum by (topic) (x{code="a", stage!~"b"})') == {"topic", "code", "stage"}


def test_kubernetes_ships_the_same_rules_as_compose() -> None:
    rule = dc.load_one(PROMETHEUS_RULE)
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == dc.load_one(ALERTS)["groups"]
    listed = dc.load_one(dc.K8S / "base" / "kustomization.yaml")["resources"]
    assert PROMETHEUS_RULE.name in listed
    rendered = dc.render_kustomization(dc.K8S / "overlays" / "cpu")
    assert dc.find(rendered, "PrometheusRule", "qrsight")["metadata"]["namespace"] == "qrsight"


def test_compose_prometheus_loads_the_rules() -> None:
    config = dc.load_one(PROMETHEUS / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yml"]
    compose = dc.load_one(dc.ROOT / "docker-compose.yml")
    volumes = compose["services"]["prometheus"]["volumes"]
    config_mount = next(v for v in volumes if v.startswith("./deploy/prometheus/prometheus.yml:"))
    config_dir = Path(config_mount.split(":")[1]).parent
    assert f"./deploy/prometheus/alerts.yml:{config_dir / 'alerts.yml'}:ro" in volumes


def test_readme_explains_every_alert() -> None:
    text = (dc.ROOT / "README.md").read_text()
    start = text.index("\n## Operating qrsight")
    section = text[start : text.find("\n## ", start + 1)]
    for rule in rules():
        assert f"`{rule['alert']}`" in section, rule["alert"]
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in section


def test_dashboard_has_end_to_end_latency_and_dead_letter_panels() -> None:
    panels = {p["title"]: p for p in json.loads(DASHBOARD.read_text())["panels"]}
    latency = " ".join(t["expr"] for t in panels["End-to-end latency"]["targets"])
    assert 'qrsight_worker_stage_seconds_bucket{stage="total"}' in latency
    assert 'qrsight_api_request_seconds_bucket{route="/api/v1/detect"}' in latency
    assert "histogram_quantile(0.99" in latency
    dlq = [t["expr"] for t in panels["Dead-letter topic"]["targets"]]
    assert any("sum by (code)" in e and "qrsight_worker_dlq_messages_total" in e for e in dlq)
    restarts = panels["Worker restarts"]["targets"][0]["expr"]
    rule = next(r for r in rules() if r["alert"] == "QrsightWorkerRestarting")
    assert restarts == rule["expr"].split(" >")[0].strip()
