"""Small synthetic ONNX models with YOWOv3's exact input/output layout.

Real YOWOv3 weights cannot be fetched in CI, so the demo, the tests and the bench use tiny
hand-built graphs (``onnx.helper`` only, no torch) whose outputs *depend on the input* in a
known way.  A bug in the Stage 1 pre/post-processing (BGR/RGB mix-up, reversed frame order,
missing or wrong normalisation, wrong box mapping, missing NMS) therefore produces a visibly
wrong detection instead of passing silently.

Layout (identical to an exported YOWOv3):

* input  ``"input"``  ``float32 [B, 3, 16, H, W]`` -- a clip of 16 RGB frames, the keyframe
  is the LAST frame (T index 15), each frame ImageNet-normalised
  (``(x/255 - mean) / std``, mean ``(0.485, 0.456, 0.406)``, std ``(0.229, 0.224, 0.225)``).
* output ``"output"`` ``float32 [B, 4 + C, A]`` -- rows 0-3 are the box centre x, centre y,
  width, height in pixels of the ``H x W`` model input; rows ``4 .. 4+C-1`` are per-class
  scores already in 0..1 (sigmoid, multi-label).  ``A = sum((H/s) * (W/s) for s in (8, 16,
  32))`` -- 1029 for 224x224.

See :func:`make_yowo_model` for exactly what the synthetic graph computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CLIP_LEN",
    "KEYFRAME_INDEX",
    "STRIDES",
    "DEFAULT_LABELS",
    "COLOUR_THRESHOLD_HIGH",
    "COLOUR_THRESHOLD_LOW",
    "ANCHOR_RED",
    "ANCHOR_GREEN",
    "ANCHOR_BLUE",
    "ANCHOR_RED_FIRST_FRAME",
    "ANCHOR_RED_DUPLICATE",
    "FIRST_FRAME_SCORE_FACTOR",
    "DUPLICATE_SCORE_FACTOR",
    "DUPLICATE_X_SHIFT",
    "num_anchors",
    "make_yowo_model",
    "write_labels",
    "make_bad_models",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CLIP_LEN = 16
KEYFRAME_INDEX = CLIP_LEN - 1  # keyframe is the LAST frame of the clip
STRIDES: tuple[int, int, int] = (8, 16, 32)
DEFAULT_LABELS: tuple[str, str, str] = ("red_action", "green_action", "blue_action")

# A pixel (un-normalised, RGB in 0..1) belongs to the mask of colour c when channel c is above
# HIGH and both other channels are below LOW.
COLOUR_THRESHOLD_HIGH = 0.6
COLOUR_THRESHOLD_LOW = 0.4

# Anchor indices carrying signal (all other anchors are all-zero).
ANCHOR_RED = 0  # red mask on the keyframe (T=15), class 0
ANCHOR_GREEN = 1  # green mask on the keyframe, class 1
ANCHOR_BLUE = 2  # blue mask on the keyframe, class 2
ANCHOR_RED_FIRST_FRAME = 3  # red mask on the FIRST frame (T=0), class 0, score x 0.5
ANCHOR_RED_DUPLICATE = 4  # anchor 0's box shifted +2 px in x, class 0, score x 0.95
FIRST_FRAME_SCORE_FACTOR = 0.5
DUPLICATE_SCORE_FACTOR = 0.95
DUPLICATE_X_SHIFT = 2.0

_BIG = 1.0e6


def num_anchors(height: int, width: int | None = None) -> int:
    """Number of anchors ``A`` YOWOv3 emits for an ``height x width`` input (strides 8/16/32).

    >>> num_anchors(224)
    1029
    """
    if width is None:
        width = height
    return sum((height // s) * (width // s) for s in STRIDES)


def _check_size(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        h, w = (int(v) for v in size)
    for v in (h, w):
        if v <= 0 or v % STRIDES[-1]:
            raise ValueError(f"model input size must be a positive multiple of {STRIDES[-1]}, got {size!r}")
    return h, w


class _Graph:
    """Tiny helper accumulating nodes/initializers with unique names."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, value, hint: str = "c", dtype=np.float32) -> str:
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name=name))
        return name

    def op(self, op_type: str, *inputs: str, hint: str | None = None, **attrs) -> str:
        out = self._name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    # Reductions changed signature across opsets (axes attribute -> axes input):
    # ReduceSum at opset 13, ReduceMax/ReduceMin/ReduceMean at opset 18.
    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: int = 0) -> str:
        switch = 13 if op_type == "ReduceSum" else 18
        if self.opset >= switch:
            return self.op(op_type, x, self.const(list(axes), "axes", np.int64), keepdims=keepdims)
        return self.op(op_type, x, axes=list(axes), keepdims=keepdims)

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        if self.opset >= 13:
            return self.op("Unsqueeze", x, self.const(list(axes), "axes", np.int64))
        return self.op("Unsqueeze", x, axes=list(axes))


def _unnormalised_frame(g: _Graph, x: str, t: int) -> tuple[str, str, str]:
    """Gather frame ``t`` of the clip, undo ImageNet normalisation, return (R, G, B) [B,H,W]."""
    frame = g.op("Gather", x, g.const(t, "t", np.int64), axis=2, hint=f"frame{t}")  # [B,3,H,W]
    std = g.const(np.array(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1), "std")
    mean = g.const(np.array(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1), "mean")
    rgb = g.op("Add", g.op("Mul", frame, std), mean, hint=f"rgb{t}")
    return tuple(  # type: ignore[return-value]
        g.op("Gather", rgb, g.const(c, "ch", np.int64), axis=1, hint=f"rgb{t}_{c}") for c in range(3)
    )


def _colour_detection(
    g: _Graph, channels: tuple[str, str, str], colour: int, xs: str, ys: str
) -> tuple[list[str], str, str]:
    """Mask of ``colour`` (0=R,1=G,2=B) -> ([cx, cy, w, h] each [B], score [B], nonempty [B])."""
    hi = g.const(COLOUR_THRESHOLD_HIGH, "hi")
    lo = g.const(COLOUR_THRESHOLD_LOW, "lo")
    conds = []
    for c in range(3):
        conds.append(g.op("Greater", channels[c], hi) if c == colour else g.op("Less", channels[c], lo))
    mask_b = g.op("And", g.op("And", conds[0], conds[1]), conds[2])
    mask = g.op("Cast", mask_b, to=TensorProto.FLOAT, hint="mask")  # [B,H,W]

    count = g.reduce("ReduceSum", mask, [1, 2])  # [B]
    nonempty = g.op("Cast", g.op("Greater", count, g.const(0.0)), to=TensorProto.FLOAT, hint="nonempty")
    safe_count = g.op("Max", count, g.const(1.0))
    inside_sum = g.reduce("ReduceSum", g.op("Mul", mask, channels[colour]), [1, 2])
    score = g.op("Mul", g.op("Div", inside_sum, safe_count), nonempty, hint="score")

    one = g.const(1.0)
    big = g.const(_BIG)
    inv_mask_big = g.op("Mul", g.op("Sub", one, mask), big)  # BIG outside the mask

    def extent(grid: str) -> tuple[str, str]:
        # Pixel i covers [i, i+1): left/top edge = min index, right/bottom edge = max index + 1.
        hi_edge = g.reduce("ReduceMax", g.op("Mul", mask, g.op("Add", grid, one)), [1, 2])
        lo_idx = g.reduce("ReduceMin", g.op("Add", g.op("Mul", mask, grid), inv_mask_big), [1, 2])
        lo_edge = g.op("Mul", lo_idx, nonempty)  # BIG -> 0 for an empty mask
        return lo_edge, hi_edge

    x1, x2 = extent(xs)
    y1, y2 = extent(ys)
    half = g.const(0.5)
    cx = g.op("Mul", g.op("Add", x1, x2), half, hint="cx")
    cy = g.op("Mul", g.op("Add", y1, y2), half, hint="cy")
    w = g.op("Sub", x2, x1, hint="w")
    h = g.op("Sub", y2, y1, hint="h")
    return [cx, cy, w, h], score, nonempty


def make_yowo_model(
    path: str | Path,
    *,
    num_classes: int = 3,
    size: int | Sequence[int] = 224,
    batch: int | None = None,
    opset: int = 17,
) -> Path:
    """Write a small YOWOv3-layout ONNX model whose output depends on the input; return its path.

    Input ``"input"``: ``float32 [batch or "B", 3, 16, H, W]`` (``size`` is ``H = W`` or an
    ``(H, W)`` pair, multiples of 32), ImageNet-normalised RGB, keyframe = T index 15 (last).
    Output ``"output"``: ``float32 [batch or "B", 4 + num_classes, A]`` with
    ``A = num_anchors(H, W)`` (1029 for 224).  ``batch=None`` makes the batch dimension
    dynamic (symbolic ``"B"``); an int fixes it (onnxruntime then rejects any other batch).

    What the graph computes, per batch item:

    1. Frames are un-normalised back to 0..1 RGB inside the graph (``x * std + mean``).
    2. Colour masks (on un-normalised values, so missing/wrong normalisation breaks them):
       red = ``R > 0.6 and G < 0.4 and B < 0.4``; green = ``G > 0.6 and R < 0.4 and B < 0.4``;
       blue = ``B > 0.6 and R < 0.4 and G < 0.4``.
    3. A mask's box is its bounding box in model-input pixels, pixel ``i`` covering
       ``[i, i+1)``: ``cx = (x_min + x_max + 1) / 2``, ``w = x_max + 1 - x_min`` (same for y).
       A mask's score is the mean of its own channel over the mask pixels (~1.0 for a pure
       colour square).  An empty mask gives an all-zero box and score 0.
    4. Anchors (columns of the output); every other anchor is all zeros:

       ===  ==========================================  =====  ======================
       A    box                                         class  score
       ===  ==========================================  =====  ======================
       0    red mask of the keyframe (T=15)             0      red score
       1    green mask of the keyframe                  1      green score
       2    blue mask of the keyframe                   2      blue score
       3    red mask of the FIRST frame (T=0)           0      its red score x 0.5
       4    anchor 0's box with cx + 2 px               0      anchor 0 score x 0.95
       ===  ==========================================  =====  ======================

       Each anchor's score sits only in its own class row; all other class rows are 0, and
       classes >= 3 are always 0.  If ``num_classes < 3`` the anchors of the missing colour
       classes keep their box but have no score row (i.e. score 0 everywhere).

    Consequences the tests rely on:

    * a correctly preprocessed clip of a pure red square -> anchor 0 = the square's box (in
      input pixels), class 0 score ~1.0; anchor 4 is a near duplicate (IoU > 0.5 for any
      box wider than ~4 px) that per-class NMS at IoU 0.5 must suppress; anchor 3 is the
      square 15 frames earlier with half the score.
    * BGR fed as RGB -> the red square looks blue: class 0 ~0, anchor 2 / class 2 high.
    * frame order reversed within the clip -> anchor 0 shows the oldest frame's square and
      anchor 3 the keyframe's (scores swap between the two).
    * no ImageNet normalisation (only /255) or no /255 -> no mask pixels -> all scores 0.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be None (dynamic) or >= 1, got {batch}")
    if opset < 11:
        raise ValueError(f"opset must be >= 11, got {opset}")
    height, width = _check_size(size)
    n_anchors = num_anchors(height, width)
    rows = 4 + num_classes
    bdim: int | str = batch if batch is not None else "B"

    g = _Graph(opset)
    xs = g.const(np.arange(width, dtype=np.float32).reshape(1, 1, width), "xs")
    ys = g.const(np.arange(height, dtype=np.float32).reshape(1, height, 1), "ys")

    key = _unnormalised_frame(g, "input", KEYFRAME_INDEX)
    first = _unnormalised_frame(g, "input", 0)

    # (box[4], class index, score) for anchors 0..4
    anchors: list[tuple[list[str], int, str]] = []
    red_box, red_score, red_nonempty = _colour_detection(g, key, 0, xs, ys)
    anchors.append((red_box, 0, red_score))
    for colour in (1, 2):
        box, score, _ = _colour_detection(g, key, colour, xs, ys)
        anchors.append((box, colour, score))
    f_box, f_score, _ = _colour_detection(g, first, 0, xs, ys)
    anchors.append((f_box, 0, g.op("Mul", f_score, g.const(FIRST_FRAME_SCORE_FACTOR))))
    shift = g.op("Mul", red_nonempty, g.const(DUPLICATE_X_SHIFT))
    dup_box = [g.op("Add", red_box[0], shift), red_box[1], red_box[2], red_box[3]]
    anchors.append((dup_box, 0, g.op("Mul", red_score, g.const(DUPLICATE_SCORE_FACTOR))))

    columns = []
    for box, cls, score in anchors:
        zero = g.op("Mul", score, g.const(0.0), hint="zero")  # [B] zeros, batch-shaped
        values = list(box) + [score if c == cls else zero for c in range(num_classes)]
        col = g.op("Concat", *(g.unsqueeze(v, [1]) for v in values), axis=1)  # [B, rows]
        columns.append(g.unsqueeze(col, [2]))  # [B, rows, 1]
    signal = g.op("Concat", *columns, axis=2, hint="signal")  # [B, rows, 5]
    pads = g.const([0, 0, 0, 0, 0, n_anchors - len(columns)], "pads", np.int64)
    g.nodes.append(helper.make_node("Pad", [signal, pads], ["output"], mode="constant"))

    graph = helper.make_graph(
        g.nodes,
        "zroact_synthetic_yowov3",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [bdim, 3, CLIP_LEN, height, width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [bdim, rows, n_anchors])],
        initializer=g.inits,
    )
    return _save(graph, path, opset, doc="synthetic YOWOv3-layout colour-square detector (zroact tests)")


def _save(graph: onnx.GraphProto, path: str | Path, opset: int, doc: str = "") -> Path:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="zroact_tasks.testing",
        doc_string=doc,
    )
    # Use the lowest IR version the opset needs (onnx's default is its newest IR, which older
    # onnxruntime builds refuse to load).
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    onnx.checker.check_model(model, full_check=True)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return out


def write_labels(path: str | Path, names: Sequence[str] = DEFAULT_LABELS) -> Path:
    """Write one class name per line (class index = line number, 0-based); return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    return out


def make_bad_models(directory: str | Path, *, num_classes: int = 3, size: int = 224) -> dict[str, Path]:
    """Write models that a correct Stage 1 loader must reject; return ``{kind: path}``.

    * ``"not_onnx"``      -- a text file named ``not_onnx.onnx`` (fails to load at all).
    * ``"wrong_input"``   -- valid, runnable ONNX; input ``[B, 3, H, W]`` (no T axis), output
      correct ``[B, 4+C, A]``.
    * ``"wrong_output"``  -- valid, runnable ONNX; correct input ``[B, 3, 16, H, W]``, output
      rank 2 ``[B, 4+C]``.
    * ``"wrong_anchors"`` -- valid, runnable ONNX; correct input, output rank 3 but with the
      wrong anchor count ``[B, 4+C, A-1]`` (caught only if the loader checks A against H, W).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rows = 4 + num_classes
    n_anchors = num_anchors(size)
    out: dict[str, Path] = {}

    p = d / "not_onnx.onnx"
    p.write_text("this is not an ONNX model, just text with an .onnx suffix\n", encoding="utf-8")
    out["not_onnx"] = p

    # Each bad model is runnable: output = per-channel mean of the input ([B, 3]) tiled up to
    # `rows` rows, optionally padded along a third (anchor) axis.
    def build(name: str, in_shape: list, out_shape: list, reduce_axes: list[int], pad_to: int | None):
        g = _Graph(17)
        y = g.reduce("ReduceMean", "input", reduce_axes, keepdims=0)  # [B, 3]
        reps = -(-rows // 3)
        y = g.op("Tile", y, g.const([1, reps], "reps", np.int64))  # [B, 3*reps]
        y = g.op(
            "Slice", y, g.const([0], "st", np.int64), g.const([rows], "en", np.int64), g.const([1], "ax", np.int64)
        )  # [B, rows]
        if pad_to is not None:
            y = g.unsqueeze(y, [2])
            pads = g.const([0, 0, 0, 0, 0, pad_to - 1], "pads", np.int64)
            g.nodes.append(helper.make_node("Pad", [y, pads], ["output"], mode="constant"))
        else:
            g.nodes.append(helper.make_node("Identity", [y], ["output"]))
        graph = helper.make_graph(
            g.nodes,
            f"zroact_bad_{name}",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)],
            initializer=g.inits,
        )
        return _save(graph, d / f"{name}.onnx", 17, doc=f"deliberately bad model: {name}")

    out["wrong_input"] = build(
        "wrong_input", ["B", 3, size, size], ["B", rows, n_anchors], [2, 3], n_anchors
    )
    out["wrong_output"] = build(
        "wrong_output", ["B", 3, CLIP_LEN, size, size], ["B", rows], [2, 3, 4], None
    )
    out["wrong_anchors"] = build(
        "wrong_anchors", ["B", 3, CLIP_LEN, size, size], ["B", rows, n_anchors - 1], [2, 3, 4], n_anchors - 1
    )
    return out
