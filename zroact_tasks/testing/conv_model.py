"""A small real-compute 3D-conv network in the YOWOv3 layout, for CPU benchmarks.

:func:`zroact_tasks.testing.onnx_models.make_yowo_model` is a few masks and reductions: it costs
almost nothing, so it cannot show how inference time grows with the batch. This graph does real
convolution work (~2 GFLOP a clip at 224x224, tens of ms a clip on a laptop-class CPU core) with
random He-initialised weights. Its outputs mean nothing; only the layout and the cost are real:

* input  ``"input"``  ``float32 [B, 3, 16, H, W]``
* output ``"output"`` ``float32 [B, 4 + C, A]``, A = (H/8)(W/8) + (H/16)(W/16) + (H/32)(W/32)
  (1029 at 224); rows 0-3 are non-negative boxes (cx, cy in 0..W/H, w, h in 0..W/2, H/2),
  rows 4.. are sigmoid class scores, biased low so that only a few anchors pass 0.3.

Graph::

    stem   Conv3d 3->w    k3 s(1,2,2)  ReLU     [B, w,  16, H/2, W/2]
    c3d_1  Conv3d w->2w   k3 s(2,2,2)  ReLU     [B, 2w,  8, H/4, W/4]
    c3d_2  Conv3d 2w->2w  k3 s(2,1,1)  ReLU     [B, 2w,  4, H/4, W/4]
    mean over T                                  [B, 2w, H/4, W/4]
    p3     Conv2d 2w->4w  k3 s2        ReLU     [B, 4w, H/8,  W/8]   -> head 1x1 -> 4+C
    p4     Conv2d 4w->4w  k3 s2        ReLU     [B, 4w, H/16, W/16]  -> head 1x1 -> 4+C
    p5     Conv2d 4w->4w  k3 s2        ReLU     [B, 4w, H/32, W/32]  -> head 1x1 -> 4+C
    concat the three heads (reshaped [B, 4+C, h*w]) on the last axis
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["CLASS_LOGIT_BIAS", "make_conv_yowo_model"]

CLIP_LEN = 16
STRIDES = (8, 16, 32)
OPSET = 17
CLASS_LOGIT_BIAS = -4.0
"""Added to the class logits: random weights would otherwise put half of all scores above 0.5."""


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    h, w = (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(v) for v in size)
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise ValueError(f"model input size must be a positive multiple of 32, got {size!r}")
    return h, w


def make_conv_yowo_model(path: str | Path, *, num_classes: int = 3, size: int | Sequence[int] = 224,
                         batch: int | None = None, width: int = 16, seed: int = 0) -> Path:
    """Write the network to ``path`` (dynamic batch ``"B"`` when ``batch`` is None); return it."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    h, w = _size(size)
    rng = np.random.default_rng(seed)
    rows = 4 + num_classes
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []

    def init(name: str, value: object, dtype: type = np.float32) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype), name=name))
        return name

    def conv(name: str, x: str, cin: int, cout: int, kernel: Sequence[int], strides: Sequence[int],
             relu: bool = True, bias: float = 0.0) -> str:
        fan_in = cin * int(np.prod(kernel))
        weight = rng.normal(0.0, np.sqrt(2.0 / fan_in), (cout, cin, *kernel))
        b = np.full(cout, bias) + rng.normal(0.0, 0.01, cout)
        pads = [k // 2 for k in kernel] * 2
        out = f"{name}_conv"
        nodes.append(helper.make_node(
            "Conv", [x, init(f"{name}_w", weight), init(f"{name}_b", b)], [out],
            kernel_shape=list(kernel), strides=list(strides), pads=pads, name=name))
        if not relu:
            return out
        nodes.append(helper.make_node("Relu", [out], [f"{name}_relu"], name=f"{name}_relu"))
        return f"{name}_relu"

    c1, c2, c3 = width, 2 * width, 4 * width
    x = conv("stem", "input", 3, c1, (3, 3, 3), (1, 2, 2))
    x = conv("c3d_1", x, c1, c2, (3, 3, 3), (2, 2, 2))
    x = conv("c3d_2", x, c2, c2, (3, 3, 3), (2, 1, 1))
    nodes.append(helper.make_node("ReduceMean", [x], ["tmean"], axes=[2], keepdims=0, name="tmean"))
    x = "tmean"  # [B, 2w, H/4, W/4]

    heads = []
    cin = c2
    for stride in STRIDES:
        x = conv(f"p{stride}", x, cin, c3, (3, 3), (2, 2))
        cin = c3
        head = conv(f"head{stride}", x, c3, rows, (1, 1), (1, 1), relu=False)
        flat = f"head{stride}_flat"
        shape = init(f"head{stride}_shape", [0, rows, -1], np.int64)  # 0 = keep B
        nodes.append(helper.make_node("Reshape", [head, shape], [flat], name=flat))
        heads.append(flat)
    nodes.append(helper.make_node("Concat", heads, ["raw"], axis=2, name="concat"))  # [B, rows, A]

    def rows_slice(name: str, start: int, end: int) -> str:
        args = [init(f"{name}_{k}", [v], np.int64) for k, v in (("st", start), ("en", end), ("ax", 1))]
        nodes.append(helper.make_node("Slice", ["raw", *args], [name], name=name))
        return name

    # Boxes: sigmoid -> cx, cy in 0..W/H; w, h in 0..W/2, H/2 of the model input.
    box = rows_slice("box_raw", 0, 4)
    nodes.append(helper.make_node("Sigmoid", [box], ["box_sig"], name="box_sig"))
    box_scale = init("box_scale", np.array([w, h, w / 2, h / 2], np.float32).reshape(1, 4, 1))
    nodes.append(helper.make_node("Mul", ["box_sig", box_scale], ["boxes"], name="boxes"))
    cls = rows_slice("cls_raw", 4, rows)
    cls_bias = init("cls_bias", np.array([CLASS_LOGIT_BIAS], np.float32))
    nodes.append(helper.make_node("Add", [cls, cls_bias], ["cls_logit"], name="cls_logit"))
    nodes.append(helper.make_node("Sigmoid", ["cls_logit"], ["scores"], name="scores"))
    nodes.append(helper.make_node("Concat", ["boxes", "scores"], ["output"], axis=1, name="output"))

    b = batch if batch is not None else "B"
    n_anchors = sum((h // s) * (w // s) for s in STRIDES)
    graph = helper.make_graph(
        nodes, "zroact_conv_yowo",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [b, 3, CLIP_LEN, h, w])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [b, rows, n_anchors])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="zroact.testing.conv_model")
    model.ir_version = 8  # readable by onnxruntime >= 1.10
    model.doc_string = (f"random-weight 3D-conv net in the YOWOv3 layout: {h}x{w}, "
                        f"{num_classes} classes, width {width}, seed {seed}")
    onnx.checker.check_model(model)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out
