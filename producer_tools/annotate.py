"""Draw detections (boxes, label and confidence, payload text, corners) on an image.

Works on ``DetectionResult`` records (``record["detections"]``), so any tool holding
results — the offline CLI, a results consumer — can draw them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

READ_COLOR = (60, 180, 75)  # BGR green: payload read
UNREAD_COLOR = (0, 140, 255)  # BGR orange: a code found but not read
CORNER_COLOR = (255, 0, 255)
MAX_TEXT_CHARS = 48


def _ascii(text: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only."""
    flat = " ".join(text.split())
    flat = flat.encode("ascii", "replace").decode("ascii")
    return flat if len(flat) <= MAX_TEXT_CHARS else flat[: MAX_TEXT_CHARS - 1] + "~"


def _label(
    image: np.ndarray, text: str, org: tuple[int, int], color: tuple[int, int, int], scale: float
) -> None:
    """Text on a filled box, kept inside the image."""
    thickness = max(1, round(scale * 2))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    x = min(max(org[0], 0), max(image.shape[1] - tw, 0))
    y = min(max(org[1], th + base), image.shape[0] - 1)
    cv2.rectangle(image, (x, y - th - base), (x + tw, y), color, cv2.FILLED)
    cv2.putText(
        image, text, (x, y - base), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thickness
    )


def draw_detections(image_bgr: np.ndarray, detections: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """A copy of ``image_bgr`` with each detection record drawn on it."""
    out = image_bgr.copy()
    side = max(out.shape[:2])
    thickness = max(1, side // 400)
    scale = max(0.4, side / 1600)
    for det in detections:
        x1, y1, x2, y2 = (round(float(det[k])) for k in ("x1", "y1", "x2", "y2"))
        text = det.get("text")
        color = READ_COLOR if text is not None else UNREAD_COLOR
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness)
        if det.get("corners"):
            pts = np.array([[c["x"], c["y"]] for c in det["corners"]], np.float32)
            cv2.polylines(out, [np.rint(pts).astype(np.int32)], True, CORNER_COLOR, thickness)
        head = f"{det.get('label', det.get('class_id', '?'))} {float(det['confidence']):.2f}"
        _label(out, _ascii(head), (x1, y1), color, scale)
        if text is not None:
            _label(out, _ascii(text), (x1, y2 + round(30 * scale)), color, scale)
    return out


def write_annotated(path: Path, image_bgr: np.ndarray, record: Mapping[str, Any]) -> Path:
    """Draw ``record``'s detections and write the image (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), draw_detections(image_bgr, record.get("detections") or [])):
        raise OSError(f"OpenCV could not write {path}")
    return path
