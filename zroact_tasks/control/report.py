"""Assemble a job's report from its records in Redis."""

from __future__ import annotations

import json
import time

from ..media import clips
from ..urls import masked
from ..models import (
    JobError,
    JobReport,
    Keyframe,
    SlotResult,
    Stage2Info,
    StreamInfo,
    VideoInfo,
)


def _span(records: list[dict]) -> float:
    starts = [r["t0"] for r in records if "t0" in r]
    ends = [r["t1"] for r in records if "t1" in r]
    return round(max(ends) - min(starts), 4) if starts and ends else 0.0


STAGE2_REASONS = {
    "skipped": "no VLM URL configured (ZROACT_VLM_URL / --vlm-url)",
    "not_run": "the job ended before any slot reached Stage 2",
    "failed": "no request to the VLM gave a verdict (each slot's error says why)",
}


def stage1_slot_error(failed: dict) -> str:
    """A slot's error from its first failed keyframe; a cancel is not a Stage 1 failure."""
    if failed["error"] == "cancelled":
        return "cancelled"
    return f"stage 1 failed on frame {failed['keyframe']}: {failed['error']}"


def _nothing_worked(keyframes: list[Keyframe], slots: list[SlotResult], stage2: bool) -> bool:
    """Every slot failed (with Stage 2), or every keyframe (without): the job produced nothing."""
    if stage2 and slots:
        return all(s.verdict is None for s in slots)
    return bool(keyframes) and all(k.error for k in keyframes)


def _stage2_status(job_status: str, switch: str | None, records: list[dict],
                   slots: list[SlotResult]) -> str:
    """``skipped`` (no VLM), ``cancelled``, ``not_run`` (the job ended before any slot reached
    Stage 2), ``failed`` (requests made, no verdict), ``stopped`` (a failed job, some verdicts),
    else ``done``. ``switch``: the job's Stage 2 flag, None if it ended before ingest set it."""
    if job_status == "cancelled":
        return "cancelled"
    if job_status == "stopped":
        return "done" if records else "not_run"
    if switch is None:
        return "not_run"
    if switch != "true":
        return "skipped"
    if not records:
        return "not_run" if job_status == "failed" else "done"
    if not any(s.verdict is not None for s in slots):
        return "failed"
    return "stopped" if job_status == "failed" else "done"


def job_fps(meta: dict[str, str]) -> float:
    """Frames a second, for keyframe times: from the plan (known once ingest has begun)."""
    for name in ("plan", "video"):
        if name in meta:
            return float(json.loads(meta[name]).get("fps") or 30.0)
    return 30.0


def keyframe_result(index: int, rec: dict | None, fps: float, missing: str | None = None) -> Keyframe:
    """A keyframe as the report (and its event) holds it; ``missing`` without a record."""
    return Keyframe(index=index, time_s=round(index / fps, 4),
                    detections=rec.get("detections", []) if rec else [],
                    error=rec.get("error") if rec else missing)


def slot_result(slot: int, keyframes: list[int], rec: dict | None,
                missing: str | None = None) -> SlotResult:
    """A slot as the report (and its event) holds it; ``missing`` without a record."""
    rec = rec or {}
    return SlotResult(slot=slot, keyframes=keyframes, verdict=rec.get("verdict"),
                      error=rec.get("error") if rec else missing, image_size=rec.get("image_size"))


def _recorded(spec: dict, meta: dict[str, str], kf_records: dict[int, dict],
              groups: dict[int, dict]) -> tuple[list[Keyframe], list[SlotResult]]:
    """The keyframes and whole slots that have records, in order (a running job's, or a
    stream's rolling window)."""
    fps = job_fps(meta)
    keyframes = [keyframe_result(k, r, fps) for k, r in sorted(kf_records.items())]
    size, total = spec["slot_size"], meta.get("keyframes_total")
    slots = []
    for j, g in sorted(groups.items()):
        kfs = clips.slot_keyframes(j, size, spec["keyframe_stride"], int(total) if total else None)
        if len(kfs) == size:  # as the final report: a trailing partial slot is Stage 1 only
            slots.append(slot_result(j, kfs, g))
    return keyframes, slots


def stream_info(spec: dict, meta: dict[str, str], keep: int) -> StreamInfo:
    return StreamInfo(source=masked(spec["video"]),
                      frames=int(meta.get("stream_frames", 0)),
                      slots=int(meta.get("groups_total") or meta.get("stream_next_slot") or 0),
                      dropped=int(meta.get("stream_dropped", 0)),
                      reconnects=int(meta.get("stream_reconnects", 0)), kept_slots=keep,
                      ended=meta.get("stream_ended") or ("stopped" if meta.get("abort") == "stopped"
                                                         else None))


def build_partial_report(job_id: str, meta: dict[str, str], kf_records: dict[int, dict],
                         groups: dict[int, dict]) -> JobReport:
    """A running job's report: what is recorded so far (keyframes and whole slots, in order),
    ``partial`` set and the job's current state; the final report is ``build_report``'s."""
    spec = json.loads(meta["spec"])
    keyframes, slots = _recorded(spec, meta, kf_records, groups)
    video = VideoInfo.model_validate_json(meta["video"]) if "video" in meta else None
    state = meta.get("state", "queued")
    return JobReport(
        job_id=job_id, status=state if state in ("queued", "running") else "running",
        partial=True, video=video, keyframes=keyframes, slots=slots,
        stage2=Stage2Info(status="running" if meta.get("stage2") == "true" else "skipped"),
        timings={"total": round(time.time() - spec["submitted_at"], 4)},
        warnings=json.loads(meta.get("warnings", "[]")))


def build_report(job_id: str, meta: dict[str, str], kf_records: dict[int, dict],
                 groups: dict[int, dict], keep_slots: int = 0) -> JobReport:
    """The report from the job's meta hash, its Stage 1 records and its group records."""
    spec = json.loads(meta["spec"])
    error = JobError.model_validate_json(meta["error"]) if "error" in meta else None
    abort = meta.get("abort")
    video = VideoInfo.model_validate_json(meta["video"]) if "video" in meta else None
    if spec.get("stream"):  # a rolling window of what it recorded, and the stream's counts
        keyframes, slots = _recorded(spec, meta, kf_records, groups)
    else:
        fps, total = job_fps(meta), int(meta.get("keyframes_total", 0))
        stride, slot_size = spec["keyframe_stride"], spec["slot_size"]
        keyframe_list = clips.keyframe_indices(total * stride, stride)
        missing = "cancelled" if abort == "cancelled" else "no Stage 1 result"
        keyframes = [keyframe_result(i, kf_records.get(i), fps, missing) for i in keyframe_list]
        slots = [slot_result(j, kfs, groups.get(j), missing)  # a trailing partial slot is
                 for j, kfs in enumerate(clips.split_slots(keyframe_list, slot_size))  # Stage 1
                 if len(kfs) == slot_size]  # only: no Stage 2 request

    stage2_enabled = meta.get("stage2") == "true"
    stage2_records = [g for g in groups.values() if g.get("stage2")]
    models = {g["model"] for g in stage2_records if g.get("model")}

    if abort in ("cancelled", "stopped"):
        status = abort
    elif error is None and _nothing_worked(keyframes, slots, stage2_enabled):
        status = "failed"  # no verdict at all (e.g. the VLM never answered): not a partial result
        first = next((s.error for s in slots if s.error), None) or next(
            (k.error for k in keyframes if k.error), "no result")
        error = JobError(type="AllSlotsFailed",
                         message=f"every slot failed; the first: {first}")
    elif error is not None:
        status = "failed"
    elif any(k.error for k in keyframes) or any(s.error for s in slots):
        status = "completed_with_errors"
    else:
        status = "succeeded"

    stage2_status = _stage2_status(status, meta.get("stage2"), stage2_records, slots)
    stage2 = Stage2Info(
        status=stage2_status, model=next(iter(models)) if models else None,
        reason=STAGE2_REASONS.get(stage2_status))

    now = time.time()
    timings = {"total": round(now - spec["submitted_at"], 4)}
    if "ingest_started" in meta:
        timings["queued"] = round(float(meta["ingest_started"]) - spec["submitted_at"], 4)
    if "ingest_s" in meta:
        timings["ingest"] = round(float(meta["ingest_s"]), 4)
    timings["stage1"] = _span(list(kf_records.values()))
    timings["stage2"] = _span(stage2_records)

    return JobReport(
        job_id=job_id, status=status, video=video, keyframes=keyframes, slots=slots,
        stage2=stage2, timings=timings, warnings=json.loads(meta.get("warnings", "[]")),
        error=error, stream=stream_info(spec, meta, keep_slots) if spec.get("stream") else None,
    )
