"""The detector's result type: boxes in original-image pixels, validated on construction.

Modelled on supervision's ``Detections``: numpy arrays stay inside ``core``; adapters
see plain records (:meth:`Detections.to_records`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.runtime.results import DetectionRecord, ModelRecord, base_record
from schemas.names import STATUS_OK


@dataclass(frozen=True)
class ModelInfo:
    """What the detector tells results about itself."""

    name: str
    version: str
    input_size: int
    layout: str
    labels: dict[int, str] = field(default_factory=dict)

    def label(self, class_id: int) -> str:
        return self.labels.get(int(class_id), str(int(class_id)))

    def to_record(self) -> ModelRecord:
        """The ``model`` field of a ``DetectionResult``."""
        return {"name": self.name, "version": self.version, "input_size": int(self.input_size)}


def _as_array(name: str, value: Any, kind: str, dtype: type, shape_tail: tuple[int, ...]) -> Any:
    """``value`` as an array of ``dtype``; raises ValueError on a wrong kind or shape.

    ``kind`` lists the numpy dtype kinds accepted ("f" float, "iu" integer): a float
    array may be float64 and becomes float32, but class ids given as floats are refused.
    """
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(value).__name__}")
    if value.dtype.kind not in kind:
        raise ValueError(f"{name} must have dtype kind {kind!r}, got {value.dtype}")
    if value.ndim != 1 + len(shape_tail) or value.shape[1:] != shape_tail:
        want = "(N, " + ", ".join(map(str, shape_tail)) + ")" if shape_tail else "(N,)"
        raise ValueError(f"{name} must have shape {want}, got {value.shape}")
    return value.astype(dtype, copy=False)


def _check_corners(corners: Sequence[Any]) -> list[np.ndarray | None]:
    checked: list[np.ndarray | None] = []
    for i, c in enumerate(corners):
        if c is None:
            checked.append(None)
            continue
        arr = np.asarray(c)
        if arr.shape != (4, 2) or arr.dtype.kind not in "fiu":
            raise ValueError(f"corners[{i}] must be a (4, 2) numeric array, got {arr.shape}")
        checked.append(arr.astype(np.float32, copy=False))
    return checked


@dataclass
class Detections:
    """N detections of one image.

    ``xyxy`` (N, 4) float32 in original-image pixels, ``confidence`` (N,) float32,
    ``class_id`` (N,) int64, ``text`` N decoded payloads (None = not read), ``corners``
    N arrays (4, 2) of the code's corners, top-left first, clockwise (None = unknown).
    ``text`` and ``corners`` default to all None.
    """

    xyxy: np.ndarray
    confidence: np.ndarray
    class_id: np.ndarray
    text: list[str | None] | None = None
    corners: list[np.ndarray | None] | None = None

    def __post_init__(self) -> None:
        self.xyxy = _as_array("xyxy", self.xyxy, "f", np.float32, (4,))
        n = len(self.xyxy)
        self.confidence = _as_array("confidence", self.confidence, "f", np.float32, ())
        self.class_id = _as_array("class_id", self.class_id, "iu", np.int64, ())
        for name, arr in (("confidence", self.confidence), ("class_id", self.class_id)):
            if len(arr) != n:
                raise ValueError(f"{name} has {len(arr)} entries, xyxy has {n}")
        self.text = [None] * n if self.text is None else list(self.text)
        self.corners = [None] * n if self.corners is None else _check_corners(self.corners)
        for name, items in (("text", self.text), ("corners", self.corners)):
            if len(items) != n:
                raise ValueError(f"{name} has {len(items)} entries, xyxy has {n}")
        if any(t is not None and not isinstance(t, str) for t in self.text):
            raise ValueError("text entries must be str or None")

    @classmethod
    def empty(cls) -> Detections:
        return cls(
            xyxy=np.empty((0, 4), np.float32),
            confidence=np.empty((0,), np.float32),
            class_id=np.empty((0,), np.int64),
        )

    def __len__(self) -> int:
        return len(self.xyxy)

    def __getitem__(self, index: Any) -> Detections:
        """A subset: an int, a slice, an index array or a boolean mask."""
        idx = np.arange(len(self))[index]
        idx = np.atleast_1d(idx)
        assert self.text is not None and self.corners is not None
        return Detections(
            xyxy=self.xyxy[idx],
            confidence=self.confidence[idx],
            class_id=self.class_id[idx],
            text=[self.text[i] for i in idx],
            corners=[self.corners[i] for i in idx],
        )

    def to_records(self, labels: Mapping[int, str] | None = None) -> list[DetectionRecord]:
        """The ``detections`` array of a ``DetectionResult``."""
        labels = labels or {}
        assert self.text is not None and self.corners is not None
        records: list[DetectionRecord] = []
        for box, conf, cid, text, corners in zip(
            self.xyxy.tolist(),
            self.confidence.tolist(),
            self.class_id.tolist(),
            self.text,
            self.corners,
            strict=True,
        ):
            records.append(
                {
                    "x1": round(box[0], 2),
                    "y1": round(box[1], 2),
                    "x2": round(box[2], 2),
                    "y2": round(box[3], 2),
                    "confidence": round(conf, 4),
                    "class_id": cid,
                    "label": labels.get(cid, str(cid)),
                    "text": text,
                    "corners": None
                    if corners is None
                    else [{"x": round(x, 2), "y": round(y, 2)} for x, y in corners.tolist()],
                }
            )
        return records


def result_record(
    request_id: str,
    source: str | None,
    detections: Detections,
    *,
    width: int,
    height: int,
    model: ModelInfo,
    timing: Mapping[str, float] | None = None,
    created_at_ms: int | None = None,
) -> dict[str, Any]:
    """An ``OK`` result: detections in original pixels, labels from the model."""
    record = base_record(request_id, source, STATUS_OK, timing, created_at_ms)
    record["image"] = {"width": int(width), "height": int(height)}
    record["model"] = model.to_record()
    record["detections"] = detections.to_records(model.labels)
    return record
