"""The OpenAPI document matches the app's routes, both ways; small pure helpers."""

from __future__ import annotations

from typing import Any

import pytest

from api.openapi import document
from api.slots import KUBERNETES_ENV, reply_partition, set_process_slot
from core.runtime.errors import ConfigError
from core.runtime.telemetry import child_traceparent
from tests.unit.test_api_helpers import api_settings, offline_app

IGNORED_METHODS = {"HEAD", "OPTIONS"}


def test_every_api_route_is_documented_and_vice_versa() -> None:
    app = offline_app(api_settings())
    served = {
        (rule.rule, method.lower())
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/api/")
        for method in (rule.methods or set()) - IGNORED_METHODS
    }
    documented = {(path, method) for path, item in document()["paths"].items() for method in item}
    assert served == documented


def test_served_document_is_openapi_3() -> None:
    body = offline_app(api_settings()).test_client().get("/api/v1/openapi.json").get_json()
    assert body["openapi"].startswith("3.")
    assert body == document()


def test_every_error_status_of_detect_is_documented() -> None:
    responses = document()["paths"]["/api/v1/detect"]["post"]["responses"]
    assert {"200", "400", "401", "413", "415", "429", "503", "504"} <= set(responses)


def test_reply_partition_is_base_plus_slot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KUBERNETES_ENV, raising=False)
    try:
        set_process_slot(3)
        assert reply_partition(api_settings()) == 3
        assert reply_partition(api_settings(api_reply_partition=8)) == 11
    finally:
        set_process_slot(0)


def test_reply_partition_outside_the_topic_is_refused() -> None:
    from api.replies import ReplyClient

    with pytest.raises(ConfigError, match="QRSIGHT_API_REPLY_PARTITION"):
        ReplyClient(api_settings(replies_partitions=4), 4)


def test_traceparent_keeps_the_callers_trace() -> None:
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    out = child_traceparent(incoming)
    assert out.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    assert out.endswith("-01")
    assert out != incoming


@pytest.mark.parametrize(
    "incoming", [None, "", "garbage", "00-" + "0" * 32 + "-" + "1" * 16 + "-01"]
)
def test_traceparent_is_new_when_missing_or_invalid(incoming: str | None) -> None:
    out = child_traceparent(incoming)
    parts = out.split("-")
    assert [len(p) for p in parts] == [2, 32, 16, 2]
    assert parts[1] != "0" * 32


def resolve(ref_or_obj: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in ref_or_obj:
        name = ref_or_obj["$ref"].rsplit("/", 1)[1]
        resolved: dict[str, Any] = document()["components"]["responses"][name]
        return resolved
    return ref_or_obj


def test_every_status_the_api_can_give_is_documented() -> None:
    """The app's own errors on /detect, gunicorn's on every operation, 503 with Retry-After."""
    from api.admission import OverloadedError
    from api.detect import all_error_classes
    from api.protocol_errors import CODES

    app_statuses = {cls.http_status for cls in all_error_classes()} | {
        OverloadedError.http_status,
        429,  # flask-limiter
    }
    protocol = set(CODES) - {403}  # 403: proxy protocol and TLS client certs, both off
    for path, item in document()["paths"].items():
        for method, operation in item.items():
            documented = {int(status) for status in operation["responses"]}
            assert protocol <= documented, (path, method)
            if path == "/api/v1/detect":
                assert app_statuses <= documented
            for status, ref in operation["responses"].items():
                response = resolve(ref)
                if status == "503":
                    assert "Retry-After" in response["headers"]
                if int(status) >= 400:
                    content = response["content"]["application/json"]["schema"]
                    assert content == {"$ref": "#/components/schemas/Error"}
