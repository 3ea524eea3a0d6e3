"""Export a trained :class:`~training.model.QRDet` to ONNX in the Ultralytics YOLOv8 layout.

Input ``images`` ``[B, 3, H, W]`` (RGB, 0..1; batch, height and width dynamic), output
``output0`` ``[B, 5, N]``; metadata ``names``, ``stride``, ``imgsz``, ``task``,
``description``, ``version`` like an Ultralytics export, so the core detector loads it
without a special case. BatchNorm is folded into the convolutions first.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from training.model import ExportWrapper, QRDet, fuse_bn

logger = logging.getLogger(__name__)

OPSET = 17
MODEL_VERSION = "3"  # the shipped detector: models/qrsight-qr-v3.onnx
MODEL_NAME = f"qrsight-qr-v{MODEL_VERSION}.onnx"
# the dynamic axes of a detector export: batch, height and width in, batch and points out
DETECTOR_AXES = {
    "images": {0: "batch", 2: "height", 3: "width"},
    "output0": {0: "batch", 2: "anchors"},
}


class ExportCheckError(RuntimeError):
    """The exported graph does not reproduce the torch model."""


def export_onnx(
    model: QRDet,
    path: Path,
    imgsz: int,
    *,
    version: str = "1",
    description: str = "qrsight QR code detector (synthetic data, anchor-free)",
    check: bool = True,
    score_bias: float = 0.0,
) -> Path:
    """Write ``path`` (fused, with metadata); with ``check`` compare ORT against torch."""
    net = fuse_bn(copy.deepcopy(model).eval().float())
    wrapper = ExportWrapper(net, score_bias).eval()
    dummy = torch.rand(1, 3, imgsz, imgsz)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.onnx")
    torch_export(
        wrapper,
        dummy,
        tmp,
        inputs=["images"],
        outputs=["output0"],
        dynamic_axes=DETECTOR_AXES,
    )
    proto = onnx.load(str(tmp))
    # the tracer leaves the channel axis symbolic; it is 4 + nc (Ultralytics exports fix it)
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 4 + model.nc
    meta = {
        "description": description,
        "author": "qrsight",
        "date": time.strftime("%Y-%m-%d"),
        "version": version,
        "task": "detect",
        "stride": "32",
        "batch": "1",
        "imgsz": f"[{imgsz}, {imgsz}]",
        "names": "{0: 'qr'}",
        "score_bias": f"{score_bias:.6f}",
    }
    save_with_metadata(proto, path, meta)
    tmp.unlink(missing_ok=True)
    if check:
        check_export(model, path, imgsz, score_bias)
    logger.info("exported path=%s imgsz=%d bytes=%d", path, imgsz, path.stat().st_size)
    return path


def torch_export(
    wrapper: torch.nn.Module,
    dummy: torch.Tensor,
    path: Path,
    *,
    inputs: list[str],
    outputs: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    """``torch.onnx.export`` at :data:`OPSET`, constants folded, with the TorchScript
    exporter (``dynamo=False``, chosen on purpose: it handles dynamic axes reliably)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.onnx")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(
            wrapper,
            (dummy,),
            str(path),
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
            dynamo=False,
        )


def save_with_metadata(proto: onnx.ModelProto, path: Path, meta: dict[str, str]) -> None:
    """Replace the metadata of ``proto`` by ``meta``, check the graph and save it."""
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def check_export(model: QRDet, path: Path, imgsz: int, score_bias: float = 0.0) -> float:
    """Run ORT and torch on the same batch of 2; raise unless they agree. Returns max diff."""
    import onnxruntime as ort

    x = torch.rand(2, 3, imgsz, imgsz, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ExportWrapper(copy.deepcopy(model).eval(), score_bias).eval()(x).numpy()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = sess.run(["output0"], {"images": x.numpy()})[0]
    if out.shape != ref.shape:
        raise ExportCheckError(f"{path}: ORT shape {out.shape} != torch {ref.shape}")
    if not np.allclose(out, ref, rtol=1e-3, atol=1e-2):
        diff = float(np.abs(out - ref).max())
        raise ExportCheckError(f"{path}: ORT and torch differ (max abs diff {diff:.4g})")
    return float(np.abs(out - ref).max())
