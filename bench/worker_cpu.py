"""A worker's CPU per image, thread group by thread group, against the same pipeline in
process: what Kafka, Avro and the worker's loop add to an image (issue 32, item 1).

    python -m bench.worker_cpu [--images ../shared/data/qr-real-dev] [--seconds 20]

One broker (``QRSIGHT_KAFKA_BOOTSTRAP``, else one of its own, as ``bench.pipeline``), one
worker process (``python -m consumer.cli --worker-index 0``: the settings' defaults with one
ONNX Runtime thread, as ``make up`` runs each worker) and a backlog of the images, published
as fast as the producer goes. While the worker is busy, over ``--seconds``:

- its CPU seconds per thread group, from ``/proc/<pid>/task``: the main thread (the loop,
  Avro, the model's runs), the other threads of the interpreter (decoding, payload reads,
  ONNX Runtime's pool) and librdkafka's (``rdk:*``: fetching, producing, the group);
- the results it wrote in that time (the end offsets of the detections topic), so CPU-ms
  per image.

Then, in this process, ``Pipeline.run`` with the same settings on the same images in batches
of ``QRSIGHT_MAX_BATCH``, before and after the worker's window (the machine may be shared: the
mean of both is the baseline). Prints the table and the ratio worker / in-process (the goal of
issue 32: at most 1.10); ``--out`` keeps the figures as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from bench.pipeline import Config, bench_env, broker
from bench.serving import Image, load_images
from bench.stages import DEFAULT_IMAGES
from core.runtime.kafka import consumer_config, producer_config
from core.runtime.results import image_request
from core.runtime.settings import Settings, load_settings
from core.vision.pipeline import ImageJob, Pipeline
from producer_tools.topics import create_topics
from schemas.codec import Codec

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
GOAL = 1.10
Threads = dict[tuple[int, str], float]


def thread_cpu(pid: int) -> Threads:
    """(thread id, name) → CPU seconds so far, for every thread of ``pid``."""
    out: Threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[(int(tid), name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def groups(before: Threads, after: Threads, pid: int) -> dict[str, float]:
    """CPU seconds between two :func:`thread_cpu` samples by group: the main thread, the
    interpreter's other threads, librdkafka's. A thread started in between counts whole; one
    that ended in between is lost (sample while the worker runs)."""
    out = {"main thread": 0.0, "other threads": 0.0, "librdkafka": 0.0}
    for (tid, name), cpu in after.items():
        spent = cpu - before.get((tid, name), 0.0)
        if tid == pid:
            out["main thread"] += spent
        elif name.startswith("rdk:"):
            out["librdkafka"] += spent
        else:
            out["other threads"] += spent
    return out


def publish(settings: Settings, images: Sequence[Image], prefix: str) -> None:
    codec = Codec("ImageRequest", settings.schema_registry_url)
    producer = Producer(producer_config(settings, role="bench"))
    for i, image in enumerate(images):
        rid = f"{prefix}-{i}"
        record = image_request(rid, image.data, source="bench", content_type=image.content_type)
        value = codec.encode(record, settings.topic_images)
        while True:
            try:
                producer.produce(settings.topic_images, value, rid.encode())
                break
            except BufferError:  # the local queue is full: let it drain
                producer.poll(0.1)
        producer.poll(0)
    producer.flush(120)


def results_written(consumer: Consumer, settings: Settings) -> int:
    return sum(
        consumer.get_watermark_offsets(TopicPartition(settings.topic_detections, p), timeout=10)[1]
        for p in range(settings.topic_partitions)
    )


def in_process_ms(settings: Settings, images: Sequence[Image]) -> float:
    """CPU-ms per image of ``Pipeline.run`` in batches of ``max_batch`` (after a warm-up)."""
    step = settings.max_batch
    jobs = [ImageJob(f"p-{i}", image.data) for i, image in enumerate(images)]
    with Pipeline(settings) as pipe:
        pipe.run(jobs[:step])
        start = time.process_time()
        for first in range(0, len(jobs), step):
            pipe.run(jobs[first : first + step])
        return (time.process_time() - start) / len(jobs) * 1000.0


def measure(
    images: Sequence[Image], seconds: float, bootstrap: str | None = None
) -> dict[str, Any]:
    """The worker's thread groups and CPU-ms per image, and the in-process baseline, on the
    broker at ``bootstrap`` (else ``bench.pipeline.broker``'s) in topics of their own."""
    with contextlib.nullcontext(bootstrap) if bootstrap else broker() as kafka:
        env = bench_env(kafka, None, Config(8, 5, 2, 1))
        settings = load_settings(env)
        create_topics(settings)
        before_ms = in_process_ms(settings, images)
        worker = subprocess.Popen(
            [sys.executable, "-m", "consumer.cli", "--worker-index", "0"],
            env={**os.environ, **env},
            cwd=ROOT,
        )
        watch = Consumer(consumer_config(settings, "bench-worker-cpu", role="bench"))
        try:
            warm = settings.max_batch * 2
            publish(settings, images[:warm], "warm")
            deadline = time.monotonic() + 180
            while results_written(watch, settings) < warm:
                if time.monotonic() > deadline or worker.poll() is not None:
                    raise SystemExit("the worker did not answer its warm-up images")
                time.sleep(0.5)
            # a backlog longer than the window: the worker never waits for an image
            rounds = max(1, int(seconds * 200 / max(len(images), 1)) + 1)
            feed = threading.Thread(target=publish, args=(settings, list(images) * rounds, "b"))
            feed.start()
            time.sleep(5)
            print(f"[{time.strftime('%H:%M:%S')}] measuring the worker for {seconds:.0f} s")
            first, done0, t0 = thread_cpu(worker.pid), results_written(watch, settings), time.time()
            time.sleep(seconds)
            last, done1, t1 = thread_cpu(worker.pid), results_written(watch, settings), time.time()
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
            watch.close()
        feed.join()
        after_ms = in_process_ms(settings, images)
    cpu = groups(first, last, worker.pid)
    done = done1 - done0
    return {
        "seconds": t1 - t0,
        "results": done,
        "cpu_s": cpu,
        "worker_ms": sum(cpu.values()) / max(done, 1) * 1000.0,
        "in_process_ms": [before_ms, after_ms],
        "backlog_left": done1 < warm + rounds * len(images),
    }


def render(report: Mapping[str, Any]) -> str:
    cpu, done = report["cpu_s"], max(report["results"], 1)
    total = sum(cpu.values())
    base = sum(report["in_process_ms"]) / len(report["in_process_ms"])
    ratio = report["worker_ms"] / max(base, 1e-9)
    lines = [
        f"One worker with a backlog, {report['seconds']:.0f} s: {report['results']} results.",
        "",
        "| thread group | CPU s | share | CPU-ms per image |",
        "|---|---|---|---|",
    ]
    for name, seconds in cpu.items():
        share = seconds / max(total, 1e-9)
        lines.append(f"| {name} | {seconds:.2f} | {share:.1%} | {seconds / done * 1000:.2f} |")
    lines += [
        f"| **worker** | {total:.2f} | | **{report['worker_ms']:.2f}** |",
        "",
        "In process, the same settings and images: "
        + " / ".join(f"{ms:.2f}" for ms in report["in_process_ms"])
        + f" CPU-ms per image (before / after); worker / in-process **{ratio:.2f}x** "
        f"(goal ≤ {GOAL:.2f}x: {'met' if ratio <= GOAL else 'missed'}).",
    ]
    if not report["backlog_left"]:
        lines.append("(The backlog ran out before the window ended: the figures are low.)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=None, help="write worker_cpu.json here")
    args = parser.parse_args(argv)
    images = load_images(args.images)
    report = measure(images, args.seconds)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "worker_cpu.json").write_text(json.dumps(report, indent=1))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
