"""Wire models: what travels between client, tasks and the report (pydantic, JSON only)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

JobState = Literal["queued", "running", "succeeded", "completed_with_errors", "failed", "cancelled",
                   "stopped"]
FINAL_STATES = frozenset({"succeeded", "completed_with_errors", "failed", "cancelled", "stopped"})


class JobSpec(BaseModel):
    """One job as submitted: the video and every per-job parameter the tasks need."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    video: str
    prompt: str
    keyframe_stride: int
    sampling_rate: int
    clip_length: int
    slot_size: int
    score_threshold: float
    nms_iou: float
    max_detections: int
    submitted_at: float
    priority: int = Field(5, ge=0, le=9)
    """0 = most urgent. Redis emulates priorities with 4 levels: 0-2, 3-5, 6-8, 9."""
    stream: bool = False
    """``video`` is a live source's URL (read until stopped or it ends), not a file."""


class Detection(BaseModel):
    """One detection on a keyframe, in the original frame's pixels."""

    box: tuple[float, float, float, float]
    """x1, y1, x2, y2 in original frame pixels, clipped to the frame."""
    label: str | None
    class_id: int
    score: float


class Keyframe(BaseModel):
    index: int
    """Frame index in the video (0-based)."""
    time_s: float
    detections: list[Detection] = Field(default_factory=list)
    error: str | None = None


class Verdict(BaseModel):
    """What the VLM says about one slot. Its JSON Schema is sent as ``response_format``."""

    model_config = ConfigDict(extra="forbid")

    action: str = Field(max_length=200)
    """The action the frames show, in a few words ("none" if nothing happens)."""
    confirmed: bool
    """Whether the detector's top detection is really happening."""
    confidence: float = Field(ge=0.0, le=1.0)
    reason: str = Field(max_length=1000)
    """One or two sentences of why."""


class SlotResult(BaseModel):
    slot: int
    keyframes: list[int]
    """Frame indices of the slot's keyframes, in order."""
    verdict: Verdict | None = None
    error: str | None = None
    image_size: list[int] | None = None
    """[width, height] of the frames Stage 2 sent for this slot: the stored keyframes, shrunk where
    ``STAGE2_MAX_SIDE`` or the VLM's context asked for it; None when none were sent."""


class VideoInfo(BaseModel):
    frames: int
    """Frames actually decoded."""
    fps: float
    width: int
    height: int


class Stage2Info(BaseModel):
    status: Literal["done", "skipped", "cancelled", "not_run", "failed", "stopped", "running"]
    """``done``: every slot went through Stage 2; ``skipped``: no VLM configured; ``cancelled``:
    the job was cancelled; ``not_run``: the job failed before any slot reached Stage 2;
    ``failed``: requests were made and none gave a verdict; ``stopped``: the job failed after
    some verdicts; ``running``: a partial report's."""
    model: str | None = None
    reason: str | None = None


class StreamInfo(BaseModel):
    source: str
    """The URL, credentials masked."""
    frames: int = 0
    slots: int = 0
    """Slots the stream reached; each was judged, failed, or dropped."""
    dropped: int = 0
    """Slots not run because Stage 1 and 2 were behind the live edge (``STREAM_BACKLOG_SLOTS``)."""
    reconnects: int = 0
    kept_slots: int = 0
    """The rolling window: how many of the last slots the report holds."""
    ended: str | None = None
    """``stopped`` (by the user), ``ended`` (the source went away for ``STREAM_RECONNECT_S``),
    ``limit`` (``STREAM_MAX_S``), or None while it runs."""


class JobError(BaseModel):
    type: str
    """The exception class, e.g. ``VideoDecodeError``."""
    message: str
    input_error: bool = False
    """True when the job failed on bad input (CLI exit code 3)."""


class JobReport(BaseModel):
    """The result of one job; ``model_dump()`` is the JSON in ``docs/report.schema.json``."""

    job_id: str
    status: Literal["succeeded", "completed_with_errors", "failed", "cancelled", "stopped",
                    "queued", "running"]
    """A final state (``stopped``: a live stream the user stopped; ``cancelled`` is for files);
    ``queued`` / ``running`` only in a partial report."""
    partial: bool = False
    """True for a report of a job still running (``Job.report(partial=True)``, ``GET
    /v1/jobs/{id}/report?partial=true``): it holds the keyframes and slots recorded so far, in
    order, and no Stage 2 verdict on the job as a whole; the final report replaces it."""
    video: VideoInfo | None = None
    keyframes: list[Keyframe] = Field(default_factory=list)
    slots: list[SlotResult] = Field(default_factory=list)
    stage2: Stage2Info
    timings: dict[str, float] = Field(default_factory=dict)
    """Seconds: ``total``, ``ingest``, ``stage1`` (first clip start → last end), ``stage2``."""
    warnings: list[str] = Field(default_factory=list)
    error: JobError | None = None
    stream: StreamInfo | None = None
    """A live source's job: what it read. Its ``keyframes`` and ``slots`` are then the last
    ``STREAM_KEEP_SLOTS`` slots' (a rolling window), these counts are of the whole stream."""


class JobStatus(BaseModel):
    """Progress of a job, as ``Job.status()`` returns it."""

    job_id: str
    state: JobState
    stage1_done: int = 0
    stage1_total: int = 0
    stage2_done: int = 0
    stage2_total: int = 0
    elapsed_s: float = 0.0
    idle_s: float = 0.0
    """Seconds since the job last made progress (while it waits for admission: 0)."""
    stall_s: float = 0.0
    """It ends ``failed`` once ``idle_s`` reaches this (``JOB_STALL_S`` when submitted)."""
    deadline_s: float | None = None
    """Its absolute limit from submission, if one was set (``JOB_DEADLINE_S``)."""


def report_schema() -> dict:
    """The JSON Schema of a report, as committed at ``docs/report.schema.json``."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **JobReport.model_json_schema()}


if __name__ == "__main__":  # python -m zroact_tasks.models > docs/report.schema.json
    import json

    print(json.dumps(report_schema(), indent=2))
