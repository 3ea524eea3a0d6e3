"""A second look at each QR box: a small classifier on the box's crop.

The detector scores a point of a feature map; the verifier sees the whole box, scaled
to a fixed size (``imgsz`` of its metadata, e.g. 80 x 80 grey levels) with a margin
around it, so it can tell a QR code (three finder patterns in the corners) from other
2-D symbols, lattices and module-like textures the detector confuses with one. It is
trained by ``training/verify.py`` on synthetic crops and shipped next to the detector.

Rule (:func:`Verifier.filter` = :func:`Verifier.judge` then :func:`Verifier.apply`): a
QR-class detection stays when its payload was read (a decoded QR code needs no second
opinion) or when its judged score reaches the threshold in the model's metadata;
detections of other classes pass untouched. The judged score of a version 1 verifier is
its raw score. A verifier with a ``calibration`` in its metadata (version 2 on) judges
``P(code) = sigmoid(a * logit(detector score) + b * logit(verifier score) + c)``, fitted
on synthetic boxes the pipeline would have checked, and that probability becomes the
box's reported ``confidence`` (1.0 for a read box): a number a downstream consumer can
threshold (``models/README.md`` has its reliability table).

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

from core.runtime.errors import ConfigError, ModelError
from core.runtime.settings import Settings
from core.vision.detections import Detections
from core.vision.detector import parse_literal
from core.vision.postprocess import PAD_VALUE

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
        self.calibration = _calibration(meta.get("calibration"), self.model_path)
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

    def probability(self, detector_score: np.ndarray, verifier_score: np.ndarray) -> np.ndarray:
        """P(a QR code) of unread boxes from both scores (the metadata's calibration)."""
        if self.calibration is None:
            raise ConfigError(f"{self.model_path} has no calibration (a version 1 verifier)")
        return calibrated(self.calibration, detector_score, verifier_score)

    def judge(self, image_bgr: np.ndarray, dets: Detections, qr_id: int | None) -> np.ndarray:
        """Per detection, what the keep rule compares with the threshold: for an unread QR
        box its probability of being a code (a version 1 verifier: its raw score); 1.0
        for a read one; NaN for other classes (they are not judged)."""
        out = np.full(len(dets), np.nan, np.float32)
        if qr_id is None or len(dets) == 0:
            return out
        assert dets.text is not None
        qr = dets.class_id == qr_id
        unread = qr & np.array([t is None for t in dets.text], bool)
        out[qr] = 1.0
        if unread.any():
            scores = self.scores(image_bgr, dets.xyxy[unread])
            if self.calibration is not None:
                scores = self.probability(dets.confidence[unread], scores)
            out[unread] = scores
        return out

    def apply(self, dets: Detections, judged: np.ndarray) -> Detections:
        """``dets`` without the judged boxes below the threshold (unless read since they
        were judged). With a calibration, each judged box's confidence becomes its
        probability of being a code, 1.0 once read."""
        if len(dets) == 0:
            return dets
        assert dets.text is not None
        read = np.array([t is not None for t in dets.text], bool)
        judged = np.where(read & ~np.isnan(judged), 1.0, judged)
        keep = np.isnan(judged) | (judged >= self.threshold)
        if self.calibration is not None:
            confidence = np.where(np.isnan(judged), dets.confidence, judged).astype(np.float32)
            dets = Detections(
                xyxy=dets.xyxy,
                confidence=confidence,
                class_id=dets.class_id,
                text=dets.text,
                corners=dets.corners,
            )
        return dets if keep.all() else dets[keep]

    def filter(self, image_bgr: np.ndarray, dets: Detections, qr_id: int | None) -> Detections:
        """:meth:`judge` then :meth:`apply`: unread QR boxes below the threshold dropped
        and, with a calibration, every QR box's confidence its probability of being a code."""
        return self.apply(dets, self.judge(image_bgr, dets, qr_id))


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)), p clipped to [1e-6, 1 - 1e-6]."""
    q = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    return np.asarray(np.log(q / (1 - q)))


def calibrated(
    calibration: tuple[float, float, float],
    detector_score: np.ndarray,
    verifier_score: np.ndarray,
) -> np.ndarray:
    """``sigmoid(a * logit(detector) + b * logit(verifier) + c)`` for ``(a, b, c)``."""
    a, b, c = calibration
    z = a * logit(detector_score) + b * logit(verifier_score) + c
    return np.asarray(1.0 / (1.0 + np.exp(-z)), np.float32)


def _calibration(value: str | None, path: Path) -> tuple[float, float, float] | None:
    """The metadata's ``calibration`` ``[a, b, c]``, or None when there is none."""
    if value is None:
        return None
    parsed = parse_literal(value)
    if not isinstance(parsed, list | tuple) or len(parsed) != 3:
        raise ConfigError(f"{path}: calibration metadata must be [a, b, c], got {value!r}")
    a, b, c = (float(v) for v in parsed)
    return a, b, c


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
