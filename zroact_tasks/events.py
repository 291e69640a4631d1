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


def job_fps(meta: dict[str, str]) -> float:
    """Frames a second, for keyframe times: from the plan (known once ingest has begun)."""
    for field in ("plan", "video"):
        if field in meta:
            return float(json.loads(meta[field]).get("fps") or 30.0)
    return 30.0


def to_event(job_id: str, entry_id: str, fields: dict[str, str], fps: float) -> JobEvent:
    data, kind, seq = json.loads(fields["data"]), fields["kind"], int(fields["seq"])
    if kind == "keyframe":
        index = int(data["keyframe"])
        keyframe = Keyframe(index=index, time_s=round(index / fps, 4),
                            detections=data.get("detections", []), error=data.get("error"))
        return JobEvent(id=entry_id, job_id=job_id, seq=seq, kind=kind, keyframes=[index],
                        keyframe=keyframe)
    if kind == "slot":
        slot = SlotResult(slot=data["slot"], keyframes=data["keyframes"],
                          verdict=data.get("verdict"), error=data.get("error"),
                          image_size=data.get("image_size"))
        return JobEvent(id=entry_id, job_id=job_id, seq=seq, kind=kind,
                        keyframes=slot.keyframes, slot=slot)
    return JobEvent(id=entry_id, job_id=job_id, seq=seq, kind="end", keyframes=[],
                    status=data.get("status"))


def read(r: redis.Redis, job_id: str, since: str = START, *, block_ms: int | None = None,
         count: int = 500, fps: float | None = None) -> list[JobEvent]:
    """Events after ``since`` (at most ``count``), waiting up to ``block_ms`` for one if none."""
    found = r.xread({events_key(job_id): since}, count=count, block=block_ms)
    if not found:
        return []
    if fps is None:
        fps = job_fps(r.hgetall(f"zroact:job:{job_id}"))
    return [to_event(job_id, entry_id, fields, fps) for entry_id, fields in found[0][1]]


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
        batch = read(r, job_id, since, block_ms=poll_ms, fps=fps)
        if not batch:
            if ended() and not read(r, job_id, since):
                return
            if keepalive_s is not None and time.monotonic() - quiet_since >= keepalive_s:
                quiet_since = time.monotonic()
                yield None
            continue
        quiet_since = time.monotonic()
        fps = fps or job_fps(r.hgetall(f"zroact:job:{job_id}"))
        for event in batch:
            if last_seq is not None and event.seq > last_seq + 1:
                event.missed = event.seq - last_seq - 1
            last_seq, since = event.seq, event.id
            yield event
            if event.kind == "end":
                return
