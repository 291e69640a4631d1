"""Ingest: decode a video once, store the frames Stage 1 and Stage 2 read, send each slot's chord.

Slots are sent while decoding goes on: slot j leaves as soon as its last keyframe is decoded and
stored, so Stage 1 of a long video starts within a few frames of the beginning.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2

from ..config import Settings
from ..errors import VideoDecodeError, VideoTooShortError
from ..media import clips, video
from ..media.store import FrameStore
from ..models import JobSpec, VideoInfo

FLUSH_EVERY = 32
"""Frames buffered before one pipelined write to the store (bounds ingest memory)."""

JPEG_BYTES_PER_PIXEL = 0.25
"""A generous estimate of a q95 JPEG's size (measured: ~0.04-0.12 bytes a pixel on our videos),
so that admitting an ingest by its estimate keeps the frame budget."""


def estimate_frame_bytes(probe: video.Probe, spec: JobSpec, settings: Settings) -> int:
    """Bytes an ingest of this video will hold in the store, from what the container declares."""
    frames = probe.declared_frames or settings.max_frames
    side = settings.stage1_frame_size
    stage1 = (side * side if side else probe.width * probe.height) * 3 * JPEG_BYTES_PER_PIXEL
    keyframe = probe.width * probe.height * 3 * JPEG_BYTES_PER_PIXEL
    return int(frames * stage1 + frames // spec.keyframe_stride * keyframe)

SendSlot = Callable[[int, list[int]], None]


@dataclass
class IngestResult:
    video: VideoInfo
    keyframes: list[int]
    slots: list[list[int]]
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


class _Buffer:
    """Encoded frames waiting for one pipelined write per kind."""

    def __init__(self, store: FrameStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id
        self.frames: dict[str, dict[int, bytes]] = {"stage1": {}, "full": {}}
        self.job_ended = False  # the store refused a write: the job has ended meanwhile

    def add(self, kind: str, index: int, data: bytes) -> None:
        self.frames[kind][index] = data
        if len(self.frames["stage1"]) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        for kind, frames in self.frames.items():
            if self.store.put_many(self.job_id, frames, kind) < 0:
                self.job_ended = True
        self.frames = {"stage1": {}, "full": {}}


def stage1_copy(frame, size: int):
    """The frame as Stage 1 will read it: resized to the model's input, as preprocessing would."""
    if size <= 0:
        return frame
    return cv2.resize(frame, (size, size), interpolation=cv2.INTER_LINEAR)


def ingest(spec: JobSpec, settings: Settings, store: FrameStore, send_slot: SendSlot,
           should_stop: Callable[[], bool] = lambda: False,
           on_probe: Callable[[video.Probe], None] = lambda probe: None) -> IngestResult:
    """Decode ``spec.video``, store needed frames, call ``send_slot(j, keyframes)`` per slot.

    Raises an InputError subclass when the video cannot be used; in that case no slot has been
    sent unless the video broke a limit mid-way (the caller then aborts the job).
    """
    started = time.perf_counter()
    path = video.resolve_video_path(spec.video, settings.media_root)
    info = video.probe(path, max_pixels=settings.max_pixels, max_frames=settings.max_frames,
                       max_duration_s=settings.max_duration_s)
    on_probe(info)
    stride, size = spec.keyframe_stride, spec.slot_size
    buffer = _Buffer(store, spec.job_id)
    stop = lambda: buffer.job_ended or should_stop()  # noqa: E731
    keyframes: list[int] = []
    pending: list[int] = []  # keyframes of the slot being filled
    slots: list[list[int]] = []
    decoded = 0
    for index, frame in video.decode(path, settings.max_frames):
        decoded = index + 1
        if index % FLUSH_EVERY == 0 and stop():
            break
        quality = settings.frame_jpeg_quality
        if clips.is_needed(index, stride, spec.clip_length, spec.sampling_rate):
            small = stage1_copy(frame, settings.stage1_frame_size)
            buffer.add("stage1", index, video.encode_jpeg(small, quality))
        if not clips.is_keyframe(index, stride):
            continue
        buffer.add("full", index, video.encode_jpeg(frame, quality))  # what Stage 2 sends
        keyframes.append(index)
        pending.append(index)
        if len(pending) == size:
            buffer.flush()  # a slot leaves only once every frame of its clips is stored
            if stop():
                break
            send_slot(len(slots), pending)
            slots.append(pending)
            pending = []
    buffer.flush()
    if decoded == 0:
        raise VideoDecodeError(str(spec.video), "no frame could be decoded")
    if not keyframes:
        raise VideoTooShortError(
            str(spec.video), f"{decoded} frames is shorter than one keyframe stride ({stride})")
    if pending and not stop():
        send_slot(len(slots), pending)  # trailing partial slot: Stage 1 only
        slots.append(pending)
    warnings = []
    if info.declared_frames and decoded < info.declared_frames:
        warnings.append(f"decoded {decoded} of {info.declared_frames} frames")
    return IngestResult(
        video=VideoInfo(frames=decoded, fps=info.fps, width=info.width, height=info.height),
        keyframes=keyframes, slots=slots, warnings=warnings,
        seconds=time.perf_counter() - started,
    )
