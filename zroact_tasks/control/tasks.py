"""Control-queue tasks: thin wrappers; the work is in ingest.py, report.py and jobstate.py."""

from __future__ import annotations

import json
import logging
import time

from .. import pipeline, resources
from ..app import app
from ..config import get_settings
from ..errors import InputError
from ..models import JobError, JobSpec
from ..redisconn import TRANSIENT_ERRORS
from . import deadlines  # noqa: F401  (connects the deadline sweeper to control workers)
from .ingest import estimate_frame_bytes, ingest
from .report import build_report

log = logging.getLogger(__name__)


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def record_group(job_id: str, slot: int, record: dict) -> None:
    """Record a slot's end; whoever records the last slot enqueues the report."""
    if resources.jobs().record_group(job_id, slot, record) == 2:
        pipeline.send_finalize(app, job_id)


def fail_job(job_id: str, exc: BaseException, *, input_error: bool = False) -> None:
    """End the job as ``failed`` with ``exc`` as its reason."""
    jobs = resources.jobs()
    error = JobError(type=type(exc).__name__, message=one_line(exc), input_error=input_error)
    jobs.update(job_id, error=error.model_dump_json())
    jobs.request_abort(job_id, "failed")
    if jobs.close_barrier(job_id):
        pipeline.send_finalize(app, job_id)


def slot_params(spec: JobSpec, frame_size: list[int]) -> dict:
    return {"clip_length": spec.clip_length, "sampling_rate": spec.sampling_rate,
            "score_threshold": spec.score_threshold, "nms_iou": spec.nms_iou,
            "max_detections": spec.max_detections, "frame_size": frame_size}


def pump(spec: JobSpec, stage2: bool, frame_size: list[int], offer: dict | None = None,
         release: dict | None = None) -> None:
    """Send the job's slots its window has room for (see JobStore.pump_slots)."""
    settings = get_settings()
    params = slot_params(spec, frame_size)
    for item in resources.jobs().pump_slots(spec.job_id, settings.job_window_slots, offer, release):
        keyframes = item["keyframes"]
        pipeline.send_slot(app, spec.job_id, item["slot"], keyframes, params=params,
                           judge=stage2 and len(keyframes) == spec.slot_size,
                           batch=settings.stage1_batch, priority=spec.priority)


def release_slot(job_id: str, slot: int, keyframes: list[int], meta: dict | None = None) -> None:
    """A slot's Stage 1 is over: free its place in the window for the job's next slot."""
    meta = meta if meta is not None else resources.jobs().meta(job_id)
    if "abort" in meta:
        return
    pump(JobSpec.model_validate_json(meta["spec"]), meta.get("stage2") == "true",
         json.loads(meta["frame_size"]), release={"slot": slot, "keyframes": keyframes})


class _NoRoom(Exception):
    """The frame budget has no room for this ingest yet (backpressure)."""


@app.task(name=pipeline.INGEST, bind=True, max_retries=None)
def ingest_video(self, spec_data: dict) -> dict:
    """Decode the video, store its frames and send one chord per slot."""
    spec, settings, jobs = JobSpec.model_validate(spec_data), get_settings(), resources.jobs()
    job_id = spec.job_id
    if jobs.cancel_requested(job_id) or jobs.barrier_closed(job_id):
        return {"job_id": job_id, "skipped": "job already stopped"}
    store, admitted = resources.frames(), []
    stage2 = settings.vlm_url is not None
    jobs.update(job_id, state="running", ingest_started=str(time.time()),
                stage2="true" if stage2 else "false")
    seen = {"keyframes": 0, "slots": 0}
    frame_size: list[int] = []

    def on_probe(probe) -> None:
        frame_size[:] = [probe.width, probe.height]
        jobs.update(job_id, frame_size=json.dumps(frame_size))
        if settings.frame_budget_bytes:  # backpressure: wait outside a worker process for room
            estimate = estimate_frame_bytes(probe, spec, settings)
            if not store.admit(job_id, estimate, settings.frame_budget_bytes):
                raise _NoRoom()
            admitted.append(estimate)

    def send_slot(slot: int, keyframes: list[int]) -> None:
        pump(spec, stage2, frame_size, offer={"slot": slot, "keyframes": keyframes})
        seen["keyframes"] += len(keyframes)
        judge = stage2 and len(keyframes) == spec.slot_size
        seen["slots"] += judge
        jobs.update(job_id, keyframes_seen=str(seen["keyframes"]), slots_seen=str(seen["slots"]))

    try:
        # Counted per retry: a deferred ingest comes back as a new delivery of the same id.
        jobs.check_delivery(self.delivery_key, settings.max_task_deliveries)
        result = ingest(spec, settings, store, send_slot,
                        should_stop=lambda: jobs.cancel_requested(job_id), on_probe=on_probe)
    except _NoRoom:  # waiting for room is not a stall: the reconciler's backstop leaves it be
        jobs.update(job_id, state="queued", progress_at=str(time.time()))
        raise self.retry(countdown=settings.ingest_retry_s) from None
    except TRANSIENT_ERRORS:
        raise  # not the video's fault: the task is requeued (app.TransientTask) and resumes
    except InputError as exc:
        log.info("job %s: bad input: %s", job_id, exc)
        fail_job(job_id, exc, input_error=True)
        return {"job_id": job_id, "error": str(exc)}
    except Exception as exc:  # any other failure must still end the job with a report
        log.exception("job %s: ingest failed", job_id)
        fail_job(job_id, exc)
        return {"job_id": job_id, "error": one_line(exc)}
    finally:
        if admitted:  # the frames written are now counted as held
            store.release(job_id)
    if jobs.cancel_requested(job_id):  # stopped mid-way: frames written after finalize go too
        resources.frames().delete(job_id)
    full_slots = sum(1 for s in result.slots if len(s) == spec.slot_size)
    jobs.update(
        job_id, video=result.video.model_dump_json(), keyframes=json.dumps(result.keyframes),
        slots=json.dumps(result.slots), warnings=json.dumps(result.warnings),
        keyframes_total=str(len(result.keyframes)),
        slots_total=str(full_slots if stage2 else 0), ingest_s=str(result.seconds),
    )
    if jobs.set_groups_total(job_id, len(result.slots)):
        pipeline.send_finalize(app, job_id)
    return {"job_id": job_id, "frames": result.video.frames, "keyframes": len(result.keyframes)}


@app.task(name=pipeline.SLOT_READY)
def slot_ready(header: list[list[dict]], job_id: str, slot: int, keyframes: list[int],
               judge: bool) -> dict:
    """Chord body: a slot's Stage 1 is done; enqueue its Stage 2 request (or close the slot),
    then let the job's next slot into the window. Stage 2 goes first: it is the latency users
    wait on, and the window still holds other slots for Stage 1."""
    meta = resources.jobs().meta(job_id)  # one read: spec, abort flag, Stage 2 switch, frame size
    results = [r for batch in header for r in batch]
    failed = [r for r in results if r.get("error")]
    sent = False
    if failed:
        first = failed[0]
        record_group(job_id, slot, {"error": f"stage 1 failed on frame {first['keyframe']}: "
                                             f"{first['error']}"})
    elif judge and "abort" not in meta:
        detections = {str(r["keyframe"]): r["detections"] for r in results}
        priority = JobSpec.model_validate_json(meta["spec"]).priority
        pipeline.send_judge(app, job_id, slot, keyframes, detections, priority)
        sent = True
    else:
        record_group(job_id, slot, {"stage2": False})
    release_slot(job_id, slot, keyframes, meta)
    return {"slot": slot, "stage2": sent}


def failure_of(task_id: str) -> BaseException | None:
    """The exception a task stored, or None if it did not fail (a stored result, not a wait)."""
    result = app.AsyncResult(task_id)
    return result.result if result.state == "FAILURE" else None


@app.task(name=pipeline.SLOT_FAILED)
def slot_failed(failed_task_id: str, job_id: str, slot: int, keyframes: list[int]) -> None:
    """Error callback of a slot's chord: record why, so the job still reaches its report.

    Only a real failure is recorded: the failed task's, else a header task's. An error path that
    runs for a slot whose tasks all succeeded (seen once a Redis restart replayed a chord's join)
    records nothing: the slot's body goes on, or the reconciler sends it again."""
    jobs = resources.jobs()
    if jobs.group_done(job_id, slot):
        return
    header = [pipeline.detect_id(job_id, b[0])
              for b in pipeline.batches(keyframes, get_settings().stage1_batch)]
    exc = next((e for e in map(failure_of, [failed_task_id, *header]) if e is not None), None)
    if exc is None:
        log.warning("job %s slot %d: error callback, but no task of the slot failed", job_id, slot)
        return
    log.warning("job %s slot %d failed: %s", job_id, slot, exc)
    release_slot(job_id, slot, keyframes)
    record_group(job_id, slot, {"error": f"slot failed: {type(exc).__name__}: {one_line(exc)}"})


@app.task(name=pipeline.FINALIZE)
def finalize(job_id: str) -> dict:
    """Build the report once, keep it in Redis with an expiry, delete the job's frames."""
    jobs = resources.jobs()
    existing = jobs.report_json(job_id)
    if existing is not None:  # redelivered: the report was already built
        return json.loads(existing)
    # Frames first: once the report is saved the job no longer counts in the frame budget.
    resources.frames().delete(job_id)
    report = build_report(job_id, jobs.meta(job_id), jobs.keyframes(job_id), jobs.groups(job_id))
    if not jobs.save_report(job_id, report.model_dump_json(), report.status):
        return json.loads(jobs.report_json(job_id))  # a concurrent finalize saved first
    log.info("job %s %s in %.2f s", job_id, report.status, report.timings.get("total", 0))
    return report.model_dump(mode="json")
