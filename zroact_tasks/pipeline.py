"""The canvas: ingest -> one chord per slot (Stage 1 header, body enqueues Stage 2) -> report.

Each slot (group of ``slot_size`` keyframes) is its own chord, so slots never wait for each
other and a failing slot cannot stop the others. Every group, whatever happens to it, ends in
``JobStore.record_group``; the call that records the last one enqueues ``finalize`` (see
jobstate.py). Task ids are derived from the job id, so a job's tasks can be revoked by id and
the client can wait on ``{job}:finalize``.
"""

from __future__ import annotations

from celery import Celery, chord, group

INGEST = "zroact.control.ingest"
STREAM = "zroact.control.ingest_stream"
"""A live source's reader: one long task per stream job (no time limit; a lease keeps it single)."""
SLOT_READY = "zroact.control.slot_ready"
SLOT_FAILED = "zroact.control.slot_failed"
FINALIZE = "zroact.control.finalize"
DETECT = "zroact.stage1.detect_clips"
JUDGE = "zroact.stage2.judge_slot"
CONTROL_STEPS = (SLOT_READY, SLOT_FAILED, FINALIZE)
"""The short bookkeeping tasks of the control queue (ingest apart)."""


def ingest_id(job_id: str, chunk: int = 0) -> str:
    return f"{job_id}:ingest" if chunk == 0 else f"{job_id}:ingest:{chunk}"


def detect_id(job_id: str, first_keyframe: int) -> str:
    return f"{job_id}:s1:{first_keyframe}"


def slot_ready_id(job_id: str, slot: int) -> str:
    return f"{job_id}:slot:{slot}"


def slot_failed_id(job_id: str, slot: int) -> str:
    return f"{job_id}:slotfail:{slot}"


def judge_id(job_id: str, slot: int) -> str:
    return f"{job_id}:s2:{slot}"


def finalize_id(job_id: str) -> str:
    return f"{job_id}:finalize"


def batches(keyframes: list[int], size: int) -> list[list[int]]:
    return [keyframes[i : i + size] for i in range(0, len(keyframes), size)]


BOOKKEEPING_PRIORITY = 0
"""Control steps between the stages go first: they are short and unblock GPU work."""


def send_slot(app: Celery, job_id: str, slot: int, keyframes: list[int], *, params: dict,
              judge: bool, batch: int, priority: int) -> None:
    """Send slot ``slot``'s chord: Stage 1 over its clips, then ``slot_ready``."""
    header = group([
        app.signature(DETECT, args=(job_id, kfs, params), task_id=detect_id(job_id, kfs[0]),
                      priority=priority)
        for kfs in batches(keyframes, batch)  # a list, not a generator: see CELERY-NOTES
    ])
    body = app.signature(SLOT_READY, args=(job_id, slot, keyframes, judge),
                         task_id=slot_ready_id(job_id, slot), priority=BOOKKEEPING_PRIORITY)
    # Old-style errback (first argument: the failed task's id), so Celery sends it as a task to
    # the control queue instead of running it inside the worker that saw the failure.
    # A fixed id, as every task of a job has: the reconciler tells a job's tasks by their ids.
    body.on_error(app.signature(SLOT_FAILED, args=(job_id, slot, keyframes),
                                task_id=slot_failed_id(job_id, slot),
                                priority=BOOKKEEPING_PRIORITY))
    chord(header, body).apply_async()


def send_judge(app: Celery, job_id: str, slot: int, keyframes: list[int],
               detections: dict[str, list], priority: int) -> None:
    app.send_task(JUDGE, args=(job_id, slot, keyframes, detections), task_id=judge_id(job_id, slot),
                  priority=priority)


def send_ingest(app: Celery, spec: dict, chunk: int = 0) -> None:
    """Send one ingest step: chunk ``chunk`` of the job (chunk 0 also plans and admits it)."""
    app.send_task(INGEST, args=(spec, chunk), task_id=ingest_id(spec["job_id"], chunk),
                  priority=spec.get("priority"))


def send_stream(app: Celery, spec: dict) -> None:
    """Send (or send again: a lost reader) a stream job's reader."""
    app.send_task(STREAM, args=(spec,), priority=spec.get("priority"))


def send_finalize(app: Celery, job_id: str) -> None:
    app.send_task(FINALIZE, args=(job_id,), task_id=finalize_id(job_id),
                  priority=BOOKKEEPING_PRIORITY)


def job_task_ids(job_id: str, keyframes: list[int], slot_size: int, batch: int,
                 chunks: int = 1) -> list[str]:
    """Every task id a job can have, for revoking them all."""
    ids = [ingest_id(job_id, c) for c in range(max(1, chunks))]
    for slot, kfs in enumerate(batches(keyframes, slot_size)):
        ids += slot_task_ids(job_id, slot, kfs, batch)
    return ids


def slot_task_ids(job_id: str, slot: int, keyframes: list[int], batch: int) -> list[str]:
    """The task ids of one slot: its Stage 1 batches, its chord body, its Stage 2 request."""
    return ([detect_id(job_id, b[0]) for b in batches(keyframes, batch)]
            + [slot_ready_id(job_id, slot), judge_id(job_id, slot)])
