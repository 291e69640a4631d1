"""Ingest in chunks: each step decodes a span of slots (plus the clip history they need), stores
the frames Stage 1 and Stage 2 read, and offers those slots to the job's window.

Chunk 0 plans the job (probe, measured frame sizes, admission); every chunk then decodes on its
own, so several control workers can decode one seekable video at once, and a lost worker costs
one chunk. Chunks are paced by ``JobStore.next_chunks``: decoding stays a bounded lead ahead of
Stage 1, so the frames a job holds do not grow with the video's length.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from ..config import Settings
from ..errors import VideoDecodeError, VideoTooShortError
from ..media import clips, video
from ..media.store import FrameStore
from ..models import JobSpec, VideoInfo
from ..stage1.yowo import model_frame

FLUSH_EVERY = 32
"""Frames buffered before one pipelined write to the store (bounds a chunk's memory)."""

FOOTPRINT_MARGIN = 1.5
"""Frames of one video vary in JPEG size; the footprint allows for half as much again as the
frames sampled at planning."""

SendSlot = Callable[[int, list[int]], None]


@dataclass(frozen=True)
class Plan:
    """What chunk 0 learns about the video once; every chunk reads it from the job's record."""

    path: str
    fps: float
    width: int
    height: int
    declared_frames: int
    seekable: bool
    input_size: tuple[int, int]
    """(width, height) of the Stage 1 model's input: the size Stage 1 frames are stored at."""
    stage1_bytes: int
    """Bytes of one stored Stage 1 frame (the largest of the frames sampled)."""
    full_bytes: int
    """Bytes of one stored full-resolution keyframe (what Stage 2 sends)."""
    chunk_slots: int
    """Slots per chunk, fixed per job (control workers' settings may differ)."""

    def footprint(self, spec: JobSpec, settings: Settings, stage2: bool) -> int:
        """Bytes of frames the job holds at most: the chunks decoding runs ahead by, one more
        being decoded, and the clip history reaching back before them; with Stage 2, the
        keyframes of as many slots again past Stage 1 and waiting for their verdicts
        (``JobStore.next_chunks``)."""
        per_slot_frames = len({f for k in clips.slot_keyframes(2, spec.slot_size, spec.keyframe_stride)
                               for f in clips.clip_frames(k, spec.clip_length, spec.sampling_rate)})
        keyframes = stage2 * spec.slot_size * self.full_bytes
        slots = (settings.ingest_lead_chunks + 1) * self.chunk_slots + 1
        judged = stage2 * settings.ingest_lead_chunks * self.chunk_slots
        return int(FOOTPRINT_MARGIN * (slots * (per_slot_frames * self.stage1_bytes + keyframes)
                                       + judged * keyframes))


@dataclass
class ChunkResult:
    slots: list[tuple[int, list[int]]] = field(default_factory=list)
    """(slot, keyframes) offered by this chunk, in order."""
    keyframes: int = 0
    end_frame: int | None = None
    """Frames in the video, if this chunk found its end (decoding stopped before the span's end)."""
    stopped: bool = False
    """The job ended or was cancelled while the chunk decoded: nothing was offered."""
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


class _Encoder:
    """Resizes and encodes frames on a few threads while the decoder reads on: the frames in
    flight are bounded (twice the threads), and each lands in the buffer in decode order."""

    def __init__(self, buffer: _Buffer, threads: int) -> None:
        self.buffer, self.limit = buffer, 2 * threads
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="ingest-encode")
        self.pending: deque[tuple[str, int, Future[bytes]]] = deque()

    def submit(self, kind: str, index: int, encode: Callable[..., bytes], *args) -> None:
        self.pending.append((kind, index, self.pool.submit(encode, *args)))
        while len(self.pending) > self.limit:
            self._land()

    def _land(self) -> None:
        kind, index, future = self.pending.popleft()
        self.buffer.add(kind, index, future.result())

    def drain(self) -> None:
        """Every frame submitted so far is in the buffer."""
        while self.pending:
            self._land()

    def __enter__(self) -> _Encoder:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        try:
            if exc_type is None:
                self.drain()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def stage1_frame(frame, input_size: tuple[int, int]) -> bytes:
    """The frame as Stage 1 reads it: resized as YOWOv3 does (``model_frame``), stored lossless
    so that Stage 1's input is YOWOv3's to the bit (a JPEG copy moves pixels by up to ~100)."""
    return video.encode_lossless(model_frame(frame, *input_size))


def plan(spec: JobSpec, settings: Settings, input_size: tuple[int, int]) -> Plan:
    """Check the video (InputError subclasses) and measure what its frames cost to store;
    ``input_size`` is the Stage 1 model's (what its workers publish: stage1/registry.py)."""
    path = video.resolve_video_path(spec.video, settings.media_root)
    info = video.probe(path, max_pixels=settings.max_pixels, max_frames=settings.max_frames,
                       max_duration_s=settings.max_duration_s)
    samples = [0] + ([info.declared_frames // 2] if info.seekable else [])
    small, full = 0, 0
    for start in samples:
        for _, frame in video.decode_span(path, start, start, seek=info.seekable,
                                          max_frames=settings.max_frames):
            q = settings.frame_jpeg_quality
            small = max(small, len(stage1_frame(frame, input_size)))
            full = max(full, len(video.encode_jpeg(frame, q)))
        if not small:
            raise VideoDecodeError(str(spec.video), "no frame could be decoded")
    return Plan(str(path), info.fps, info.width, info.height, info.declared_frames,
                info.seekable, tuple(input_size), small, full, settings.ingest_chunk_slots)


def ingest_chunk(spec: JobSpec, job_plan: Plan, chunk: int, settings: Settings,
                 store: FrameStore, send_slot: SendSlot, *, skip: set[int] = frozenset(),
                 stage2: bool = True, should_stop: Callable[[], bool] = lambda: False) -> ChunkResult:
    """Decode chunk ``chunk``, store what its slots need, call ``send_slot(j, keyframes)``.

    Each slot is sent as soon as the frames its clips and keyframes read are stored (decoding
    goes on behind it): a job's first clip starts after one slot's frames, not a chunk's.
    Slots in ``skip`` (offered by an earlier run of this chunk) are neither stored nor sent
    again. Raises VideoTooShortError when chunk 0 finds fewer frames than one keyframe stride.
    """
    started = time.perf_counter()
    stride, size, per = spec.keyframe_stride, spec.slot_size, job_plan.chunk_slots
    first_slot = chunk * per
    first, last = clips.chunk_frames(first_slot, per, size, stride, spec.clip_length,
                                     spec.sampling_rate)
    wanted = {j: clips.slot_keyframes(j, size, stride) for j in range(first_slot, first_slot + per)
              if j not in skip}
    complete_at = {max(kfs): j for j, kfs in wanted.items()}  # its last keyframe: its last frame
    keyframes = {k for kfs in wanted.values() for k in kfs}
    stage1 = {f for k in keyframes for f in clips.clip_frames(k, spec.clip_length, spec.sampling_rate)}
    buffer, quality = _Buffer(store, spec.job_id), settings.frame_jpeg_quality
    result = ChunkResult()

    def offer(j: int, kfs: list[int]) -> None:
        send_slot(j, kfs)
        result.slots.append((j, kfs))
        result.keyframes += len(kfs)
        del wanted[j]

    decoded_to = first  # frames 0 .. decoded_to - 1 exist
    with _Encoder(buffer, settings.ingest_encode_threads) as encoder:
        for index, frame in video.decode_span(job_plan.path, first, last, seek=job_plan.seekable,
                                              max_frames=settings.max_frames):
            decoded_to = index + 1
            if index % FLUSH_EVERY == 0 and (buffer.job_ended or should_stop()):
                result.stopped = True
                break
            if index in stage1:
                encoder.submit("stage1", index, stage1_frame, frame, job_plan.input_size)
            if stage2 and index in keyframes:
                encoder.submit("full", index, video.encode_jpeg, frame, quality)
            if index in complete_at:
                encoder.drain()
                buffer.flush()
                if buffer.job_ended:
                    result.stopped = True
                    break
                offer(complete_at[index], wanted[complete_at[index]])
    buffer.flush()
    if result.stopped or buffer.job_ended or should_stop():
        result.stopped = True
        return result
    if decoded_to <= last:
        result.end_frame = decoded_to
        if chunk == 0 and decoded_to < stride:
            raise VideoTooShortError(
                str(spec.video), f"{decoded_to} frames is shorter than one keyframe stride ({stride})")
    for j, kfs in list(wanted.items()):  # the video ended inside these slots
        kfs = [k for k in kfs if k < decoded_to]
        if kfs:
            offer(j, kfs)
    result.seconds = time.perf_counter() - started
    return result


def keyframes_total(end_chunk: int, end_frame: int, spec: JobSpec, job_plan: Plan) -> int:
    """Keyframes of the video whose first end-finding chunk is ``end_chunk``: every chunk before
    it decoded its whole span."""
    whole = end_chunk * job_plan.chunk_slots * spec.slot_size
    return max(whole, clips.keyframe_count(end_frame, spec.keyframe_stride))


@dataclass
class WholeVideo:
    plan: Plan
    frames: int
    keyframes: list[int]
    slots: list[list[int]]
    warnings: list[str]
    seconds: float

    @property
    def video(self) -> VideoInfo:
        return VideoInfo(frames=self.frames, fps=self.plan.fps, width=self.plan.width,
                         height=self.plan.height)


def ingest_whole(spec: JobSpec, settings: Settings, store: FrameStore,
                 send_slot: SendSlot, input_size: tuple[int, int] = (224, 224)) -> WholeVideo:
    """Plan and decode every chunk in this process, one after the other (what the chunk tasks
    do across workers, without pacing): for tests and benchmarks."""
    started = time.perf_counter()
    job_plan = plan(spec, settings, input_size)
    chunk, end, slots = 0, None, {}

    def send(j: int, kfs: list[int]) -> None:
        slots[j] = kfs
        send_slot(j, kfs)

    while end is None:
        end = ingest_chunk(spec, job_plan, chunk, settings, store, send).end_frame
        chunk += 1
    total = keyframes_total(chunk - 1, end, spec, job_plan)
    frames = max(end, total * spec.keyframe_stride)
    warnings = ([f"decoded {frames} of {job_plan.declared_frames} frames"]
                if job_plan.declared_frames and frames < job_plan.declared_frames else [])
    keyframes = clips.keyframe_indices(total * spec.keyframe_stride, spec.keyframe_stride)
    return WholeVideo(job_plan, frames, keyframes, [slots[j] for j in sorted(slots)], warnings,
                      time.perf_counter() - started)
