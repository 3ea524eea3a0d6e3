"""Letterbox and normalize a batch on the inference device: a small ONNX graph, I/O bound.

The host letterbox (:func:`core.vision.postprocess.letterbox_batch`) resizes each image with
OpenCV, fills a float32 NCHW batch and hands it to ONNX Runtime, which copies it to the
device: about 1 ms of CPU per image and four bytes per pixel over the bus. Here the host
only concatenates the images' BGR bytes (one byte per pixel) and computes, per output row
and column, which source pixels and weights OpenCV's bilinear resize would use — a few
thousand numbers per image (:func:`letterbox_inputs`). The shipped graph
``models/qrsight-letterbox-v1.onnx`` (built by :func:`build_letterbox_graph`) gathers the
four neighbours of every output pixel, blends and rounds them as ``cv2.resize(...,
INTER_LINEAR)`` does, fills the border with 114, flips BGR to RGB, transposes to NCHW and
scales to 0..1. :class:`DeviceLetterbox` runs it on the detector's provider and binds its
output, still on the device, straight to the detector's input (ONNX Runtime I/O binding),
so the float batch never exists in host memory; only the raw detections come back.

It is one graph for any batch, image and input size (all dynamic), it runs on every
provider (the unit tests run it on the CPU and compare it with the host letterbox: equal
where no resize is needed, within one grey level where OpenCV's fixed-point arithmetic
rounds differently), and the detector is left untouched, so a user's own export drops in.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from core.runtime.errors import ModelError
from core.vision.postprocess import PAD_VALUE, Letterbox, letterbox_params, resized_size

logger = logging.getLogger(__name__)

LETTERBOX_MODEL = Path(__file__).resolve().parents[2] / "models" / "qrsight-letterbox-v1.onnx"
OPSET = 17
INPUT_NAMES = ("pixels", "row0", "row1", "col0", "col1", "wy", "wx", "inside_y", "inside_x")
OUTPUT_NAME = "images"


# --- host side: what the graph needs --------------------------------------------------


def axis_taps(
    n_out: int, pad: int, new: int, src: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices ``i0``, ``i1``, weight of ``i1`` and inside mask for one axis.

    Output position ``d`` (of ``n_out``) lies in the resized image when ``pad <= d < pad +
    new``; it samples source position ``(d - pad + 0.5) * src / new - 0.5`` between pixels
    ``i0`` and ``i1 = i0 + 1``, clamped at the edges as OpenCV's INTER_LINEAR does
    (``modules/imgproc/src/resize.cpp``: before the first pixel the weight is 0 on pixel
    0, past the last the weight is 0 on the last). Outside, everything is 0.
    """
    d = np.arange(n_out, dtype=np.float64) - pad
    inside = (d >= 0) & (d < new)
    scale = 1.0 / (new / src)  # OpenCV: scale = 1 / inv_scale, inv_scale = dsize / ssize
    pos = ((d + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(pos)
    frac = (pos - i0).astype(np.float32)
    i0 = i0.astype(np.int64)
    before = i0 < 0
    i0[before], frac[before] = 0, 0.0
    after = i0 >= src - 1
    i0[after], frac[after] = src - 1, 0.0
    i1 = np.minimum(i0 + 1, src - 1)
    i0[~inside], i1[~inside], frac[~inside] = 0, 0, 0.0
    return i0, i1, frac, inside.astype(np.float32)


def letterbox_inputs(
    images: Sequence[np.ndarray], out_hw: tuple[int, int], batch: int | None = None
) -> tuple[dict[str, np.ndarray], list[Letterbox]]:
    """The graph's inputs for HxWx3 uint8 BGR ``images`` letterboxed into ``out_hw``, and
    each image's :class:`Letterbox`. With ``batch`` > len(images) the batch is padded with
    blank (all-114) images, so the detector always sees one shape."""
    out_h, out_w = out_hw
    size = max(batch or 0, len(images))
    rows = {k: np.zeros((size, out_h), np.int64) for k in ("row0", "row1")}
    cols = {k: np.zeros((size, out_w), np.int64) for k in ("col0", "col1")}
    wy, in_y = np.zeros((size, out_h), np.float32), np.zeros((size, out_h), np.float32)
    wx, in_x = np.zeros((size, out_w), np.float32), np.zeros((size, out_w), np.float32)
    metas: list[Letterbox] = []
    offset = 0
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image {i} must be HxWx3 uint8, got {image.shape} {image.dtype}")
        height, width = image.shape[:2]
        lb = letterbox_params(height, width, out_hw)
        new_w, new_h = resized_size(width, height, lb.scale)
        y0, y1, wy[i], in_y[i] = axis_taps(out_h, lb.pad_y, new_h, height)
        x0, x1, wx[i], in_x[i] = axis_taps(out_w, lb.pad_x, new_w, width)
        rows["row0"][i], rows["row1"][i] = offset + y0 * width, offset + y1 * width
        cols["col0"][i], cols["col1"][i] = x0, x1
        offset += height * width
        metas.append(lb)
    pixels = np.concatenate([img.reshape(-1, 3) for img in images]) if images else None
    if pixels is None:
        pixels = np.full((1, 3), PAD_VALUE, np.uint8)
    inputs = {"pixels": pixels, **rows, **cols, "wy": wy, "wx": wx}
    inputs.update(inside_y=in_y, inside_x=in_x)
    return inputs, metas


# --- the graph --------------------------------------------------------------------------


def build_letterbox_graph() -> Any:
    """The letterbox graph as an ``onnx.ModelProto`` (needs the ``onnx`` package, which
    only exporting needs: ``python -m core.vision.letterbox_graph`` writes the shipped file)."""
    from onnx import TensorProto, helper

    f32, i64, u8 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.UINT8
    inputs = [
        helper.make_tensor_value_info("pixels", u8, ["P", 3]),
        *(helper.make_tensor_value_info(n, i64, ["B", "H"]) for n in ("row0", "row1")),
        *(helper.make_tensor_value_info(n, i64, ["B", "W"]) for n in ("col0", "col1")),
        helper.make_tensor_value_info("wy", f32, ["B", "H"]),
        helper.make_tensor_value_info("wx", f32, ["B", "W"]),
        helper.make_tensor_value_info("inside_y", f32, ["B", "H"]),
        helper.make_tensor_value_info("inside_x", f32, ["B", "W"]),
    ]
    output = helper.make_tensor_value_info(OUTPUT_NAME, f32, ["B", 3, "H", "W"])
    consts = [
        helper.make_tensor("ax2", i64, [1], [2]),
        helper.make_tensor("ax1", i64, [1], [1]),
        helper.make_tensor("ax23", i64, [2], [2, 3]),
        helper.make_tensor("ax13", i64, [2], [1, 3]),
        helper.make_tensor("rgb", i64, [3], [2, 1, 0]),
        helper.make_tensor("pad", f32, [], [float(PAD_VALUE)]),
        helper.make_tensor("inv255", f32, [], [1.0 / 255.0]),
    ]
    node = helper.make_node
    nodes = [
        node("Unsqueeze", ["row0", "ax2"], ["r0"]),  # (B, H, 1)
        node("Unsqueeze", ["row1", "ax2"], ["r1"]),
        node("Unsqueeze", ["col0", "ax1"], ["c0"]),  # (B, 1, W)
        node("Unsqueeze", ["col1", "ax1"], ["c1"]),
    ]
    corners = {"00": ("r0", "c0"), "01": ("r0", "c1"), "10": ("r1", "c0"), "11": ("r1", "c1")}
    for name, (r, c) in corners.items():
        nodes += [
            node("Add", [r, c], [f"i{name}"]),  # (B, H, W) pixel indices
            node("Gather", ["pixels", f"i{name}"], [f"g{name}"], axis=0),  # (B, H, W, 3)
            node("Cast", [f"g{name}"], [f"p{name}"], to=f32),
        ]
    nodes += [
        node("Unsqueeze", ["wx", "ax13"], ["fx"]),  # (B, 1, W, 1)
        node("Unsqueeze", ["wy", "ax23"], ["fy"]),  # (B, H, 1, 1)
        node("Sub", ["p01", "p00"], ["d0"]),
        node("Mul", ["d0", "fx"], ["e0"]),
        node("Add", ["p00", "e0"], ["top"]),
        node("Sub", ["p11", "p10"], ["d1"]),
        node("Mul", ["d1", "fx"], ["e1"]),
        node("Add", ["p10", "e1"], ["bottom"]),
        node("Sub", ["bottom", "top"], ["dv"]),
        node("Mul", ["dv", "fy"], ["ev"]),
        node("Add", ["top", "ev"], ["blend"]),
        node("Round", ["blend"], ["value"]),  # the resized uint8 pixel, as OpenCV rounds it
        node("Unsqueeze", ["inside_y", "ax23"], ["my"]),
        node("Unsqueeze", ["inside_x", "ax13"], ["mx"]),
        node("Mul", ["my", "mx"], ["mask"]),  # (B, H, W, 1): 1 in the image, 0 in the border
        node("Sub", ["value", "pad"], ["centred"]),
        node("Mul", ["centred", "mask"], ["masked"]),
        node("Add", ["masked", "pad"], ["canvas"]),
        node("Gather", ["canvas", "rgb"], ["rgb_hwc"], axis=3),  # BGR -> RGB
        node("Transpose", ["rgb_hwc"], ["nchw"], perm=[0, 3, 1, 2]),
        node("Mul", ["nchw", "inv255"], [OUTPUT_NAME]),
    ]
    graph = helper.make_graph(nodes, "qrsight_letterbox", inputs, [output], initializer=consts)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="qrsight",
        doc_string="Letterbox (bilinear, as cv2.resize INTER_LINEAR; border 114) + BGR->RGB "
        "+ NCHW + /255 for a batch of images given as concatenated BGR pixels; see "
        "core/vision/letterbox_graph.py",
    )
    model.ir_version = 8  # onnxruntime >= 1.14 reads it
    helper.set_model_props(model, {"version": "1", "task": "letterbox"})
    return model


# --- the device path ----------------------------------------------------------------------


class DeviceLetterbox:
    """Letterbox + detector, chained on one device with I/O binding.

    ``run(images)`` returns the detector's raw output (host memory) and the letterboxes,
    like ``detector.infer(detector.preprocess(images))`` does on the host. ``batch`` (the
    detector's padded run size, or None) pads every run to one shape.
    """

    def __init__(
        self,
        detector_session: ort.InferenceSession,
        providers: Sequence[Any],
        out_hw: tuple[int, int],
        *,
        device: tuple[str, int] = ("cpu", 0),
        batch: int | None = None,
        model_path: Path = LETTERBOX_MODEL,
    ) -> None:
        self.detector = detector_session
        self.out_hw = out_hw
        self.device_type, self.device_id = device
        self.batch = batch
        self.input_name = detector_session.get_inputs()[0].name
        self.output_name = detector_session.get_outputs()[0].name
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own (non-exported) types
            raise ModelError(f"cannot load the letterbox graph {model_path}: {exc}") from exc
        logger.info(
            "device letterbox loaded providers=%s device=%s:%d",
            ",".join(self.session.get_providers()),
            self.device_type,
            self.device_id,
        )

    def run(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[Letterbox]]:
        size = self.batch
        if size is None or len(images) <= size:
            return self._run(images, size)
        outs, metas = [], []
        for start in range(0, len(images), size):
            raw, lbs = self._run(images[start : start + size], size)
            outs.append(raw)
            metas.extend(lbs)
        return np.concatenate(outs), metas

    def _run(
        self, images: Sequence[np.ndarray], batch: int | None
    ) -> tuple[np.ndarray, list[Letterbox]]:
        inputs, metas = letterbox_inputs(images, self.out_hw, batch)
        try:
            pre = self.session.io_binding()
            for name, value in inputs.items():
                pre.bind_cpu_input(name, value)
            pre.bind_output(OUTPUT_NAME, self.device_type, self.device_id)
            self.session.run_with_iobinding(pre)
            letterboxed = pre.get_outputs()[0]  # stays on the device
            det = self.detector.io_binding()
            det.bind_ortvalue_input(self.input_name, letterboxed)
            det.bind_output(self.output_name, "cpu")
            self.detector.run_with_iobinding(det)
            raw = det.copy_outputs_to_cpu()[0]
        except Exception as exc:  # onnxruntime's errors are not exported as types
            raise ModelError(
                f"ONNX Runtime failed on a device-letterboxed batch of {len(images)}: {exc}"
            ) from exc
        return np.asarray(raw, dtype=np.float32)[: len(images)], metas


def export(path: Path = LETTERBOX_MODEL) -> Path:
    """Write the letterbox graph (checked with ``onnx.checker``)."""
    import onnx

    model = build_letterbox_graph()
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


if __name__ == "__main__":
    print(export())
