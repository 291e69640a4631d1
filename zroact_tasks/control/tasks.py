"""Control-queue tasks: thin wrappers; the work is in ingest.py, report.py and jobstate.py."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict

from celery.exceptions import ChordError

from .. import pipeline, resources
from ..app import app
from ..config import get_settings
from ..errors import InputError, JobNotFoundError, ModelError
from ..media import clips, streams
from ..models import JobError, JobSpec, VideoInfo
from ..redisconn import TRANSIENT_ERRORS
from ..stage1 import registry
from . import deadlines  # noqa: F401  (connects the deadline sweeper to control workers)
from .ingest import Plan, ingest_chunk, keyframes_total, plan
from .report import build_report, stage1_slot_error
from .stream import Lease, StreamRun, read_stream

log = logging.getLogger(__name__)

MODEL_WAIT_POLL_S = 2.0
"""How often a job's first ingest step looks again for the Stage 1 model (``registry``)."""


def check_clip_length(model: registry.ModelInfo, spec: JobSpec) -> None:
    """ModelError when the job's clips are not the length the queue's Stage 1 model takes."""
    if model.clip_length != spec.clip_length:
        raise ModelError(model.name, f"the job asks for {spec.clip_length}-frame clips, "
                                     f"the Stage 1 model takes {model.clip_length}")


def one_line(exc: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def record_group(job_id: str, slot: int, record: dict, keyframes: list[int]) -> None:
    """Record a slot's end and free its keyframes (only its Stage 2 read them); whoever records
    the last slot enqueues the report."""
    jobs = resources.jobs()
    closed = jobs.record_group(job_id, slot, record, keyframes) == 2
    resources.frames().free(job_id, full=keyframes)
    if closed:
        pipeline.send_finalize(app, job_id)
        return
    meta = jobs.meta(job_id)  # a slot ended: ingest held back by slots waiting for Stage 2 resumes
    if "spec" in meta and "chunks_end" not in meta and "abort" not in meta:
        spec = JobSpec.model_validate_json(meta["spec"])
        if not spec.stream:  # a stream's reader paces itself
            send_next_chunks(spec, meta)


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
    """A slot's Stage 1 is over: free the frames only its clips read, let the job's next slot
    into the window and, if the lead has room, send the next ingest chunks."""
    meta = meta if meta is not None else resources.jobs().meta(job_id)
    spec = JobSpec.model_validate_json(meta["spec"])
    used = {f for k in keyframes for f in clips.clip_frames(k, spec.clip_length, spec.sampling_rate)}
    resources.frames().free(job_id, ended_slot=slot, stage1={
        f: clips.slots_using(f, spec.slot_size, spec.keyframe_stride, spec.clip_length,
                             spec.sampling_rate) for f in used})
    if "abort" in meta:
        return
    pump(spec, meta.get("stage2") == "true", json.loads(meta["frame_size"]),
         release={"slot": slot, "keyframes": keyframes})
    if "chunks_end" not in meta and not spec.stream:  # a stream's reader paces itself
        send_next_chunks(spec, meta)


def send_next_chunks(spec: JobSpec, meta: dict | None = None) -> list[int]:
    jobs = resources.jobs()
    meta = meta if meta is not None else jobs.meta(spec.job_id)
    if "plan" not in meta:
        return []  # chunk 0 has not planned the job yet: it sends the next chunks itself
    job_plan = Plan(**json.loads(meta["plan"]))
    per = job_plan.chunk_slots
    span = per * spec.slot_size * spec.keyframe_stride  # a chunk's own frames
    hint = -(-job_plan.declared_frames // span) if job_plan.declared_frames > 0 else 0
    chunks = jobs.next_chunks(spec.job_id, per, get_settings().ingest_lead_chunks, hint)
    for chunk in chunks:
        pipeline.send_ingest(app, spec.model_dump(mode="json"), chunk)
    return chunks


def finish_ingest(spec: JobSpec, meta: dict) -> None:
    """Every chunk up to the video's end is stored: publish the totals (once they are known the
    last slot to end enqueues the report)."""
    jobs = resources.jobs()
    job_plan = Plan(**json.loads(meta["plan"]))
    end_chunk, end_frame = int(meta["chunks_end"]), int(meta["frames_end"])
    total = keyframes_total(end_chunk, end_frame, spec, job_plan)
    slots = clips.job_slots(total, spec.slot_size, spec.keyframe_stride)
    frames = max(end_frame, total * spec.keyframe_stride)
    warnings = []
    if job_plan.declared_frames and frames < job_plan.declared_frames and "abort" not in meta:
        warnings.append(f"decoded {frames} of {job_plan.declared_frames} frames")
    info = VideoInfo(frames=frames, fps=job_plan.fps, width=job_plan.width, height=job_plan.height)
    stage2 = meta.get("stage2") == "true"
    jobs.update(spec.job_id, video=info.model_dump_json(), warnings=json.dumps(warnings),
                keyframes_total=str(total),
                slots_total=str(sum(len(s) == spec.slot_size for s in slots) if stage2 else 0))
    if jobs.set_groups_total(spec.job_id, len(slots)):
        pipeline.send_finalize(app, spec.job_id)


@app.task(name=pipeline.INGEST, bind=True)
def ingest_video(self, spec_data: dict, chunk: int = 0) -> dict:
    """One ingest step: decode chunk ``chunk``, store its frames, offer its slots. Chunk 0 first
    checks the video and admits the job (or puts it in line: a job that ends wakes it)."""
    spec, settings, jobs = JobSpec.model_validate(spec_data), get_settings(), resources.jobs()
    job_id, store = spec.job_id, resources.frames()
    if jobs.cancel_requested(job_id) or jobs.barrier_closed(job_id):
        return {"job_id": job_id, "skipped": "job already stopped"}
    if spec.stream:  # (a re-sent first step of a stream job): its reader does the work
        pipeline.send_stream(app, spec.model_dump(mode="json"))
        return {"job_id": job_id, "stream": True}
    model = registry.current(jobs.r) if chunk == 0 else None
    if chunk == 0 and model is None:
        # Frames are stored at the model's input size, which only Stage 1 workers know: wait
        # for the first one to publish it (a new message each time: off the poison count).
        log.info("job %s waits for a Stage 1 worker to publish its model", job_id)
        raise self.retry(countdown=MODEL_WAIT_POLL_S, max_retries=None)
    try:
        jobs.check_delivery(self.delivery_key, settings.max_task_deliveries)
        if chunk == 0:
            stage2 = settings.vlm_url is not None
            check_clip_length(model, spec)
            job_plan = plan(spec, settings, model.input_size)
            jobs.update(job_id, plan=json.dumps(asdict(job_plan)), stage2=str(stage2).lower(),
                        frame_size=json.dumps([job_plan.width, job_plan.height]))
            footprint = job_plan.footprint(spec, settings, stage2)
            if settings.frame_budget_bytes and not store.admit(
                    job_id, footprint, settings.frame_budget_bytes, priority=spec.priority,
                    submitted_at=spec.submitted_at):
                jobs.forgive_delivery(self.delivery_key)  # woken later: a new delivery
                log.info("job %s waits for admission (footprint %d B)", job_id, footprint)
                return {"job_id": job_id, "waiting": True}
            jobs.r.hsetnx(f"zroact:job:{job_id}", "ingest_started", str(time.time()))
            jobs.update(job_id, state="running", footprint=str(footprint))
            jobs.touch(job_id)  # the wait for admission is not a stall
        meta = jobs.meta(job_id)
        job_plan, stage2 = Plan(**json.loads(meta["plan"])), meta.get("stage2") == "true"
        frame_size = [job_plan.width, job_plan.height]
        result = ingest_chunk(
            spec, job_plan, chunk, settings, store, skip=jobs.offered(job_id), stage2=stage2,
            send_slot=lambda j, kfs: pump(spec, stage2, frame_size,
                                          offer={"slot": j, "keyframes": kfs}),
            should_stop=lambda: jobs.cancel_requested(job_id))
    except TRANSIENT_ERRORS:
        raise  # not the video's fault: the task is requeued (app.TransientTask) and resumes
    except InputError as exc:
        log.info("job %s: bad input: %s", job_id, exc)
        fail_job(job_id, exc, input_error=True)
        return {"job_id": job_id, "error": str(exc)}
    except Exception as exc:  # any other failure must still end the job with a report
        log.exception("job %s: ingest of chunk %d failed", job_id, chunk)
        fail_job(job_id, exc)
        return {"job_id": job_id, "error": one_line(exc)}
    if result.stopped:
        return {"job_id": job_id, "chunk": chunk, "stopped": True}
    _, end, _ = jobs.chunk_done(job_id, chunk, result.keyframes, result.end_frame)
    jobs.r.hincrbyfloat(f"zroact:job:{job_id}", "ingest_s", result.seconds)
    if end >= 0 and jobs.chunks_stored(job_id) >= set(range(end + 1)):
        finish_ingest(spec, jobs.meta(job_id))
    else:
        send_next_chunks(spec, meta)
    return {"job_id": job_id, "chunk": chunk, "keyframes": result.keyframes}


def forget_results(task_ids: list[str]) -> None:
    """Delete stored task results once read: a long job would otherwise keep one per clip for
    the whole result TTL (what it keeps is in its own records)."""
    if task_ids:
        app.backend.client.delete(*[app.backend.get_key_for_task(t) for t in task_ids])


# Bookkeeping steps store no result: nothing reads one (``finalize``'s is what clients wait on).
@app.task(name=pipeline.SLOT_READY, ignore_result=True)
def slot_ready(header: list[list[dict]], job_id: str, slot: int, keyframes: list[int],
               judge: bool) -> dict:
    """Chord body: a slot's Stage 1 is done; enqueue its Stage 2 request (or close the slot),
    then let the job's next slot into the window. Stage 2 goes first: it is the latency users
    wait on, and the window still holds other slots for Stage 1."""
    jobs = resources.jobs()
    meta = jobs.meta(job_id)  # one read: spec, abort flag, Stage 2 switch, frame size
    # What is recorded wins over this chord's own results: a duplicate run of the slot (its
    # frames already freed) returns errors where the first run recorded detections.
    recorded = jobs.keyframe_records(job_id, keyframes)
    results = [recorded.get(r["keyframe"], r) for batch in header for r in batch]
    failed = [r for r in results if r.get("error")]
    sent = False
    if failed:
        record_group(job_id, slot, {"error": stage1_slot_error(failed[0])}, keyframes)
    elif judge and "abort" not in meta:
        detections = {str(r["keyframe"]): r["detections"] for r in results}
        priority = JobSpec.model_validate_json(meta["spec"]).priority
        pipeline.send_judge(app, job_id, slot, keyframes, detections, priority)
        sent = True
    else:
        record_group(job_id, slot, {"stage2": False}, keyframes)
    release_slot(job_id, slot, keyframes, meta)
    forget_results([pipeline.detect_id(job_id, batch[0]["keyframe"]) for batch in header if batch])
    return {"slot": slot, "stage2": sent}


def failure_of(task_id: str) -> BaseException | None:
    """The exception a task stored, or None if it did not fail (a stored result, not a wait)."""
    result = app.AsyncResult(task_id)
    return result.result if result.state == "FAILURE" else None


@app.task(name=pipeline.SLOT_FAILED, ignore_result=True)
def slot_failed(failed_task_id: str, job_id: str, slot: int, keyframes: list[int]) -> None:
    """Error callback of a slot's chord: record why, so the job still reaches its report.

    Only a real failure is recorded: a header task's, else the failed task's. An error path that
    runs for a slot whose tasks all succeeded (seen once a Redis restart replayed a chord's join)
    records nothing, nor does a join that failed on Redis (``ChordError: Join error:
    network:ConnectionError``, seen with Redis killed on a loaded machine): the slot's body goes
    on, or the reconciler sends it again."""
    jobs = resources.jobs()
    if jobs.group_done(job_id, slot):
        return
    header = [pipeline.detect_id(job_id, b[0])
              for b in pipeline.batches(keyframes, get_settings().stage1_batch)]
    exc = next((e for e in map(failure_of, header) if e is not None), None)
    if exc is None:
        exc = failure_of(failed_task_id)
        if isinstance(exc, ChordError):  # the join, not a task, failed: nothing to record
            log.warning("job %s slot %d: chord join failed (%s); left to the reconciler",
                        job_id, slot, one_line(exc))
            return
    if exc is None:
        log.warning("job %s slot %d: error callback, but no task of the slot failed", job_id, slot)
        return
    log.warning("job %s slot %d failed: %s", job_id, slot, exc)
    release_slot(job_id, slot, keyframes)
    record_group(job_id, slot, {"error": f"slot failed: {type(exc).__name__}: {one_line(exc)}"},
                 keyframes)


def wake_waiting() -> list[str]:
    """Start the jobs waiting for admission that now fit, in line order."""
    budget = get_settings().frame_budget_bytes
    woken = resources.frames().wake(budget) if budget else []
    for job_id in woken:
        try:
            spec = resources.jobs().spec(job_id)
        except JobNotFoundError:
            continue  # expired meanwhile: the reconciler drops its admission
        pipeline.send_ingest(app, spec.model_dump(mode="json"), 0)
        log.info("job %s admitted", job_id)
    return woken


@app.task(name=pipeline.FINALIZE)
def finalize(job_id: str) -> dict:
    """Build the report once, keep it in Redis with an expiry, delete the job's frames."""
    jobs = resources.jobs()
    existing = jobs.report_json(job_id)
    if existing is not None:  # redelivered: the report was already built
        return json.loads(existing)
    # Frames first: once the report is saved the job no longer counts in the frame budget.
    resources.frames().delete(job_id)
    wake_waiting()
    report = build_report(job_id, jobs.meta(job_id), jobs.keyframes(job_id), jobs.groups(job_id),
                          keep_slots=get_settings().stream_keep_slots)
    if not jobs.save_report(job_id, report.model_dump_json(), report.status):
        return json.loads(jobs.report_json(job_id))  # a concurrent finalize saved first
    log.info("job %s %s in %.2f s", job_id, report.status, report.timings.get("total", 0))
    return report.model_dump(mode="json")


@app.task(name=pipeline.STREAM, bind=True)
def ingest_stream(self, spec_data: dict) -> dict:
    """A live source's reader (control/stream.py): one at a time per job (a lease), until the
    user stops the job, the source ends, or STREAM_MAX_S."""
    spec, settings, jobs = JobSpec.model_validate(spec_data), get_settings(), resources.jobs()
    job_id, store = spec.job_id, resources.frames()
    if jobs.cancel_requested(job_id) or jobs.barrier_closed(job_id):
        return {"job_id": job_id, "skipped": "job already stopped"}
    lease = Lease(jobs, job_id)
    if not lease.acquire():
        return {"job_id": job_id, "skipped": "another reader holds the stream"}
    try:
        model = registry.current(jobs.r)
        if model is None:  # (the lease is released on the way out, below)
            log.info("job %s waits for a Stage 1 worker to publish its model", job_id)
            raise self.retry(countdown=MODEL_WAIT_POLL_S, max_retries=None)
        try:
            streams.check_allowed(spec.video, settings.stream_sources)  # this worker's own list
            check_clip_length(model, spec)
            stage2 = settings.vlm_url is not None
            meta = jobs.meta(job_id)
            jobs.r.hsetnx(f"zroact:job:{job_id}", "ingest_started", str(time.time()))
            jobs.update(job_id, state="running", stage2=str(stage2).lower())
            frame_size: list[int] = []

            def opened(run: StreamRun) -> None:
                frame_size[:] = [run.width, run.height]
                info = VideoInfo(frames=0, fps=run.fps, width=run.width, height=run.height)
                jobs.update(job_id, frame_size=json.dumps(frame_size), video=info.model_dump_json(),
                            plan=json.dumps({"fps": run.fps, "stream": True}))

            run = read_stream(
                spec, settings, jobs, store, model.input_size, stage2=stage2, lease=lease,
                send_slot=lambda j, kfs: pump(spec, stage2, frame_size,
                                              offer={"slot": j, "keyframes": kfs}),
                should_stop=lambda: jobs.cancel_requested(job_id),
                first_slot=int(meta.get("stream_next_slot", 0)), on_open=opened)
        except TRANSIENT_ERRORS:
            raise
        except InputError as exc:
            log.info("job %s: bad source: %s", job_id, exc)
            fail_job(job_id, exc, input_error=True)
            return {"job_id": job_id, "error": str(exc)}
        except Exception as exc:  # any other failure must still end the job with a report
            log.exception("job %s: stream reader failed", job_id)
            fail_job(job_id, exc)
            return {"job_id": job_id, "error": one_line(exc)}
    finally:
        lease.release()
    if run.ended != "lost":  # a lost lease: another reader goes on (the reconciler sends it)
        jobs.update(job_id, stream_ended=run.ended)
    if run.ended in ("ended", "limit"):
        finish_stream(spec, run)
    return {"job_id": job_id, "ended": run.ended, "frames": run.frames, "sent": len(run.sent),
            "dropped": len(run.dropped), "reconnects": run.reconnects}


def finish_stream(spec: JobSpec, run: StreamRun) -> None:
    """The source is gone (or the limit reached): slots it ended within are recorded as such,
    then the totals close the job once every slot sent has ended."""
    jobs, job_id = resources.jobs(), spec.job_id
    for slot in run.pending:
        record_group(job_id, slot, {"error": "the stream ended before this slot's last keyframe"},
                     clips.slot_keyframes(slot, spec.slot_size, spec.keyframe_stride))
    info = VideoInfo(frames=run.frames, fps=run.fps, width=run.width, height=run.height)
    slots = run.next_slot
    jobs.update(job_id, video=info.model_dump_json(), keyframes_total=str(slots * spec.slot_size),
                slots_total=str(len(run.sent)))
    if jobs.set_groups_total(job_id, slots):
        pipeline.send_finalize(app, job_id)

