"""A job's results as they happen: its event stream, read from Redis.

The job's records write each event in the same Lua call that records the result
(jobstate.py), so an event exists exactly when its result does: a keyframe's Stage 1 result (or
error; a later result that mends an error is a second event), a slot's end (verdict, error, or
Stage 1 only), then one ``end`` event with the job's final state. Entries are Redis Stream ids:
a reader passes the last id it saw as ``since`` and gets every later event once, across
reconnects. The stream is capped (``EVENTS_MAX``); a reader that fell further behind than that
is told how many it missed (``JobEvent.missed``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from typing import Literal

import redis
from pydantic import BaseModel

from .control.report import job_fps, keyframe_result, slot_result
from .jobstate import events_key
from .models import Keyframe, SlotResult

START = "0-0"
"""``since`` for the whole stream."""
EVENT_ID = re.compile(r"\d{1,20}-\d{1,20}")
"""What a stream entry id looks like (what ``since`` / Last-Event-ID must be)."""


class JobEvent(BaseModel):
    id: str
    """The stream entry id: pass it as ``since`` to resume after this event."""
    job_id: str
    seq: int
    """1, 2, 3, … in the order the results were recorded."""
    kind: Literal["keyframe", "slot", "end"]
    keyframes: list[int]
    """The keyframes the event is about (a slot's, or the one keyframe)."""
    keyframe: Keyframe | None = None
    """``kind == "keyframe"``: the keyframe as the report will hold it."""
    slot: SlotResult | None = None
    """``kind == "slot"``: the slot as the report will hold it."""
    status: str | None = None
    """``kind == "end"``: the job's final state (the report is ready)."""
    missed: int = 0
    """Events trimmed from the capped stream before this reader saw them."""


def to_event(job_id: str, entry_id: str, fields: dict[str, str], fps: float) -> JobEvent:
    data, kind, seq = json.loads(fields["data"]), fields["kind"], int(fields["seq"])
    if kind == "keyframe":
        index = int(data["keyframe"])
        return JobEvent(id=entry_id, job_id=job_id, seq=seq, kind=kind, keyframes=[index],
                        keyframe=keyframe_result(index, data, fps))
    if kind == "slot":
        slot = slot_result(data["slot"], data["keyframes"], data)
        return JobEvent(id=entry_id, job_id=job_id, seq=seq, kind=kind,
                        keyframes=slot.keyframes, slot=slot)
    return JobEvent(id=entry_id, job_id=job_id, seq=seq, kind="end", keyframes=[],
                    status=data.get("status"))


def read(r: redis.Redis, job_id: str, since: str = START, *, block_ms: int | None = None,
         count: int = 500, fps: float | None = None) -> list[JobEvent]:
    """Events after ``since`` (at most ``count``), waiting up to ``block_ms`` for one if none."""
    entries = _entries(r, job_id, since, block_ms, count)
    fps = (fps or fps_of(r, job_id)) if entries else 30.0
    return [to_event(job_id, entry_id, fields, fps) for entry_id, fields in entries]


def _entries(r: redis.Redis, job_id: str, since: str, block_ms: int | None,
             count: int) -> list[tuple[str, dict[str, str]]]:
    found = r.xread({events_key(job_id): since}, count=count, block=block_ms)
    return found[0][1] if found else []


def fps_of(r: redis.Redis, job_id: str) -> float:
    """The job's frame rate, for keyframe times (its plan's: set before its first event)."""
    plan, video = r.hmget(f"zroact:job:{job_id}", ["plan", "video"])
    return job_fps({k: v for k, v in (("plan", plan), ("video", video)) if v is not None})


def seq_of(r: redis.Redis, job_id: str, entry_id: str) -> int | None:
    """The sequence number of entry ``entry_id`` (None once trimmed): where a resumed reader
    was, to count what it missed."""
    if entry_id == START:
        return 0
    found = r.xrange(events_key(job_id), entry_id, entry_id)
    return int(found[0][1]["seq"]) if found else None


def follow(r: redis.Redis, job_id: str, since: str | None = None, *, last_seq: int | None = None,
           ended: Callable[[], bool] = lambda: False, poll_ms: int = 1000,
           keepalive_s: float | None = None) -> Iterator[JobEvent | None]:
    """Every event after ``since`` as it is recorded, until the job's ``end`` event (or, for a
    stream that expired or was trimmed past its end, until ``ended()`` says the job is over).
    With ``keepalive_s``, None after each such quiet spell (an SSE keep-alive comment)."""
    since = since or START
    fps: float | None = None
    quiet_since = time.monotonic()
    while True:
        entries = _entries(r, job_id, since, poll_ms, 500)
        if entries and fps is None:  # read once, with the first events (the plan exists then)
            fps = fps_of(r, job_id)
        batch = [to_event(job_id, entry_id, fields, fps) for entry_id, fields in entries]
        if not batch:
            if ended() and not _entries(r, job_id, since, None, 1):
                return
            if keepalive_s is not None and time.monotonic() - quiet_since >= keepalive_s:
                quiet_since = time.monotonic()
                yield None
            continue
        quiet_since = time.monotonic()
        for event in batch:
            if last_seq is not None and event.seq > last_seq + 1:
                event.missed = event.seq - last_seq - 1
            last_seq, since = event.seq, event.id
            yield event
            if event.kind == "end":
                return
