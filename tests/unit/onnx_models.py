"""Tiny ONNX detector graphs for tests, shaped like Ultralytics exports.

Input ``images`` ``[batch, 3, imgsz, imgsz]`` float32 (dynamic batch unless ``batch=1``),
output ``output0``; metadata ``names``/``imgsz``/``stride``/``task``/``description``/
``version`` written the way Ultralytics writes them (Python literals as strings).

- :func:`make_fixed_output_model`: emits a constant tensor (your golden numbers),
  broadcast to the batch, whatever the image.
- :func:`make_dark_cell_model`: a YOLOv8-layout "detector" whose output depends on the
  image: one box per ``cell`` x ``cell`` grid cell of the letterboxed input, with score
  = how dark the cell is (1 - mean of RGB). A black square on white gives one
  detection per covered cell, so pipeline tests see real, image-dependent boxes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # old enough for any onnxruntime >= 1.14


def ultralytics_metadata(
    names: Mapping[int, str] | None,
    imgsz: int,
    *,
    stride: int = 32,
    batch: int = 1,
    description: str = "qrsight test model",
    version: str = "0.0-test",
) -> dict[str, str]:
    """Metadata as Ultralytics writes it (``str()`` of Python values)."""
    meta = {
        "description": description,
        "author": "qrsight tests",
        "version": version,
        "task": "detect",
        "batch": str(batch),
        "stride": str(stride),
        "imgsz": str([imgsz, imgsz]),
    }
    if names is not None:
        meta["names"] = str(dict(names))
    return meta


def _batch_shape_nodes(prefix: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """Nodes computing ``[B, 1, 1]`` from the input's batch dimension."""
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), f"{prefix}_start"),
        numpy_helper.from_array(np.array([1], np.int64), f"{prefix}_end"),
        numpy_helper.from_array(np.array([1, 1], np.int64), f"{prefix}_ones"),
    ]
    nodes = [
        helper.make_node("Shape", ["images"], [f"{prefix}_shape"]),
        helper.make_node(
            "Slice", [f"{prefix}_shape", f"{prefix}_start", f"{prefix}_end"], [f"{prefix}_b"]
        ),
        helper.make_node("Concat", [f"{prefix}_b", f"{prefix}_ones"], [f"{prefix}_b11"], axis=0),
    ]
    return nodes, inits, f"{prefix}_b11"


def _save(
    path: str | Path,
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    *,
    out_dims: tuple[int, int],
    imgsz: int,
    batch: int | None,
    metadata: Mapping[str, str],
) -> Path:
    b: int | str = batch if batch is not None else "batch"
    graph = helper.make_graph(
        nodes,
        "qrsight_test",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [b, 3, imgsz, imgsz])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [b, *out_dims])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _check_layout(out: np.ndarray, layout: str, nc: int | None) -> None:
    d1, d2 = out.shape
    ok = {
        "yolov8": nc is None or d1 == 4 + nc,
        "yolov5": nc is None or d2 == 5 + nc,
        "end2end": d2 == 6,
    }
    if layout not in ok:
        raise ValueError(f"layout must be one of {sorted(ok)}, got {layout!r}")
    if not ok[layout]:
        raise ValueError(f"output shape {out.shape} does not fit layout {layout} with nc={nc}")


def make_fixed_output_model(
    path: str | Path,
    output: np.ndarray,
    layout: str,
    imgsz: int = 640,
    names: Mapping[int, str] | None = None,
    *,
    batch: int | None = None,
    stride: int = 32,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """A model whose ``output0`` is ``output`` (shape ``(d1, d2)`` or ``(1, d1, d2)``)
    repeated for every image of the batch.

    ``layout`` (``yolov5`` | ``yolov8`` | ``end2end``) is checked against the shape and
    ``names`` (default ``{0: "qr"}``; pass ``{}`` to write no ``names``). ``batch=1``
    makes the batch dimension fixed; ``metadata`` entries replace/extend the defaults
    (a value of ``""`` removes the key).
    """
    names = {0: "qr"} if names is None else names
    out = np.asarray(output, np.float32)
    out = out[0] if out.ndim == 3 else out
    _check_layout(out, layout, len(names) or None)
    nodes, inits, b11 = _batch_shape_nodes("bs")
    inits.append(numpy_helper.from_array(out[None], "fixed_output"))
    nodes.append(helper.make_node("Expand", ["fixed_output", b11], ["output0"]))
    meta = ultralytics_metadata(names or None, imgsz, stride=stride, batch=batch or 1)
    meta.update(metadata or {})
    meta = {k: v for k, v in meta.items() if v != ""}
    return _save(path, nodes, inits, out_dims=out.shape, imgsz=imgsz, batch=batch, metadata=meta)


def dark_cell_boxes(imgsz: int, cell: int) -> np.ndarray:
    """The ``(4, g*g)`` cx, cy, w, h of the grid cells, row-major (as the model emits)."""
    g = imgsz // cell
    centres = (np.arange(g, dtype=np.float32) + 0.5) * cell
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    size = np.full(g * g, cell, np.float32)
    return np.stack([cx.ravel(), cy.ravel(), size, size])


def make_dark_cell_model(
    path: str | Path,
    imgsz: int = 640,
    cell: int = 32,
    names: Mapping[int, str] | None = None,
    *,
    batch: int | None = None,
) -> Path:
    """A YOLOv8-layout ``[B, 5, (imgsz/cell)²]`` model scoring each cell by darkness."""
    if imgsz % cell:
        raise ValueError("imgsz must be a multiple of cell")
    names = {0: "qr"} if names is None else names
    if len(names) != 1:
        raise ValueError("the dark-cell model has exactly one class")
    n = (imgsz // cell) ** 2
    nodes, inits, b11 = _batch_shape_nodes("bs")
    inits += [
        numpy_helper.from_array(dark_cell_boxes(imgsz, cell)[None], "cell_boxes"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array([-1, 1, n], np.int64), "score_shape"),
    ]
    nodes += [
        helper.make_node("ReduceMean", ["images"], ["gray"], axes=[1], keepdims=1),
        helper.make_node(
            "AveragePool", ["gray"], ["pooled"], kernel_shape=[cell, cell], strides=[cell, cell]
        ),
        helper.make_node("Sub", ["one", "pooled"], ["darkness"]),
        helper.make_node("Reshape", ["darkness", "score_shape"], ["scores"]),
        helper.make_node("Expand", ["cell_boxes", b11], ["boxes"]),
        helper.make_node("Concat", ["boxes", "scores"], ["output0"], axis=1),
    ]
    meta = ultralytics_metadata(names, imgsz, batch=batch or 1, description="dark-cell test model")
    return _save(path, nodes, inits, out_dims=(5, n), imgsz=imgsz, batch=batch, metadata=meta)


def make_single_image_model(path: str | Path, imgsz: int = 640) -> Path:
    """An end-to-end model that declares a dynamic batch but fails at run time on a batch
    of more than one image (its output is reshaped to a fixed ``[1, 300, 6]``): for tests
    of what happens when ONNX Runtime raises."""
    nodes, inits, b11 = _batch_shape_nodes("bs")
    inits += [
        numpy_helper.from_array(np.zeros((1, 300, 6), np.float32), "rows"),
        numpy_helper.from_array(np.array([1, 300, 6], np.int64), "one_image"),
    ]
    nodes += [
        helper.make_node("Expand", ["rows", b11], ["per_image"]),
        helper.make_node("Reshape", ["per_image", "one_image"], ["output0"]),
    ]
    meta = ultralytics_metadata({0: "qr"}, imgsz, description="fails on batches > 1")
    return _save(path, nodes, inits, out_dims=(300, 6), imgsz=imgsz, batch=None, metadata=meta)


def with_metadata(path: Path, out: Path, **changes: str | None) -> Path:
    """A copy of the verifier at ``path`` with metadata entries changed (None = removed)."""
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(out))
    return out
