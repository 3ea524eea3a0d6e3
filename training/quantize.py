"""The detector in INT8: ONNX Runtime static quantization (QDQ), calibrated on synthetic images.

    python -m training.quantize [--model models/qrsight-qr-v3.onnx]
                                [--out models/qrsight-qr-v3-int8.onnx]
                                [--calib 256] [--seed 7320001] [--method minmax|entropy|percentile]
                                [--ops Conv]

Reproducible: the calibration images are ``training.synth.make_sample`` of stream
``--seed`` (a stream no training, selection, threshold or evaluation step uses), at the
model's input size, preprocessed by :class:`core.vision.detector.Detector` itself, so the
tensors are the ones the pipeline feeds. Never calibrated on the development photos:
they are for evaluation only.

Steps: ONNX Runtime's ``quant_pre_process`` (shape inference, graph optimisation), then
``quantize_static`` with QDQ nodes, per-channel INT8 weights (symmetric), UINT8
activations (``--ops``: the op types quantized; the default, the convolutions alone,
keeps the box decoding at the end of the graph in float, where an 8-bit grid of
positions would move the boxes). The FP32 model's metadata (names, imgsz, stride,
version...) is copied, and ``quantized_from_sha256`` names the FP32 file, so the verifier
trained for that detector is used with its INT8 version too.

Evaluate it as any detector: ``python -m training.eval.detector DATA --model OUT`` and
``python -m training.eval.synthetic --model OUT`` (figures: ``models/README.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from core.runtime.settings import DEFAULT_MODEL
from core.vision.detector import Detector

CALIB_SEED = 7_320_001
QUANTIZED_FROM = "quantized_from_sha256"
# the op types quantized (inside the modules only, see module_nodes): with the ReLUs, adds,
# concatenations, pools and upsampling in INT8 too, the activations stay 8-bit from one
# convolution to the next instead of going back to float around each
DEFAULT_OPS = ("Conv", "Relu", "Add", "Concat", "MaxPool", "Resize")


def calibration_batches(model: Path, count: int, seed: int) -> Iterator[np.ndarray]:
    """``count`` single-image input tensors: synthetic samples at the model's input size,
    letterboxed by the detector's own preprocessing."""
    from training.synth import make_sample

    det = Detector(model, ["CPUExecutionProvider"], intra_threads=1)
    imgsz = max(det.input_hw)
    for index in range(count):
        rgb = make_sample(seed, index, imgsz).image
        batch, _ = det.preprocess([cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)])
        yield batch


def module_nodes(graph_model: Any, ops: Sequence[str]) -> list[str]:
    """The nodes of ``ops`` inside the network's modules (``/model/<module>/.../Op``): the
    backbone, neck and heads; not the box decoding that follows them (``/model/Add_6``,
    ``/Sub``...), which stays in float."""
    return [
        n.name
        for n in graph_model.graph.node
        if n.op_type in ops and n.name.startswith("/model/") and n.name.count("/") >= 3
    ]


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over prepared tensors."""

    def __init__(self, name: str, batches: Sequence[np.ndarray]) -> None:
        self._items = iter([{name: b} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def quantize(
    model: Path,
    out: Path,
    *,
    count: int = 256,
    seed: int = CALIB_SEED,
    method: str = "minmax",
    ops: Sequence[str] = DEFAULT_OPS,
) -> Path:
    """Write the INT8 (QDQ) version of ``model`` to ``out``; returns ``out``."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    name = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_inputs()[0]
    batches = list(calibration_batches(model, count, seed))
    with tempfile.TemporaryDirectory(prefix="qrsight-quant-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(model), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out),
            _Reader(name.name, batches),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(ops),
            nodes_to_quantize=module_nodes(onnx.load(str(pre)), ops),
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            calibrate_method=methods[method],
            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
        )
    source, quantized = onnx.load(str(model)), onnx.load(str(out))
    meta = {p.key: p.value for p in source.metadata_props}
    meta[QUANTIZED_FROM] = hashlib.sha256(model.read_bytes()).hexdigest()
    meta["quantization"] = (
        f"INT8 static QDQ, per-channel weights, ops {','.join(ops)}, {method} calibration on "
        f"{count} synthetic images (training.synth stream {seed})"
    )
    del quantized.metadata_props[:]
    for key, value in meta.items():
        quantized.metadata_props.add(key=key, value=value)
    onnx.save(quantized, str(out))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=None, help="default: MODEL-int8.onnx")
    parser.add_argument("--calib", type=int, default=256, help="calibration images")
    parser.add_argument("--seed", type=int, default=CALIB_SEED)
    parser.add_argument("--method", choices=("minmax", "entropy", "percentile"), default="minmax")
    parser.add_argument("--ops", nargs="+", default=list(DEFAULT_OPS), help="op types to quantize")
    args = parser.parse_args(argv)
    out = args.out or args.model.with_name(f"{args.model.stem}-int8.onnx")
    quantize(args.model, out, count=args.calib, seed=args.seed, method=args.method, ops=args.ops)
    print(f"wrote {out} ({out.stat().st_size} bytes, from {args.model.stat().st_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
