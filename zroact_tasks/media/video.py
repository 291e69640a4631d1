"""Opening, checking and decoding videos with OpenCV."""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import zstandard

from ..errors import (
    MediaRootError,
    VideoDecodeError,
    VideoLimitError,
    VideoNotFoundError,
)


@dataclass(frozen=True)
class Probe:
    """What the container says before decoding; ``declared_frames`` may be wrong or 0."""

    path: Path
    fps: float
    width: int
    height: int
    declared_frames: int
    seekable: bool = False
    """Whether a chunk can start decoding at its first frame (``CAP_PROP_POS_FRAMES``) instead
    of decoding its way there: files that declare a frame count and accept a seek."""


FILE_CAPTURE_OPTIONS = "protocol_whitelist;file"
"""FFmpeg options for every file zroact opens (OpenCV reads OPENCV_FFMPEG_CAPTURE_OPTIONS at
each open): an uploaded playlist or SDP file can name network URLs, and FFmpeg's own default for
a file (file, crypto, data) is wider than a file job needs — nothing in a file reaches a network."""


def open_file(path: Path) -> cv2.VideoCapture:
    """A capture of the local file ``path`` through FFmpeg, which may open no other protocol."""
    os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] = FILE_CAPTURE_OPTIONS
    return cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)


def resolve_video_path(path: str | os.PathLike, media_root: Path | None) -> Path:
    """The video's real path, checked to be a non-empty regular file under ``media_root``."""
    raw = Path(path)
    if media_root is not None:
        root = Path(media_root).resolve()
        resolved = (root / raw).resolve() if not raw.is_absolute() else raw.resolve()
        # resolve() follows symlinks and removes '..', so both kinds of escape are caught here.
        if not resolved.is_relative_to(root):
            raise MediaRootError(str(path), f"resolves outside MEDIA_ROOT {root}")
    else:
        resolved = raw.resolve()
    if not resolved.exists():
        raise VideoNotFoundError(str(path), "no such file")
    if not resolved.is_file():
        raise VideoNotFoundError(str(path), "not a regular file")
    if resolved.stat().st_size == 0:
        raise VideoDecodeError(str(path), "the file is empty")
    return resolved


def probe(path: Path, *, max_pixels: int, max_frames: int, max_duration_s: float) -> Probe:
    """Open the video and check the limits the container declares."""
    cap = open_file(path)
    try:
        if not cap.isOpened():
            raise VideoDecodeError(str(path), "OpenCV cannot open it as a video")
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        width = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
        height = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        declared = max(0, int(cap.get(cv2.CAP_PROP_FRAME_COUNT)))
        seekable = declared > 1 and bool(cap.set(cv2.CAP_PROP_POS_FRAMES, declared // 2))
    finally:
        cap.release()
    if width <= 0 or height <= 0:
        raise VideoDecodeError(str(path), "no video stream with a frame size")
    if width * height > max_pixels:
        raise VideoLimitError(str(path), f"{width}x{height} is over MAX_PIXELS {max_pixels}")
    if declared > max_frames:
        raise VideoLimitError(str(path), f"{declared} frames is over MAX_FRAMES {max_frames}")
    if fps > 0 and declared / fps > max_duration_s:
        raise VideoLimitError(
            str(path), f"{declared / fps:.1f} s is over MAX_DURATION_S {max_duration_s:g}"
        )
    return Probe(path, fps if fps > 0 else 30.0, width, height, declared, seekable)


def decode(path: Path, max_frames: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index, BGR frame) for every frame that decodes, stopping at the first failure.

    Raises VideoLimitError past ``max_frames`` (the container's count can lie).
    """
    cap = open_file(path)
    try:
        index = 0
        while True:
            ok, frame = cap.read()
            if not ok or frame is None:
                return
            if index >= max_frames:
                raise VideoLimitError(str(path), f"more than MAX_FRAMES {max_frames} frames")
            yield index, frame
            index += 1
    finally:
        cap.release()


def decode_span(path: Path, first: int, last: int, *, seek: bool,
                max_frames: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index, BGR frame) for frames ``first`` .. ``last``, stopping early at the end of
    the video (or the first frame that fails to decode).

    With ``seek``, OpenCV's FFmpeg backend seeks to the keyframe before ``first`` and decodes
    forward to it, counting frames by their timestamps: frame-exact on files with B-frames
    (tests/test_chunks.py compares it with a sequential decode). Without, frames before
    ``first`` are decoded and dropped (``grab``: no colour conversion)."""
    if first >= max_frames:
        raise VideoLimitError(str(path), f"more than MAX_FRAMES {max_frames} frames")
    cap = open_file(path)
    try:
        if not cap.isOpened():
            raise VideoDecodeError(str(path), "OpenCV cannot open it as a video")
        if first and seek:
            cap.set(cv2.CAP_PROP_POS_FRAMES, first)
        else:
            for _ in range(first):
                if not cap.grab():
                    return
        for index in range(first, last + 1):
            ok, frame = cap.read()
            if not ok or frame is None:
                return
            if index >= max_frames:
                raise VideoLimitError(str(path), f"more than MAX_FRAMES {max_frames} frames")
            yield index, frame
    finally:
        cap.release()


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV only fails here on an empty array
        raise VideoDecodeError("frame", "JPEG encoding failed")
    return buf.tobytes()


def decode_jpeg(data: bytes) -> np.ndarray:
    return decode_image(data)


RAW_MAGIC = b"ZRW1"
"""Header of a stored raw frame: magic, then height, width, channels (uint16 little-endian),
then the pixels (uint8, row-major) compressed with zstd."""
_RAW_HEADER = struct.Struct("<4sHHH")
ZSTD_LEVEL = 1
"""At 224x224, level 1 is as small as PNG level 1 (13.9 vs 13.6 KB on the sample video, 90 vs
92 KB on noisy texture) and encodes in 0.2-0.3 ms instead of 1.8-3 ms, decodes in 0.1-0.3 ms
instead of 1-1.5 ms (measured on this machine; bench/frame_path.py has the path's rates)."""
_zstd = threading.local()  # zstandard's contexts are not for concurrent use across threads


def _codec() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    if not hasattr(_zstd, "pair"):
        _zstd.pair = (zstandard.ZstdCompressor(level=ZSTD_LEVEL), zstandard.ZstdDecompressor())
    return _zstd.pair


def encode_lossless(frame: np.ndarray) -> bytes:
    """A frame stored bit-exact (Stage 1's copies at the model's input size)."""
    frame = np.ascontiguousarray(frame, np.uint8)
    height, width = frame.shape[:2]
    channels = frame.shape[2] if frame.ndim == 3 else 1
    return _RAW_HEADER.pack(RAW_MAGIC, height, width, channels) + _codec()[0].compress(frame.data)


def _decode_raw(data: bytes) -> np.ndarray:
    _, height, width, channels = _RAW_HEADER.unpack_from(data)
    size = height * width * channels
    try:
        pixels = _codec()[1].decompress(memoryview(data)[_RAW_HEADER.size:], max_output_size=size)
    except zstandard.ZstdError as exc:
        raise VideoDecodeError("frame", f"stored frame does not decompress: {exc}") from exc
    if len(pixels) != size:
        raise VideoDecodeError("frame", f"stored frame holds {len(pixels)} bytes, not {size}")
    return np.frombuffer(pixels, np.uint8).reshape(height, width, channels)


def decode_image(data: bytes) -> np.ndarray:
    """A stored frame (raw + zstd, or JPEG) as BGR."""
    if data[:4] == RAW_MAGIC:
        return _decode_raw(data)
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
