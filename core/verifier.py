"""A second look at each QR box: a small classifier on the box's crop.

The detector scores a point of a feature map; the verifier sees the whole box, scaled
to a fixed size (``imgsz`` of its metadata, e.g. 80 x 80 grey levels) with a margin
around it, so it can tell a QR code (three finder patterns in the corners) from other
2-D symbols, lattices and module-like textures the detector confuses with one. It is
trained by ``training/verify.py`` on synthetic crops and shipped next to the detector.

Rule (:func:`Verifier.filter`): a QR-class detection stays when its payload was read (a
decoded QR code needs no second opinion) or when the verifier scores its crop at or
above the threshold in the model's metadata; detections of other classes pass
untouched.

A verifier learns the mistakes of one detector (its training crops are that detector's
boxes), so its metadata names the detector file it was trained for (``detector_sha256``)
and :func:`load_verifier` uses it only with that detector: with another model (a
drop-in Ultralytics export, say) it is left out, with a warning that names the setting.

The verifier always runs on the CPU: it costs about 15 M multiply-adds per crop, and
the number of crops changes with every image (on a GPU each new shape costs a kernel
search, see ``bench/README.md``).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from core.detections import Detections
from core.detector import parse_literal
from core.errors import ConfigError, ModelError
from core.postprocess import PAD_VALUE
from core.settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_MARGIN = 1.25


def crop_patches(
    gray: np.ndarray, boxes: np.ndarray, size: int, margin: float = DEFAULT_MARGIN
) -> np.ndarray:
    """``(N, size, size)`` uint8 crops of ``gray``: a square of ``margin`` times the box's
    longer side around its centre (outside the image: the letterbox grey), resized."""
    out = np.empty((len(boxes), size, size), np.uint8)
    h, w = gray.shape[:2]
    for k, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, np.float64).tolist()):
        side = max(x2 - x1, y2 - y1, 4.0) * margin
        s = max(round(side), 2)
        a, b = round((x1 + x2 - s) / 2), round((y1 + y2 - s) / 2)
        win = np.full((s, s), PAD_VALUE, np.uint8)
        ax, ay, bx, by = max(a, 0), max(b, 0), min(a + s, w), min(b + s, h)
        if bx > ax and by > ay:
            win[ay - b : by - b, ax - a : bx - a] = gray[ay:by, ax:bx]
        interp = cv2.INTER_AREA if s > size else cv2.INTER_LINEAR
        out[k] = cv2.resize(win, (size, size), interpolation=interp)
    return out


class Verifier:
    """The crop classifier of ``model_path`` (input ``crops [B, 1, S, S]`` grey 0..255,
    output ``score [B]`` in 0..1; metadata ``imgsz``, ``margin``, ``threshold``)."""

    def __init__(self, model_path: str | Path, *, intra_threads: int = 0) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ConfigError(
                f"verifier model not found: {self.model_path} (set QRSIGHT_VERIFIER_PATH to "
                "an .onnx file, or to off to turn the verifier off)"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_threads
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(self.model_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own (non-exported) types
            raise ModelError(f"cannot load ONNX verifier {self.model_path}: {exc}") from exc
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        if meta.get("task") != "verify":
            raise ConfigError(
                f"{self.model_path} is not a qrsight verifier (metadata task="
                f"{meta.get('task')!r}, want 'verify'); check QRSIGHT_VERIFIER_PATH"
            )
        imgsz = parse_literal(meta.get("imgsz"))
        self.size = int(imgsz[0] if isinstance(imgsz, list | tuple) else imgsz)
        self.margin = float(meta.get("margin", DEFAULT_MARGIN))
        self.threshold = float(meta.get("threshold", 0.5))
        self.version = meta.get("version", "unknown")
        self.detector_sha256 = meta.get("detector_sha256")
        self.input_name = self.session.get_inputs()[0].name
        logger.info(
            "verifier loaded model=%s imgsz=%d threshold=%.2f",
            self.model_path,
            self.size,
            self.threshold,
        )

    def scores(self, image_bgr: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Verifier score (0..1) of each xyxy box of a BGR image."""
        if len(boxes) == 0:
            return np.zeros(0, np.float32)
        gray = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY)
        crops = crop_patches(gray, boxes, self.size, self.margin)
        x = crops[:, None].astype(np.float32)
        try:
            out = self.session.run(None, {self.input_name: x})[0]
        except Exception as exc:
            raise ModelError(f"verifier inference failed ({self.model_path}): {exc}") from exc
        return np.asarray(out, np.float32).reshape(-1)

    def filter(self, image_bgr: np.ndarray, dets: Detections, qr_id: int | None) -> Detections:
        """``dets`` without the QR-class boxes that are unread and score below threshold."""
        if qr_id is None or len(dets) == 0:
            return dets
        assert dets.text is not None
        check = np.array(
            [c == qr_id and t is None for c, t in zip(dets.class_id, dets.text, strict=True)]
        )
        if not check.any():
            return dets
        keep = np.ones(len(dets), bool)
        keep[check] = self.scores(image_bgr, dets.xyxy[check]) >= self.threshold
        return dets if keep.all() else dets[keep]


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_verifier(settings: Settings, model_path: str | Path) -> Verifier | None:
    """The verifier of ``settings`` for the detector at ``model_path``, or ``None``
    (turned off, or trained for another detector: then a warning says so)."""
    if settings.verifier_path is None:
        return None
    verifier = Verifier(settings.verifier_path, intra_threads=settings.ort_intra_threads or 0)
    trained_for = verifier.detector_sha256
    if trained_for is None or trained_for == file_sha256(model_path):
        return verifier
    logger.warning(
        "verifier off: %s was trained for another detector than model=%s (train one with "
        "`python -m training.verify --detector MODEL`, or set QRSIGHT_VERIFIER_PATH=off)",
        settings.verifier_path,
        model_path,
    )
    return None
