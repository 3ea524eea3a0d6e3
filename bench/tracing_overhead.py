"""What tracing costs per image, off (the default) and on, against the pipeline itself.

    python -m bench.tracing_overhead [--batches 2000] [--batch 8] [--pipeline-rounds 5]

Times, in this one run:

- baseline: ``core.vision.pipeline.Pipeline.run`` on the sample images in batches of
  ``--batch`` (the shipped model; decode, ONNX run, NMS, payload reading), per image;
- the worker's tracing hooks per image, exactly as ``consumer.worker`` calls them
  (``tracing().batch(...)`` around the batch, ``headers()`` for the ``qr.detections`` and
  the reply record, and the pipeline's four stage records when tracing is on);
- the API's hooks per request (server span, send span, reply span).

"Off" is :data:`core.runtime.telemetry.OFF`; "on" is the SDK as the processes run it (batch span
processor) with an exporter that encodes every batch to OTLP protobuf (what the OTLP
exporter sends) and drops it, so no collector's speed is in the figures. Each timing
round ends with a flush inside the timed region and the queue is large enough that no
span is dropped, so "on" counts all the CPU tracing takes, the exporter thread's
encoding included. Prints the costs in µs and as a share of the per-image pipeline time
measured here.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from consumer.intake import Intake
from core.runtime.settings import load_settings
from core.runtime.telemetry import OFF, OtelTracing, Tracing, child_traceparent
from core.vision.pipeline import ImageJob, Pipeline

REPO = Path(__file__).resolve().parent.parent

SAMPLES = REPO / "samples"
RESULT = {"status": "OK", "error": None}


class EncodeAndDrop(SpanExporter):
    """Serialises spans as the OTLP exporter does, then drops them."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        encode_spans(spans).SerializeToString()
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def messages(batch: int) -> list[Intake]:
    return [
        Intake(
            topic="qr.images",
            partition=0,
            offset=i,
            key=None,
            value=None,
            headers=[("traceparent", child_traceparent(None).encode())],
            request_id=f"req-{i}",
            job=ImageJob(f"req-{i}", b""),
            reply_topic="qr.replies",
        )
        for i in range(batch)
    ]


def worker_hooks(tracing: Tracing, items: list[Intake]) -> None:
    """One batch's hook calls, as consumer.worker makes them."""
    with tracing.batch(items, "qrsight-workers") as trace:
        stages = trace.stages
        if stages is not None:  # the pipeline records only when asked
            now = time.perf_counter()
            for item in items:
                for stage in ("decode", "infer", "postprocess", "payloads"):
                    stages.add(item.job, stage, now, now + 1e-4)
        for item in items:
            trace.headers(item, RESULT, "qr.detections")
            trace.headers(item, RESULT, "qr.replies")


def api_hooks(tracing: Tracing) -> None:
    """One request's hook calls, as the API makes them."""
    server = tracing.server("POST /api/v1/detect", {}, {"http.route": "/api/v1/detect"})
    send = tracing.send("qr.images", server.traceparent, {"qrsight.request_id": "r"})
    send.end()
    tracing.received("qr.replies", None, send.traceparent, time.time_ns(), {})
    server.http_status(200)
    server.end()


def per_call_us(
    fn: Callable[[], None], calls: int, flush: Callable[[], object], rounds: int = 5
) -> float:
    """Median over ``rounds`` of the mean µs per call, ``flush`` included in each round."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        flush()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def pipeline_ms_per_image(batch: int, rounds: int) -> float:
    images = [p.read_bytes() for p in sorted(SAMPLES.glob("*.jpg"))]
    jobs = [ImageJob(f"img-{i}", images[i % len(images)]) for i in range(batch)]
    with Pipeline(load_settings({}, max_batch=batch)) as pipeline:
        pipeline.run(jobs)  # warm-up
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            pipeline.run(jobs)
            samples.append((time.perf_counter() - start) / batch * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2000, help="batches per timing round")
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    parser.add_argument("--pipeline-rounds", type=int, default=5)
    args = parser.parse_args()

    os.environ["OTEL_BSP_MAX_QUEUE_SIZE"] = str(40 * args.batches * args.batch)  # drop nothing
    exporter = EncodeAndDrop()
    on = OtelTracing("qrsight-bench", [exporter])
    items = messages(args.batch)
    pipeline_ms = pipeline_ms_per_image(args.batch, args.pipeline_rounds)
    pipeline_us = pipeline_ms * 1000
    print(f"pipeline (baseline): {pipeline_ms:.2f} ms/image, batches of {args.batch}")
    for name, tracing, flush in (("off", OFF, lambda: None), ("on", on, on.provider.force_flush)):
        worker = (
            per_call_us(lambda t=tracing: worker_hooks(t, items), args.batches, flush) / args.batch
        )
        api = per_call_us(lambda t=tracing: api_hooks(t), args.batches, flush)
        print(
            f"tracing {name:3}: worker hooks {worker:8.2f} µs/image "
            f"({worker / pipeline_us:.4%} of the pipeline); "
            f"API hooks {api:7.2f} µs/request"
        )
    on.shutdown()
    print(f"(on: {exporter.spans} spans encoded to OTLP protobuf and dropped)")


if __name__ == "__main__":
    main()
