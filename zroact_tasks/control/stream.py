"""A live source as a job: one reader per stream, storing frames and offering slots as they pass.

The reader runs as one long task (``pipeline.STREAM``) that holds a lease in Redis, so a
redelivered or re-sent reader finds it held and leaves. A reader that dies stops renewing it; the
reconciler then sends another, which goes on at the next slot (the frames a dead reader was
holding are gone with the live moment they showed). Slots go through the same window as a file's
(``pump``); when Stage 1 and 2 fall behind the live edge, new slots are dropped (recorded as such)
rather than queued, so memory and latency stay bounded. Records older than ``STREAM_KEEP_SLOTS``
slots are deleted as the stream goes on: a stream that runs for days keeps a rolling window.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2

from ..config import Settings
from ..errors import StreamError
from ..jobstate import JobStore
from ..liveness import BOOT_ID
from ..media import clips, streams, video
from ..media.store import FrameStore
from ..models import JobSpec
from ..stage1.yowo import model_frame
from ..urls import masked

log = logging.getLogger(__name__)

LEASE_S = 15.0
"""A reader renews its lease every frame; one silent for this long (a source read times out
after 5 s) is taken for dead."""
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)
"""Waits between attempts to reopen a dropped source (the last one repeats)."""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def lease_key(job_id: str) -> str:
    return f"zroact:job:{job_id}:reader"


class Lease:
    """The one-reader-per-stream lock: SET NX with an expiry, renewed by its holder only."""

    def __init__(self, jobs: JobStore, job_id: str, holder: str = BOOT_ID) -> None:
        self.r, self.key, self.holder = jobs.r, lease_key(job_id), holder
        self._renew, self._release = self.r.register_script(_RENEW), self.r.register_script(_RELEASE)

    def acquire(self) -> bool:
        return bool(self.r.set(self.key, self.holder, nx=True, px=int(LEASE_S * 1000)))

    def renew(self) -> bool:
        return bool(self._renew(keys=[self.key], args=[self.holder, int(LEASE_S * 1000)]))

    def release(self) -> None:
        self._release(keys=[self.key], args=[self.holder])


def reader_alive(jobs: JobStore, job_id: str) -> bool:
    return bool(jobs.r.exists(lease_key(job_id)))


@dataclass
class StreamRun:
    frames: int = 0
    """Frame index the stream reached (frames numbered from the job's start, outages skipped)."""
    width: int = 0
    height: int = 0
    fps: float = 30.0
    sent: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    next_slot: int = 0
    """Slots decided (sent, dropped or pending): the job's slot count once the stream ended."""
    pending: list[int] = field(default_factory=list)
    """Slots taken but never sent: the stream ended within them."""
    reconnects: int = 0
    ended: str = ""
    """Why it stopped: "stopped" (the user), "lost" (the lease), "ended" (the source is gone),
    "limit" (STREAM_MAX_S)."""


class _Slots:
    """Which slots the reader takes, from the frame index: each is decided when its first clip
    frame arrives (taken while the backlog has room, else dropped)."""

    def __init__(self, spec: JobSpec, first_slot: int) -> None:
        self.spec, self.next_slot, self.taken = spec, first_slot, set()
        self.span = (spec.clip_length - 1) * spec.sampling_rate

    def keyframes(self, slot: int) -> list[int]:
        return clips.slot_keyframes(slot, self.spec.slot_size, self.spec.keyframe_stride)

    def first_frame(self, slot: int) -> int:
        return max(0, self.keyframes(slot)[0] - self.span)

    def due(self, index: int) -> list[int]:
        """Slots whose first clip frame is ``index`` (or passed it): to be decided now."""
        out = []
        while self.first_frame(self.next_slot) <= index:
            out.append(self.next_slot)
            self.next_slot += 1
        return out

    def needed(self, index: int) -> bool:
        lo, hi = clips.slots_using(index, self.spec.slot_size, self.spec.keyframe_stride,
                                   self.spec.clip_length, self.spec.sampling_rate)
        return any(j in self.taken for j in range(lo, hi + 1)) and clips.is_needed(
            index, self.spec.keyframe_stride, self.spec.clip_length, self.spec.sampling_rate)


def read_stream(spec: JobSpec, settings: Settings, jobs: JobStore, store: FrameStore,
                input_size: tuple[int, int], send_slot: Callable[[int, list[int]], None],
                *, stage2: bool, lease: Lease, should_stop: Callable[[], bool],
                first_slot: int = 0, on_open: Callable[[StreamRun], None] = lambda run: None
                ) -> StreamRun:
    """Read the source until the user stops it, it ends, or the limit; store what the taken
    slots read and send each one as its last keyframe is stored."""
    job_id, run, slots = spec.job_id, StreamRun(), _Slots(spec, first_slot)
    run.frames = slots.first_frame(first_slot)
    started, quality = time.monotonic(), settings.frame_jpeg_quality
    last_keyframe: dict[int, int] = {}  # a taken slot's last keyframe -> the slot
    attempt, opened_once, down_since = 0, False, None
    while not run.ended:
        try:
            cap = streams.open_stream(spec.video)
        except StreamError:
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since >= settings.stream_reconnect_s:
                if not opened_once:
                    raise  # never opened: a bad source, the job fails with the reason
                run.ended = "ended"
                break
            if _sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)], should_stop):
                run.ended = "stopped"
            attempt += 1
            continue
        if not opened_once:
            run.fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) or 30.0
            opened_once = True
        attempt, down_since = 0, None
        try:
            while True:
                if run.frames % 4 == 0 and (should_stop() or not lease.renew()):
                    run.ended = "stopped" if should_stop() else "lost"
                    break
                if time.monotonic() - started > settings.stream_max_s:
                    run.ended = "limit"
                    break
                ok, frame = cap.read()
                if not ok or frame is None:
                    break  # dropped (or the source's end): reopen with backoff
                if not run.width:
                    run.height, run.width = frame.shape[:2]
                    on_open(run)
                index = run.frames
                for slot in slots.due(index):
                    _decide(slot, slots, run, jobs, store, settings)
                    if slot in slots.taken:
                        last_keyframe[slots.keyframes(slot)[-1]] = slot
                stored: dict[str, dict[int, bytes]] = {"stage1": {}, "full": {}}
                if slots.needed(index):
                    stored["stage1"][index] = video.encode_lossless(model_frame(frame, *input_size))
                owner = index // (spec.keyframe_stride * spec.slot_size)  # the slot of a keyframe
                if stage2 and (index + 1) % spec.keyframe_stride == 0 and owner in slots.taken:
                    stored["full"][index] = video.encode_jpeg(frame, quality)
                for kind, frames in stored.items():
                    if frames and store.put_many(job_id, frames, kind) < 0:
                        run.ended = "stopped"  # the job ended meanwhile
                slot = last_keyframe.pop(index, None)
                if slot is not None:  # its frames are all stored: to Stage 1 now
                    send_slot(slot, slots.keyframes(slot))
                    run.sent.append(slot)
                    jobs.update(job_id, stream_next_slot=str(slot + 1), stream_frames=str(index + 1))
                run.frames += 1
        finally:
            cap.release()
        if run.ended:
            break
        run.reconnects += 1
        down_since = time.monotonic()
        jobs.r.hincrby(f"zroact:job:{job_id}", "stream_reconnects", 1)
        log.warning("job %s: stream %s dropped at frame %d; reopening", job_id,
                    masked(spec.video), run.frames)
    run.pending = sorted(last_keyframe.values())  # taken, but the stream ended before their end
    run.next_slot = slots.next_slot
    return run


def _sleep(seconds: float, should_stop: Callable[[], bool]) -> bool:
    """Wait, watching for a stop; True if the user stopped the job meanwhile."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if should_stop():
            return True
        time.sleep(min(0.1, max(0.0, end - time.monotonic())))
    return False


def _decide(slot: int, slots: _Slots, run: StreamRun, jobs: JobStore, store: FrameStore,
            settings: Settings) -> None:
    """Take the slot while the job's backlog has room, else record it dropped; and forget the
    slot that falls out of the rolling window."""
    job_id = slots.spec.job_id
    backlog = jobs.unfinished_slots(job_id)  # sent, not yet through Stage 1 and Stage 2
    if backlog < settings.stream_backlog_slots:
        slots.taken.add(slot)
    else:
        run.dropped.append(slot)
        jobs.r.hincrby(f"zroact:job:{job_id}", "stream_dropped", 1)
        jobs.record_group(job_id, slot, {"error": f"dropped: {backlog} slots were still in "
                                                  "Stage 1 or 2 (behind the live edge)"},
                          slots.keyframes(slot))
        store.free(job_id, ended_slot=slot)
    old = slot - settings.stream_keep_slots
    if old >= 0:
        jobs.trim_slot(job_id, old, slots.keyframes(old))
