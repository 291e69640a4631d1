"""Synthetic sample media for the demo, the tests and the bench.

The sample video shows one pure-colour square moving over a dark, static, low-contrast
background.  Together with :func:`zroact_tasks.testing.onnx_models.make_yowo_model` (which
"detects" saturated red/green/blue regions) this gives end-to-end runs with a known answer:
the square's box in every frame is :func:`square_bbox`.

Run ``python -m zroact_tasks.testing.sample_media OUT_DIR`` to write ``sample.mp4``,
``model.onnx`` and ``labels.txt`` into ``OUT_DIR``; their paths are printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from zroact_tasks.testing.onnx_models import DEFAULT_LABELS, make_yowo_model, write_labels

__all__ = [
    "COLOURS_BGR",
    "SAMPLE_FRAMES",
    "SAMPLE_FPS",
    "SAMPLE_WIDTH",
    "SAMPLE_HEIGHT",
    "SAMPLE_SIDE",
    "VideoVerificationError",
    "square_position",
    "square_bbox",
    "square_box_in_input",
    "render_frame",
    "make_video",
    "count_frames",
    "make_sample",
    "make_bad_videos",
    "main",
]

COLOURS_BGR: dict[str, tuple[int, int, int]] = {
    "red": (0, 0, 255),
    "green": (0, 255, 0),
    "blue": (255, 0, 0),
}

SAMPLE_FRAMES = 419
SAMPLE_FPS = 30.0
SAMPLE_WIDTH = 320
SAMPLE_HEIGHT = 240
SAMPLE_SIDE = 40

# Square path: starts at (_START_X, _START_Y) and moves _STEP_X px right and _STEP_Y px down
# per frame, each coordinate wrapping independently inside [0, dim - side].
_START_X, _START_Y = 8, 16
_STEP_X, _STEP_Y = 3, 2


class VideoVerificationError(RuntimeError):
    """A written video did not decode back to the expected number of frames."""


def square_position(frame_index: int, width: int, height: int, side: int) -> tuple[int, int]:
    """Top-left corner ``(x1, y1)`` of the square in frame ``frame_index`` (0-based).

    Deterministic path: ``x1 = (8 + 3 * i) mod (width - side + 1)`` and
    ``y1 = (16 + 2 * i) mod (height - side + 1)``, i.e. 3 px right and 2 px down per frame,
    each axis wrapping to 0 when the square would leave the frame (the square itself is never
    cut).  Positions only repeat after ``lcm`` of both wrap periods (56 481 frames for
    320x240 with side 40), so every frame index of a sample video has a distinct position,
    and frames 15 apart are >= 30 px apart vertically unless a wrap occurred in between.
    """
    if frame_index < 0:
        raise ValueError(f"frame_index must be >= 0, got {frame_index}")
    if not (0 < side <= width and side <= height):
        raise ValueError(f"square side {side} does not fit a {width}x{height} frame")
    span_x = width - side + 1
    span_y = height - side + 1
    return (_START_X + _STEP_X * frame_index) % span_x, (_START_Y + _STEP_Y * frame_index) % span_y


def square_bbox(frame_index: int, width: int, height: int, side: int) -> tuple[int, int, int, int]:
    """``(x1, y1, x2, y2)`` of the square in frame pixels, x2/y2 exclusive (= x1 + side)."""
    x1, y1 = square_position(frame_index, width, height, side)
    return x1, y1, x1 + side, y1 + side


def square_box_in_input(
    frame_index: int,
    width: int = SAMPLE_WIDTH,
    height: int = SAMPLE_HEIGHT,
    side: int = SAMPLE_SIDE,
    size: int | Sequence[int] = 224,
) -> tuple[float, float, float, float]:
    """The square's ``(cx, cy, w, h)`` in pixels of a ``size`` model input (plain resize).

    This is what anchor 0 of the synthetic model should report for a correctly preprocessed
    clip whose keyframe is ``frame_index`` (up to ~1-2 px of resize/codec blur).
    """
    if isinstance(size, (int, np.integer)):
        in_h = in_w = int(size)
    else:
        in_h, in_w = (int(v) for v in size)
    x1, y1, x2, y2 = square_bbox(frame_index, width, height, side)
    sx, sy = in_w / width, in_h / height
    return ((x1 + x2) / 2 * sx, (y1 + y2) / 2 * sy, (x2 - x1) * sx, (y2 - y1) * sy)


def _background(width: int, height: int) -> np.ndarray:
    """Dark, static, low-contrast textured background (BGR uint8), all channels < 80.

    Smooth gradients plus a gentle low-frequency ripple: nothing saturated, nothing sharp, so
    codec artefacts cannot produce pixels that pass the model's colour-mask thresholds.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u = xx / max(width - 1, 1)
    v = yy / max(height - 1, 1)
    ripple = 4.0 * np.sin(xx / 9.0) * np.cos(yy / 11.0)
    b = 38 + 22 * u + ripple
    g = 32 + 22 * v + ripple
    r = 30 + 14 * (u + v) / 2 + ripple
    return np.clip(np.stack([b, g, r], axis=-1), 0, 255).astype(np.uint8)


def _colour_bgr(colour: str | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(colour, str):
        try:
            return COLOURS_BGR[colour.lower()]
        except KeyError:
            raise ValueError(f"unknown colour {colour!r}; use one of {sorted(COLOURS_BGR)} or a BGR tuple") from None
    b, g, r = (int(c) for c in colour)
    return b, g, r


def render_frame(
    frame_index: int,
    *,
    width: int = SAMPLE_WIDTH,
    height: int = SAMPLE_HEIGHT,
    side: int = SAMPLE_SIDE,
    colour: str | Sequence[int] = "red",
    label: bool = True,
    background: np.ndarray | None = None,
) -> np.ndarray:
    """Frame ``frame_index`` of :func:`make_video` as a BGR uint8 array (before encoding).

    With ``label=True`` the frame index is drawn small in dim grey in the bottom-left corner
    (grey never passes the model's colour masks), under the square.
    """
    frame = (_background(width, height) if background is None else background).copy()
    if label:
        cv2.putText(
            frame, f"{frame_index}", (2, height - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.3, (95, 95, 95), 1, cv2.LINE_AA
        )
    x1, y1, x2, y2 = square_bbox(frame_index, width, height, side)
    frame[y1:y2, x1:x2] = _colour_bgr(colour)
    return frame


def count_frames(path: str | Path) -> int:
    """Number of frames OpenCV actually decodes from ``path`` (reads them all; 0 if unopenable)."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            return 0
        n = 0
        while cap.grab():
            n += 1
        return n
    finally:
        cap.release()


def make_video(
    path: str | Path,
    *,
    frames: int = SAMPLE_FRAMES,
    fps: float = SAMPLE_FPS,
    width: int = SAMPLE_WIDTH,
    height: int = SAMPLE_HEIGHT,
    side: int = SAMPLE_SIDE,
    colour: str | Sequence[int] = "red",
    label: bool = True,
    fourcc: str = "mp4v",
) -> Path:
    """Write an mp4 (fourcc ``mp4v``) of a pure-colour square moving over a dark background.

    Frame ``i`` is :func:`render_frame` ``(i, ...)``: the square (``colour`` = ``"red"`` ->
    BGR (0, 0, 255), ``"green"``, ``"blue"`` or a BGR tuple) occupies
    :func:`square_bbox` ``(i, width, height, side)``.  After writing, the file is decoded with
    ``cv2.VideoCapture`` and the frames are counted; :class:`VideoVerificationError` is raised
    if the count differs from ``frames``.  Returns ``Path(path)``.
    """
    if frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    bgr = _colour_bgr(colour)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*fourcc), float(fps), (int(width), int(height)))
    if not writer.isOpened():
        raise VideoVerificationError(f"cv2.VideoWriter could not open {out} ({fourcc}, {width}x{height} @ {fps})")
    try:
        bg = _background(width, height)
        for i in range(frames):
            writer.write(
                render_frame(i, width=width, height=height, side=side, colour=bgr, label=label, background=bg)
            )
    finally:
        writer.release()
    decoded = count_frames(out)
    if decoded != frames:
        raise VideoVerificationError(f"{out}: wrote {frames} frames but OpenCV decodes {decoded}")
    return out


def make_sample(out_dir: str | Path) -> dict[str, Path]:
    """Write the standard sample set into ``out_dir``; return ``{"video", "model", "labels"}``.

    * ``sample.mp4`` -- 419 frames, 30 fps, 320x240, red square of side 40 (:func:`make_video`).
    * ``model.onnx`` -- synthetic YOWOv3 layout, dynamic batch, 224x224, 3 classes.
    * ``labels.txt`` -- ``red_action``, ``green_action``, ``blue_action``.
    """
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    return {
        "video": make_video(d / "sample.mp4"),
        "model": make_yowo_model(d / "model.onnx", num_classes=len(DEFAULT_LABELS), size=224, batch=None),
        "labels": write_labels(d / "labels.txt", DEFAULT_LABELS),
    }


def make_bad_videos(directory: str | Path) -> dict[str, Path]:
    """Write broken/edge-case videos for fault tests; return ``{kind: path}``.

    * ``"empty"``     -- ``empty.mp4``, 0 bytes: ``cv2.VideoCapture`` does not open it.
    * ``"text"``      -- ``text.mp4``, a text file: ``cv2.VideoCapture`` does not open it.
    * ``"truncated"`` -- ``truncated.mp4``, a valid 419-frame sample cut to 40 % of its bytes.
      OpenCV's mp4v writer puts the ``moov`` index atom at the END of the file, so the cut
      file has no index: ``cv2.VideoCapture`` does not open it (``isOpened()`` is False,
      0 frames decoded), exactly like the empty/text files -- it does NOT decode a prefix.
    * ``"short"``     -- ``short.mp4``, a valid 5-frame video (shorter than one stride of 10
      and than one 16-frame clip).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}

    empty = d / "empty.mp4"
    empty.write_bytes(b"")
    out["empty"] = empty

    text = d / "text.mp4"
    text.write_text("this is not a video, just text with an .mp4 suffix\n", encoding="utf-8")
    out["text"] = text

    full = make_video(d / "_full_for_truncation.mp4")
    data = full.read_bytes()
    full.unlink()
    truncated = d / "truncated.mp4"
    truncated.write_bytes(data[: int(len(data) * 0.4)])
    out["truncated"] = truncated

    out["short"] = make_video(d / "short.mp4", frames=5)

    # MJPG in AVI keeps its frame count in the header and needs no index to decode, so a cut
    # file decodes a prefix (100 frames cut to 40 % -> 36 frames here): a partial decode.
    avi = make_video(d / "_full.avi", frames=100, fourcc="MJPG")
    data = avi.read_bytes()
    avi.unlink()
    out["partial"] = d / "partial.avi"
    out["partial"].write_bytes(data[: int(len(data) * 0.4)])
    # Cut to 3 %: the header opens, but not one frame decodes.
    out["no_frames"] = d / "no_frames.avi"
    out["no_frames"].write_bytes(data[: int(len(data) * 0.03)])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zroact_tasks.testing.sample_media",
        description="Write sample.mp4, model.onnx and labels.txt into OUT_DIR and print their paths as JSON.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR")
    args = parser.parse_args(argv)
    paths = make_sample(args.out_dir)
    print(json.dumps({k: str(v.resolve()) for k, v in paths.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
