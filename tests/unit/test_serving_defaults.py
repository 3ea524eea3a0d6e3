"""What `make up` runs on a host (worker count, ORT threads) and the seed's design that
``bench/serving.py`` compares it with (``bench/seed_server.py``, built with Flask's test client)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.runtime.settings import load_settings
from producer_tools import stack

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


@pytest.mark.parametrize(
    ("cores", "environ", "expected"),  # expected: workers, ORT threads, solo threads
    [
        (2, {}, (2, "1", "2")),  # one single-threaded worker per core; a lone image takes both
        (4, {}, (4, "1", "4")),
        (16, {}, (6, "2", "16")),  # capped at the 6 partitions of qr.images; the cores shared out
        (16, {"QRSIGHT_TOPIC_PARTITIONS": "16"}, (16, "1", "16")),
        (16, {"QRSIGHT_WORKERS": "2"}, (2, "8", "16")),  # fewer workers, more threads each
        (8, {"QRSIGHT_ORT_INTRA_THREADS": "3"}, (6, "3", "8")),  # an explicit setting wins
        (4, {"QRSIGHT_ORT_SOLO_THREADS": "0"}, (4, "1", "0")),  # the solo session turned off
        (1, {}, (1, "1", None)),  # one worker: its own threads are every core already
    ],
)
def test_make_up_sizes_workers_from_the_cores(
    monkeypatch: pytest.MonkeyPatch,
    cores: int,
    environ: dict[str, str],
    expected: tuple[int, str, str | None],
) -> None:
    monkeypatch.setattr(stack.os, "cpu_count", lambda: cores)
    count, env = stack.serving_env(load_settings(environ), dict(environ))
    got = (count, env["QRSIGHT_ORT_INTRA_THREADS"], env.get("QRSIGHT_ORT_SOLO_THREADS"))
    assert got == expected


def test_seed_design_answers_one_image_per_request() -> None:
    from bench.seed_server import create_app  # gunicorn's gevent workers serve it in the bench

    client = create_app().test_client()
    assert client.get("/health").status_code == 200
    image = (SAMPLES / "parcel-label.jpg").read_bytes()
    raw = client.post("/detect", data=image, content_type="image/jpeg")
    form = client.post("/detect", data={"image": (SAMPLES / "parcel-label.jpg").open("rb")})
    plain = client.post("/detect?decode=false", data=image, content_type="image/jpeg")
    assert raw.status_code == form.status_code == plain.status_code == 200
    assert raw.json is not None and plain.json is not None and form.json is not None
    assert raw.json["detections"] == form.json["detections"]
    assert any(d["text"] for d in raw.json["detections"])
    assert not any(d["text"] for d in plain.json["detections"])
    bad = client.post("/detect", data=b"not an image", content_type="image/jpeg")
    assert bad.status_code == 400
