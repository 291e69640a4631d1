"""Settings: everything zroact reads from the environment (prefix ``ZROACT_``).

This module is the only reader of ``os.environ``. CLI flags override values by building a new
``Settings`` with ``settings.model_copy(update=...)``; worker processes receive the same values
through the environment their supervisor gives them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .errors import ConfigError

STAGE2_CONCURRENCY_RANGE = (2, 3)
"""Per-worker VLM requests in flight the VRAM budget allows (≈5 GB weights + 1–2 GB each)."""


class Settings(BaseSettings):
    """Everything zroact reads from the environment (prefix ``ZROACT_``)."""

    model_config = SettingsConfigDict(
        env_prefix="ZROACT_", frozen=True, use_attribute_docstrings=True, extra="ignore"
    )

    redis_url: str = "redis://127.0.0.1:6379/0"
    """Broker, result backend and frame store (one Redis)."""
    redis_retry_s: float = Field(60.0, ge=0)
    """How long a Redis command is retried (exponential backoff) before its error reaches the
    caller: longer than a Redis restart. Workers, the client and the API alike."""
    model: Path | None = None
    """Stage 1 ONNX model (YOWOv3 layout). Required by Stage 1 workers."""
    labels: Path | None = None
    """Optional class names, one per line; their count must equal the model's classes."""
    vlm_url: str | None = None
    """vLLM server root (``http://host:8000``; a trailing ``/v1`` is accepted). None skips Stage 2."""
    vlm_model: str | None = None
    """Served model name; None = the only model listed by ``/v1/models``."""
    prompt: str = (
        "You review the output of an action detector on three video frames taken one stride "
        "apart. Say which action, if any, is really happening."
    )
    """Default Stage 2 prompt; the slot's Stage 1 detections are appended to it."""

    keyframe_stride: int = Field(10, ge=1)
    """Every stride-th frame is a keyframe (keyframe i is frame i*stride - 1)."""
    sampling_rate: int = Field(1, ge=1)
    """Step between the 16 frames of a clip, counting back from its keyframe."""
    clip_length: int = Field(16, ge=1)
    """Frames per clip (YOWOv3: 16)."""
    slot_size: int = Field(3, ge=1)
    """Keyframes per Stage 2 request."""
    score_threshold: float = Field(0.3, ge=0.0, le=1.0)
    """Keep class scores above this."""
    nms_iou: float = Field(0.5, gt=0.0, le=1.0)
    """Per-class NMS IoU threshold."""
    max_detections: int = Field(300, ge=1)
    """Detections kept per keyframe after NMS."""
    detector: str = "onnx"
    """Stage 1 runtime: ``onnx`` or ``package.module:Class`` (see stage1/detector.py)."""
    detector_options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for a ``package.module:Class`` detector (JSON), e.g. an engine path."""
    preload_detector: bool = False
    """Load the Stage 1 model as each worker process starts (``zroact worker stage1`` sets it)."""
    stage1_batch: int = Field(1, ge=1)
    """Clips per Stage 1 task (one onnxruntime call when the model's batch is dynamic)."""
    stage1_max_batch: int = Field(1, ge=1)
    """Cross-job batching: >1 runs the Stage 1 worker as a thread pool of this size whose clips
    share inference calls of up to this many clips (stage1/batcher.py). 1 = off."""
    stage1_batch_timeout_ms: float = Field(10.0, ge=0)
    """Batching: the longest a clip waits for others before its call runs anyway."""
    stage1_pipeline_depth: int = Field(4, ge=0)
    """Clips a Stage 1 worker holds at once (reserved, being prepared, inferred, recorded): one
    process, one session, one inference thread, so the GPU never waits for the CPU
    (stage1/tasks.py). 0 = a prefork pool of ``-c`` processes, one clip each."""
    job_window_slots: int = Field(4, ge=0)
    """Slots of one job queued for Stage 1 at a time (0 = all at once). Keeps one long video
    from filling the queue ahead of jobs submitted after it: work interleaves across jobs."""
    default_priority: int = Field(5, ge=0, le=9)
    """Priority of jobs submitted without one (0 = most urgent)."""
    frames_url: str | None = None
    """A second Redis for the frame store alone, so frames and the queue scale apart; None =
    ``REDIS_URL`` holds them too."""
    frame_budget_bytes: int = Field(2 * 1024**3, ge=0)
    """Admission: the frames held for all running jobs stay under this. Each job is admitted with
    its footprint (bounded whatever the video's length: ``INGEST_CHUNK_SLOTS``); a job that does
    not fit waits, by priority then submission, until a job ends. 0 = no budget."""
    ingest_chunk_slots: int = Field(4, ge=1)
    """Slots one ingest step decodes and stores (a chunk: ~120 frames at the defaults)."""
    ingest_lead_chunks: int = Field(2, ge=1)
    """How far decoding runs ahead of Stage 1, in chunks: the stored slots not yet through
    Stage 1, plus the chunks being decoded, stay under this many chunks' worth. It also bounds
    how many control workers decode one video at once."""
    ingest_encode_threads: int = Field(2, ge=1)
    """Threads of one ingest step that resize and encode frames while its decoder reads the next
    (Pillow's resize and OpenCV's encoders release the GIL; at 1080p they cost ~3x the decode)."""
    frame_jpeg_quality: int = Field(95, ge=50, le=100)
    """JPEG quality of frames held in the store (they are also what Stage 2 sends)."""
    stage2_max_side: int | None = Field(None, ge=32)
    """Downscale Stage 2 images so the longer side is at most this; None = original resolution."""

    stage2_concurrency: int = 3
    """VLM requests in flight per Stage 2 worker; 2–3 unless overridden."""
    stage2_concurrency_override: bool = False
    """Allow a Stage 2 concurrency outside 2–3."""
    vlm_max_num_seqs: int | None = Field(None, ge=1)
    """The vLLM server's ``--max-num-seqs`` (vLLM does not publish it), for capacity planning."""
    vlm_tokens_per_image: int = Field(1200, ge=1)
    """KV-cache tokens one image takes (Qwen2.5-VL: ~1,200 at 1280x720), for capacity planning."""
    vlm_latency_growth: float = Field(0.10, ge=0)
    """Measured per-request latency growth per extra request in flight, for capacity planning."""
    stage2_workers_per_vlm: int = Field(1, ge=1)
    """Stage 2 workers that share one vLLM server."""
    vlm_timeout_s: float = Field(60.0, gt=0)
    """Per-request timeout for the VLM server."""
    vlm_max_retries: int = Field(4, ge=0)
    """Retries of transient VLM errors (connection refused, timeouts, 5xx), exponential backoff."""
    vlm_backoff_max_s: float = Field(8.0, gt=0)
    """Cap of one backoff sleep between VLM retries."""
    vlm_max_tokens: int | None = Field(None, ge=16)
    """``max_tokens`` of a Stage 2 request; unset = the longest answer the verdict schema allows
    (``stage2.vlm.answer_token_bound``, ~4,950), so no allowed answer is cut off."""

    max_task_deliveries: int = Field(3, ge=1)
    """A task delivered this many times (its worker died each time) is recorded as failed."""
    job_stall_s: float = Field(1800.0, gt=0)
    """A job that makes no progress (a chunk stored, a keyframe or a slot recorded) for this long
    ends ``failed``; waiting for admission does not count. Above ``NO_PROGRESS_S``, so the
    reconciler has repaired whatever it can before a job is given up."""
    job_deadline_s: float = Field(0.0, ge=0)
    """Optional absolute limit from submission (0 = none): long footage takes as long as it
    takes, ``JOB_STALL_S`` catches a job that stopped moving."""
    visibility_timeout_s: int = Field(1200, ge=2)
    """Redis redelivers an unacked task after this: above the longest task's time limit, or a
    running task is delivered twice. A dead worker's tasks come back sooner (``WORKER_LOST_S``)."""
    repair_quiet_s: float = Field(20.0, gt=0)
    """A job that recorded nothing and had none of its tasks queued or held by any worker for
    this long (seen so by sweeps this far apart) has lost a message: what is missing is sent
    again (control/reconcile.py). Safe at any value above a message's transit (milliseconds),
    since it checks where every task is; 20 s keeps it clear of a restarting worker."""
    no_progress_s: float = Field(1500.0, gt=0)
    """The backstop: a job that recorded nothing for this long is repaired even if some task of
    it still looks queued or held (by then the visibility timeout has brought back anything a
    worker held)."""
    worker_lost_s: float = Field(30.0, gt=0)
    """A worker whose heartbeat is this old is lost; the tasks it held go back to their queue."""
    consumer_stall_s: float = Field(20.0, gt=0)
    """A worker with a free pool slot that took no task for this long while its queues held
    ready ones has a stopped consumer (a Celery/kombu bug after a Redis restart): it shuts down
    to be restarted (liveness.py). Checked every ``WORKER_LOST_S / 6``."""
    reconcile_interval_s: float = Field(2.0, gt=0)
    """How often control workers look for lost workers and stranded jobs."""
    ingest_time_limit_s: float = Field(120.0, gt=0)
    """Hard time limit of one ingest step (one chunk: a few seconds of 1080p on one core)."""
    stage1_time_limit_s: float = Field(120.0, gt=0)
    """Hard time limit of one Stage 1 task."""
    control_time_limit_s: float = Field(60.0, gt=0)
    """Hard time limit of the short control steps (slot bookkeeping, the report)."""
    result_ttl_s: int = Field(7 * 24 * 3600, ge=60)
    """How long reports and task results stay in Redis."""
    stream_sources: Annotated[list[str], NoDecode] = Field(default_factory=list)
    """URL prefixes of the live sources jobs may read (rtsp://, http(s):// MJPEG, MPEG-TS or HLS);
    empty = none. Enforced by the control workers (and checked by clients). JSON list or commas."""
    stream_max_s: float = Field(7 * 86400, gt=0)
    """A stream job's limit (MAX_FRAMES and MAX_DURATION_S are for files): it ends ``succeeded``
    after this long. Also its deadline."""
    stream_reconnect_s: float = Field(30.0, gt=0)
    """A dropped source is reopened with backoff (0.5 s doubling to 8 s) for this long; then the
    stream has ended and so does the job."""
    stream_backlog_slots: int = Field(8, ge=1)
    """Slots of a stream sent but not yet through Stage 1 and Stage 2: at this many the reader
    drops new slots (each recorded "dropped: …") instead of queueing them, so a job whose
    Stage 2 is slower than real time runs at most this many slots behind the live edge."""
    stream_keep_slots: int = Field(600, ge=10)
    """A stream's records and report keep its last this many slots (a rolling window; the
    report's ``stream`` summary counts them all)."""
    events_max: int = Field(10_000, ge=100)
    """Entries kept in a job's event stream (Redis Streams, trimmed approximately): a job's
    keyframes + slots + 1 fit whole for videos up to ~40 minutes (30 fps, the defaults)."""
    media_root: Path | None = None
    """If set, videos must resolve (symlinks followed) to a path under this directory."""
    max_frames: int = Field(108_000, ge=1)
    """Longest video accepted, in decoded frames (1 h at 30 fps)."""
    max_pixels: int = Field(3840 * 2160, ge=1)
    """Largest frame accepted, width x height."""
    max_duration_s: float = Field(3600.0, gt=0)
    """Longest video accepted, in seconds."""
    max_prompt_chars: int = Field(4000, ge=1)
    """Longest prompt accepted."""

    api_token: SecretStr | None = None
    """Bearer token the HTTP API requires (``zroact api``); required unless auth is disabled."""
    api_auth_disabled: bool = False
    """Run the HTTP API without authentication (only when set explicitly)."""
    api_max_upload_bytes: int = Field(2 * 1024**3, ge=1)
    """Largest video the HTTP API accepts as an upload (413 above it)."""

    @field_validator("stream_sources", mode="before")
    @classmethod
    def _prefixes(cls, value: Any) -> Any:
        if isinstance(value, str):  # a JSON list, or prefixes separated by commas
            value = json.loads(value) if value.lstrip().startswith("[") else value.split(",")
        return [v.strip() for v in value if v and v.strip()] if isinstance(value, list) else value

    @field_validator("vlm_url")
    @classmethod
    def _strip_v1(cls, url: str | None) -> str | None:
        if not url:
            return None
        url = url.rstrip("/")
        return url[: -len("/v1")] if url.endswith("/v1") else url


def stage2_time_limit_s(s: Settings) -> float:
    """A Stage 2 task's worst case: every VLM attempt timing out, the backoff between them,
    and a margin for reading frames and recording the verdict."""
    backoff = sum(min(s.vlm_backoff_max_s, 0.5 * 2**i) for i in range(s.vlm_max_retries))
    return (s.vlm_max_retries + 1) * s.vlm_timeout_s + backoff + 10.0


def task_time_limits(s: Settings) -> dict[str, float]:
    """Hard time limit of each kind of task, by queue (ingest apart: it is the long one)."""
    return {"ingest": s.ingest_time_limit_s, "control": s.control_time_limit_s,
            "stage1": s.stage1_time_limit_s, "stage2": stage2_time_limit_s(s)}


def timeout_problems(s: Settings) -> list[str]:
    """Where the settings break the rule longest task < visibility timeout < no-progress
    timeout <= job deadline (each inequality is what keeps a step from running twice or a
    job from failing before it is repaired). Workers log these at start."""
    problems = []
    name, longest = max(task_time_limits(s).items(), key=lambda kv: kv[1])
    if longest >= s.visibility_timeout_s:
        problems.append(f"the {name} time limit {longest:g} s is not below VISIBILITY_TIMEOUT_S "
                        f"{s.visibility_timeout_s} s: a running task can be delivered twice")
    if s.visibility_timeout_s >= s.no_progress_s:
        problems.append(f"VISIBILITY_TIMEOUT_S {s.visibility_timeout_s} s is not below "
                        f"NO_PROGRESS_S {s.no_progress_s:g} s")
    if s.no_progress_s > s.job_stall_s:
        problems.append(f"NO_PROGRESS_S {s.no_progress_s:g} s is above JOB_STALL_S "
                        f"{s.job_stall_s:g} s: jobs fail before they are repaired")
    if s.job_deadline_s and s.no_progress_s > s.job_deadline_s:
        problems.append(f"NO_PROGRESS_S {s.no_progress_s:g} s is above JOB_DEADLINE_S "
                        f"{s.job_deadline_s:g} s: jobs fail before they are repaired")
    return problems


_current: Settings | None = None


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment with ``overrides`` on top; an invalid value raises
    ConfigError naming the setting (one line, not pydantic's report)."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"]))
        raise ConfigError(f"invalid setting ZROACT_{where.upper()}: {first['msg']}") from exc


def get_settings() -> Settings:
    """The process-wide settings, read once from the environment (or set by ``use_settings``)."""
    global _current
    if _current is None:
        _current = load_settings()
    return _current


def use_settings(settings: Settings) -> None:
    """Make ``settings`` the process-wide settings (CLI flags; inherited by forked workers)."""
    global _current
    _current = settings
