"""``qrsight-results``: follow ``qr.detections`` and print what the workers found.

It is also the downstream-consumer example: a plain confluent-kafka consumer, the
shared client config, the Avro codec, one line per result. The loop in :func:`follow`
is the part to copy.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TextIO, cast

from confluent_kafka import Consumer, KafkaError, KafkaException

from core.runtime.errors import QrsightError
from core.runtime.kafka import avro_codec, consumer_config
from core.runtime.logs import configure_from_settings
from core.runtime.results import DetectionResult, error_code
from core.runtime.settings import Settings, load_settings
from schemas.codec import WireFormatError

logger = logging.getLogger(__name__)


def follow(
    settings: Settings, *, from_beginning: bool = False, idle_exit_s: float | None = None
) -> Iterator[DetectionResult]:
    """Yield every ``DetectionResult`` on the detections topic.

    A throw-away group id means nothing is committed: each run reads from now (or from
    the beginning) without disturbing other consumers. ``idle_exit_s`` ends the loop
    after that long without a message (for scripts and tests).
    """
    conf = consumer_config(
        settings,
        group_id=f"qrsight-results-{uuid.uuid4().hex[:8]}",
        role="results",
        **{
            "auto.offset.reset": "earliest" if from_beginning else "latest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        },
    )
    codec = avro_codec(settings, "DetectionResult")
    consumer = Consumer(conf)
    consumer.subscribe([settings.topic_detections])
    idle = 0.0
    try:
        while idle_exit_s is None or idle < idle_exit_s:
            msg = consumer.poll(1.0)
            if msg is None:
                idle += 1.0
                continue
            idle = 0.0
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise KafkaException(error)
            try:
                # the codec checked it against schemas/DetectionResult.avsc
                yield cast(DetectionResult, codec.decode(msg.value() or b"", msg.topic() or ""))
            except WireFormatError as exc:
                logger.warning(
                    "skipping undecodable result partition=%s offset=%s error=%s",
                    msg.partition(),
                    msg.offset(),
                    exc,
                )
    finally:
        consumer.close()


def compact_line(result: Mapping[str, Any]) -> str:
    """``request_id status source n=.. texts`` in one short line (of a ``DetectionResult``,
    or of the record ``qrsight-publish --wait`` got back)."""
    parts = [result["request_id"], result["status"], result.get("source") or "-"]
    if result["status"] == "OK":
        texts = [d["text"] for d in result["detections"] if d.get("text")]
        parts.append(f"detections={len(result['detections'])}")
        if texts:
            parts.append("texts=" + json.dumps(texts, ensure_ascii=False))
        parts.append(f"total_ms={result['timings']['total_ms']:.1f}")
    elif result["error"]:
        parts.append(f"error={error_code(result)}: {result['error']['message']}")
    return " ".join(parts)


def _matcher(args: argparse.Namespace) -> Callable[[DetectionResult], bool]:
    def matches(result: DetectionResult) -> bool:
        if args.status and result["status"] not in args.status:
            return False
        return not args.source or (result.get("source") or "").startswith(args.source)

    return matches


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(prog="qrsight-results", description=__doc__.splitlines()[0])
    parser.add_argument("--from-beginning", action="store_true", help="read the whole topic")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--source", help="only results whose source starts with this")
    parser.add_argument(
        "--status", action="append", choices=["OK", "ERROR", "EXPIRED"], help="repeatable"
    )
    parser.add_argument("--idle-exit", type=float, help="stop after this many idle seconds")
    args = parser.parse_args(argv)
    matches = _matcher(args)
    try:
        settings = load_settings()
        configure_from_settings(settings, "WARNING")
        for result in follow(
            settings, from_beginning=args.from_beginning, idle_exit_s=args.idle_exit
        ):
            if matches(result):
                line = json.dumps(result, ensure_ascii=False) if args.json else compact_line(result)
                print(line, file=out, flush=True)
    except QrsightError as exc:
        print(f"qrsight-results: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
