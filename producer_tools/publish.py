"""``qrsight-publish``: send images, folders, globs and video to ``qr.images``.

Inputs stream: a folder of any size is walked lazily and at most a bounded number of
bytes waits in the producer's queue, so memory stays flat. Each image becomes an Avro
``ImageRequest`` (or the raw bytes with ``--raw``). ``--wait`` awaits each result on a
reply partition through the API's own request/reply client and prints one JSON line
per image. Ctrl-C stops reading, flushes what is in flight and reports what was sent.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
from confluent_kafka import KafkaError, Message, Producer
from tqdm import tqdm

# the one request/reply client and request-id maker, shared with the API
from api.replies import ReplyClient, new_request_id
from core.runtime.errors import QrsightError
from core.runtime.kafka import avro_codec, check_value_size, producer_config
from core.runtime.logs import configure_from_settings
from core.runtime.results import image_request
from core.runtime.settings import Settings, load_settings
from core.runtime.telemetry import KafkaHeaders, Span, setup_tracing, tracing
from core.vision.images import ImageLimits, decode, probe
from producer_tools.annotate import write_annotated
from producer_tools.results import compact_line
from schemas import names

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "udp://", "tcp://")
# Bound on what waits in librdkafka's queue: keeps memory flat for any folder size.
QUEUE_KBYTES = 16 * 1024


@dataclass(frozen=True)
class Item:
    """One image to publish."""

    source: str
    data: bytes
    request_id: str = field(default_factory=new_request_id)


def is_video(spec: str) -> bool:
    return (
        spec.isdigit()
        or spec.startswith(STREAM_SCHEMES)
        or Path(spec).suffix.lower() in VIDEO_SUFFIXES
    )


def expand(specs: Iterable[str]) -> Iterator[str]:
    """Files, folders (recursive, sorted, lazily) and globs, in the order given."""
    for spec in specs:
        if is_video(spec):
            yield spec
        elif os.path.isdir(spec):
            for root, dirs, files in os.walk(spec):
                dirs.sort()
                for name in sorted(files):
                    if Path(name).suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
                        yield os.path.join(root, name)
        elif glob.has_magic(spec):
            yield from sorted(glob.iglob(spec, recursive=True))
        else:
            yield spec


def video_frames(spec: str, fps: float) -> Iterator[Item]:
    """JPEG frames of a video file, camera index or stream URL, sampled at ``fps``."""
    capture = cv2.VideoCapture(int(spec) if spec.isdigit() else spec)
    if not capture.isOpened():
        raise FileNotFoundError(f"cannot open video {spec!r}")
    native = capture.get(cv2.CAP_PROP_FPS) or fps
    step = max(1, round(native / fps)) if fps > 0 else 1
    index = 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            if index % step == 0:
                ok, jpeg = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])
                if ok:
                    yield Item(f"{spec}#frame={index}", jpeg.tobytes())
            index += 1
    finally:
        capture.release()


def items(specs: Iterable[str], fps: float, failures: list[str]) -> Iterator[Item]:
    for spec in expand(specs):
        try:
            if is_video(spec):
                yield from video_frames(spec, fps)
            else:
                yield Item(spec, Path(spec).read_bytes())
        except OSError as exc:
            failures.append(f"{spec}: {exc}")


class Publisher:
    """Produces images with delivery reports; bounded in flight."""

    def __init__(self, settings: Settings, *, raw: bool, source: str | None) -> None:
        self.settings = settings
        self.raw = raw
        self.source = source
        self.limits = ImageLimits.from_settings(settings)
        self.codec = avro_codec(settings, "ImageRequest")
        conf = producer_config(settings, "publish", **{"queue.buffering.max.kbytes": QUEUE_KBYTES})
        self.producer = Producer(conf)
        self.sent = 0
        self.delivered = 0
        self.failures: list[str] = []

    def encode(self, item: Item) -> tuple[bytes, KafkaHeaders]:
        info = probe(item.data, self.limits)  # refuse what a worker would refuse, before sending
        source = self.source or item.source
        headers: KafkaHeaders = [(names.H_CORRELATION_ID, item.request_id.encode())]
        if self.raw:
            headers.append((names.H_CONTENT_TYPE, info.content_type.encode()))
            value = item.data
        else:
            record = image_request(
                item.request_id, item.data, source=source, content_type=info.content_type
            )
            value = self.codec.encode(record, self.settings.topic_images)
        check_value_size(self.settings, value, what=f"image {item.source}")
        return value, headers

    def publish(self, item: Item) -> bool:
        try:
            value, headers = self.encode(item)
        except QrsightError as exc:
            self.failures.append(f"{item.source}: {exc.code}: {exc.message}")
            return False
        topic = self.settings.topic_images
        span = tracing().send(topic, None, {"qrsight.request_id": item.request_id})
        headers.append((names.H_TRACEPARENT, span.traceparent.encode()))
        while True:
            try:
                self.producer.produce(
                    topic,
                    value=value,
                    key=item.request_id.encode(),
                    headers=list(headers),  # librdkafka's type: values str | bytes | None
                    on_delivery=self._delivered(item.source, span),
                )
                break
            except BufferError:
                self.producer.poll(0.2)  # queue full: wait for deliveries (bounded memory)
        self.sent += 1
        self.producer.poll(0)
        return True

    def _delivered(self, source: str, span: Span) -> Any:
        def report(err: KafkaError | None, _msg: Message) -> None:
            span.end(None if err is None else err.name())
            if err is None:
                self.delivered += 1
            else:
                self.failures.append(f"{source}: delivery failed: {err.str()}")

        return report

    def flush(self, timeout_s: float = 30.0) -> int:
        return int(self.producer.flush(timeout_s))


def _pace(rate: float | None, started: float, count: int) -> None:
    if rate:
        delay = started + count / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def publish_all(args: argparse.Namespace, settings: Settings) -> int:
    publisher = Publisher(settings, raw=args.raw, source=args.source)
    read_failures: list[str] = []
    bar = tqdm(unit="img", desc="published", disable=args.quiet, file=sys.stderr)
    started = time.monotonic()
    interrupted = False
    seen = 0
    try:
        for item in items(args.inputs, args.fps, read_failures):
            _pace(args.rate, started, seen)
            seen += 1
            publisher.publish(item)
            bar.update(1)
            bar.set_postfix(delivered=publisher.delivered, failed=len(publisher.failures))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        left = publisher.flush()
        bar.close()
    failures = read_failures + publisher.failures
    for line in failures:
        print(f"failed: {line}", file=sys.stderr)
    state = "interrupted: " if interrupted else ""
    print(
        f"{state}sent={publisher.sent} delivered={publisher.delivered} "
        f"failed={len(failures)} undelivered={left} topic={settings.topic_images}",
        file=sys.stderr,
    )
    return 1 if failures or left else (130 if interrupted else 0)


def _ask(
    client: ReplyClient, item: Item, content_type: str, source: str | None, timeout_s: float
) -> dict[str, Any]:
    """One request/reply; a refusal or timeout becomes a result line, not a crash."""
    try:
        return dict(
            client.request(
                item.data,
                timeout_s,
                content_type=content_type,
                source=source or item.source,
                request_id=item.request_id,
            )
        )
    except QrsightError as exc:
        status = "EXPIRED" if exc.code == "timeout" else "ERROR"
        return {
            "request_id": exc.request_id or item.request_id,
            "source": source or item.source,
            "status": status,
            "error": {"code": exc.code, "message": exc.message},
            "detections": [],
        }


def wait_all(args: argparse.Namespace, settings: Settings) -> int:
    """Send each image through the API's request/reply client and print its result."""
    limits = ImageLimits.from_settings(settings)
    client = ReplyClient(settings)
    client.start()
    read_failures: list[str] = []
    window: deque[tuple[Item, Future[dict[str, Any]]]] = deque()
    errors = 0
    bar = tqdm(unit="img", desc="answered", disable=args.quiet, file=sys.stderr)

    def drain(limit: int) -> None:
        nonlocal errors
        while len(window) > limit:
            item, future = window.popleft()
            result = future.result()
            result["source"] = result.get("source") or item.source
            errors += result["status"] != "OK"
            line = compact_line(result) if args.compact else json.dumps(result, ensure_ascii=False)
            print(line, flush=True)
            if args.annotate:
                out = Path(args.annotate) / Path(item.source).name
                write_annotated(out, decode(item.data, limits), result)
            bar.update(1)

    try:
        if not client.wait_ready(30.0):
            print("qrsight-publish: the reply partition was not assigned in 30s", file=sys.stderr)
            return 1
        with ThreadPoolExecutor(args.concurrency) as pool:
            for item in items(args.inputs, args.fps, read_failures):
                info = probe(item.data, limits)
                future = pool.submit(
                    _ask, client, item, info.content_type, args.source, args.timeout
                )
                window.append((item, future))
                drain(args.concurrency)
            drain(0)
    except KeyboardInterrupt:
        pass
    finally:
        bar.close()
        client.close()
    for line in read_failures:
        print(f"failed: {line}", file=sys.stderr)
    return 1 if read_failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qrsight-publish", description=__doc__.splitlines()[0])
    parser.add_argument(
        "inputs", nargs="+", help="files, folders, globs, videos, camera index or URL"
    )
    parser.add_argument("--raw", action="store_true", help="send raw image bytes, not Avro")
    parser.add_argument("--source", help="source id for every image (default: its path)")
    parser.add_argument("--rate", type=float, help="at most this many images per second")
    parser.add_argument(
        "--fps", type=float, default=2.0, help="frames per second sampled from video"
    )
    parser.add_argument("--wait", action="store_true", help="await and print each result (JSON)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait per image")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight with --wait")
    parser.add_argument("--compact", action="store_true", help="with --wait: one short line each")
    parser.add_argument("--annotate", metavar="OUT_DIR", help="with --wait: save annotated images")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if (args.annotate or args.compact) and not args.wait:
        parser.error("--annotate and --compact need --wait")
    try:
        settings = load_settings()
        configure_from_settings(settings, "WARNING")
        setup_tracing("qrsight-publish")
        return wait_all(args, settings) if args.wait else publish_all(args, settings)
    except QrsightError as exc:
        print(f"qrsight-publish: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
