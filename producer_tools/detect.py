"""``qrsight-detect``: find and read QR codes in image files, offline (no Kafka).

    qrsight-detect IMAGE_OR_DIR... [--model PATH] [--conf X] [--no-decode] [--json]
                   [--annotate OUT_DIR] [--batch N]

Directories are searched recursively for image files (by extension); whatever is
given is then checked by its magic bytes, so a non-image gives an ``ERROR`` line and
the run goes on. ``--json`` prints exactly one ``DetectionResult`` JSON line per
input (``source`` = the path). Runs through :class:`core.vision.pipeline.Pipeline`, the same
code as the stream workers. Exit status: 0 when it ran (even with ``ERROR`` lines),
2 on a configuration error (e.g. no model), 1 when the model fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from tqdm import tqdm

from core.runtime.errors import ConfigError, ImageTooLargeError, ModelError, QrsightError
from core.runtime.logs import configure_from_settings
from core.runtime.results import DetectionResult, error_code, error_record
from core.runtime.settings import Settings, load_settings
from core.vision.images import decode
from core.vision.pipeline import ImageJob, Pipeline
from producer_tools.annotate import write_annotated

logger = logging.getLogger("qrsight.detect")

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".dib"})
PROGRESS_MIN_FILES = 10


class InputNotFoundError(QrsightError):
    """A path on the command line that does not exist or cannot be read."""

    code = "not_found"
    http_status = 404


@dataclass(frozen=True)
class Input:
    path: Path
    rel: Path  # where its annotated copy goes, under --annotate


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="qrsight-detect", description="Find and read QR codes in image files (offline)."
    )
    p.add_argument("paths", nargs="+", metavar="IMAGE_OR_DIR", type=Path)
    p.add_argument("--model", type=Path, help="ONNX detector (default: QRSIGHT_MODEL_PATH)")
    p.add_argument("--conf", type=float, help="confidence threshold (default: per model)")
    p.add_argument("--no-decode", action="store_true", help="do not read the QR payloads")
    p.add_argument("--json", action="store_true", help="one DetectionResult JSON line per input")
    p.add_argument("--annotate", type=Path, metavar="OUT_DIR", help="write annotated images")
    p.add_argument("--batch", type=int, help="images per model run (default: QRSIGHT_MAX_BATCH)")
    return p.parse_args(argv)


def build_settings(args: argparse.Namespace) -> Settings:
    """Settings from the environment, overridden by the flags given."""
    overrides: dict[str, Any] = {}
    if args.model is not None:
        overrides["model_path"] = args.model
    if args.conf is not None:
        overrides["conf_threshold"] = args.conf
    if args.no_decode:
        overrides["decode_payloads"] = False
    if args.batch is not None:
        overrides["max_batch"] = args.batch
    return load_settings(**overrides)


def expand(paths: Sequence[Path]) -> list[Input]:
    """Files as given, and image files (by extension) under directories, sorted."""
    inputs: list[Input] = []
    for path in paths:
        if path.is_dir():
            found = sorted(
                f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
            inputs += [Input(f, f.relative_to(path)) for f in found]
        else:
            inputs.append(Input(path, Path(path.name)))
    return inputs


def read_job(item: Input, settings: Settings) -> ImageJob | QrsightError:
    """The file as an ImageJob, or the error that keeps it from being one."""
    source = str(item.path)
    try:
        size = item.path.stat().st_size
        if size > settings.max_image_bytes:
            return ImageTooLargeError(
                f"{size} bytes is over the limit of {settings.max_image_bytes} "
                "(QRSIGHT_MAX_IMAGE_BYTES)"
            )
        data = item.path.read_bytes()
    except OSError as exc:
        return InputNotFoundError(f"cannot read {source}: {exc.strerror or exc}")
    return ImageJob(request_id=uuid.uuid4().hex, data=data, source=source)


def run_batch(items: Sequence[Input], pipeline: Pipeline) -> list[DetectionResult]:
    """One record per item, in order; unreadable files become ERROR records here."""
    prepared = [read_job(item, pipeline.settings) for item in items]
    jobs = [p for p in prepared if isinstance(p, ImageJob)]
    done = iter(pipeline.run(jobs))
    records = []
    for item, p in zip(items, prepared, strict=True):
        if isinstance(p, ImageJob):
            record = next(done)
        else:
            record = error_record(uuid.uuid4().hex, str(item.path), p)
        records.append(cast(DetectionResult, record))  # the builders' dicts have its shape
    return records


def human_line(record: DetectionResult) -> str:
    """One readable line per image."""
    error, img, dets = record["error"], record["image"], record["detections"]
    if record["status"] != "OK" or img is None:
        message = error["message"] if error else None
        return f"{record['source']}: {record['status']} {error_code(record)}: {message}"
    found = "; ".join(
        f"{d['label']} {d['confidence']:.2f} "
        f"[{d['x1']:.0f},{d['y1']:.0f},{d['x2']:.0f},{d['y2']:.0f}]"
        + ("" if d["text"] is None else f" {json.dumps(d['text'], ensure_ascii=False)}")
        for d in dets
    )
    ms = record["timings"]["total_ms"]
    head = f"{record['source']}: OK {img['width']}x{img['height']} {len(dets)} found"
    return f"{head} ({ms:.0f} ms)" + (f": {found}" if dets else "")


def annotate(item: Input, record: DetectionResult, pipeline: Pipeline, out_dir: Path) -> None:
    if record["status"] != "OK":
        return
    try:
        image = decode(item.path.read_bytes(), pipeline.limits)
        write_annotated(out_dir / item.rel, image, record)
    except (OSError, QrsightError) as exc:
        logger.warning("cannot write annotated image source=%s error=%s", item.path, exc)


def chunks(items: Sequence[Input], size: int) -> Iterator[Sequence[Input]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def detect(args: argparse.Namespace, pipeline: Pipeline) -> None:
    inputs = expand(args.paths)
    few = len(inputs) < PROGRESS_MIN_FILES
    with tqdm(total=len(inputs), unit="img", file=sys.stderr, disable=True if few else None) as bar:
        for items in chunks(inputs, pipeline.settings.max_batch):
            for item, record in zip(items, run_batch(items, pipeline), strict=True):
                line = json.dumps(record, ensure_ascii=False) if args.json else human_line(record)
                bar.write(line, file=sys.stdout)
                if args.annotate is not None:
                    annotate(item, record, pipeline, args.annotate)
            sys.stdout.flush()
            bar.update(len(items))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = build_settings(args)
        configure_from_settings(settings)
        pipeline = Pipeline(settings)
    except ConfigError as exc:
        hint = " or pass --model PATH" if "QRSIGHT_MODEL_PATH" in exc.message else ""
        print(f"qrsight-detect: {exc.message}{hint}", file=sys.stderr)
        return 2
    except ModelError as exc:
        print(
            f"qrsight-detect: {exc.message} (check --model / QRSIGHT_MODEL_PATH)", file=sys.stderr
        )
        return 2
    try:
        with pipeline:
            detect(args, pipeline)
    except ModelError as exc:
        print(f"qrsight-detect: model failed: {exc.message}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `qrsight-detect --json dir | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
