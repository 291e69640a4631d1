"""The Python client: ``Client.submit()`` -> ``Job`` with ``status()``, ``wait()``, ``cancel()``."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from celery.exceptions import TimeoutError as CeleryTimeoutError

from . import events, pipeline
from .app import make_app
from .config import Settings, get_settings
from .errors import InputError, JobTimeoutError, PromptError
from .events import JobEvent
from .jobstate import JobStore
from .media import streams
from .media.clips import keyframe_indices
from .media.clips import slot_keyframes as clips_slot_keyframes
from .models import FINAL_STATES, JobReport, JobSpec, JobStatus
from .redisconn import TRANSIENT_ERRORS

log = logging.getLogger(__name__)


WAIT_CHECK_S = 5.0
"""How often ``Job.wait`` also reads the stored report (a lost pub/sub message costs this)."""


def check_prompt(prompt: str, max_chars: int) -> str:
    """The prompt, if usable; PromptError otherwise."""
    if not prompt.strip():
        raise PromptError("prompt", "is empty")
    if len(prompt) > max_chars:
        raise PromptError("prompt", f"{len(prompt)} characters is over MAX_PROMPT_CHARS {max_chars}")
    return prompt


class Client:
    """Submits jobs to, and follows them on, the cluster behind one Redis."""

    def __init__(self, redis_url: str | None = None, *, settings: Settings | None = None) -> None:
        settings = settings or get_settings()
        if redis_url is not None:
            settings = settings.model_copy(update={"redis_url": redis_url})
        self.settings = settings
        self.app = make_app(settings)
        self.jobs = JobStore(settings.redis_url, settings.result_ttl_s, settings.redis_retry_s,
                             settings.events_max)

    def submit(self, path: str | os.PathLike, prompt: str | None = None,
               priority: int | None = None) -> Job:
        """Queue a job for the video at ``path`` (as the workers see it); returns at once.

        ``priority``: 0 (most urgent) to 9, default ``DEFAULT_PRIORITY`` (5). On Redis, Celery
        emulates priorities with four levels, 0-2, 3-5, 6-8 and 9: values within a level are
        equal, and a level only goes first among tasks waiting in the same queue.
        """
        s = self.settings
        prompt = check_prompt(s.prompt if prompt is None else prompt, s.max_prompt_chars)
        priority = s.default_priority if priority is None else priority
        if not 0 <= priority <= 9:
            raise InputError("priority", f"{priority} is not in 0..9 (0 = most urgent)")
        stream = streams.is_stream(str(path))
        if stream:  # the control workers check it too, with their own STREAM_SOURCES
            video = streams.check_allowed(str(path), s.stream_sources)
        else:
            local = Path(path)
            # A path that exists here is sent absolute (local workers); any other path is left
            # for the workers to resolve against their MEDIA_ROOT.
            video = str(local.resolve()) if local.exists() and s.media_root is None else str(path)
        spec = JobSpec(
            job_id=uuid.uuid4().hex, video=video, prompt=prompt,
            keyframe_stride=s.keyframe_stride, sampling_rate=s.sampling_rate,
            clip_length=s.clip_length, slot_size=s.slot_size, score_threshold=s.score_threshold,
            nms_iou=s.nms_iou, max_detections=s.max_detections, submitted_at=time.time(),
            priority=priority, stream=stream,
        )
        if stream:  # its own limit is its deadline (JOB_DEADLINE_S is for files)
            self.jobs.create(spec, s.stream_max_s + 60, s.job_stall_s)
            pipeline.send_stream(self.app, spec.model_dump(mode="json"))
        else:
            self.jobs.create(spec, s.job_deadline_s, s.job_stall_s)
            pipeline.send_ingest(self.app, spec.model_dump(mode="json"))
        return Job(self, spec.job_id)

    def job(self, job_id: str) -> Job:
        """A handle on an existing job; JobNotFoundError if the cluster has no record of it."""
        self.jobs.meta(job_id)
        return Job(self, job_id)

    def close(self) -> None:
        self.app.close()


def _stream_task_ids(spec: JobSpec, meta: dict, s: Settings) -> list[str]:
    """The task ids a stream job can have pending: only its recent slots (those in the window
    and the backlog) ever have tasks, however long it has run."""
    nxt = int(meta.get("stream_next_slot", 0))
    first = max(0, nxt - s.job_window_slots - s.stream_backlog_slots - 2)
    ids = []
    for slot in range(first, nxt + 2):  # batch 1: a superset of any batch's ids, as for files
        kfs = clips_slot_keyframes(slot, spec.slot_size, spec.keyframe_stride)
        ids += pipeline.slot_task_ids(spec.job_id, slot, kfs, batch=1)
    return ids


class Job:
    """One submitted job."""

    def __init__(self, client: Client, job_id: str) -> None:
        self._client, self.id = client, job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> JobStatus:
        """State and Stage 1 / Stage 2 progress (done / total)."""
        return self._client.jobs.status(self.id)

    def report(self, partial: bool = False) -> JobReport | None:
        """The report if the job has ended, else None; with ``partial``, a running job's
        report of what is recorded so far (``JobReport.partial``)."""
        jobs = self._client.jobs
        raw = jobs.report_json(self.id)
        if raw or not partial:
            return JobReport.model_validate_json(raw) if raw else None
        from .control.report import build_partial_report

        meta = jobs.meta(self.id)  # JobNotFoundError for an unknown id
        return build_partial_report(self.id, meta, jobs.keyframes(self.id), jobs.groups(self.id))

    def events(self, since: str | None = None) -> Iterator[JobEvent]:
        """Each keyframe's and slot's result the moment it is recorded, then the ``end`` event;
        resume after a disconnect with ``since=`` the last event's ``id`` (nothing lost or
        repeated). Blocks while the job runs (XREAD BLOCK, no polling of the records)."""
        r = self._client.jobs.r
        start = since or events.START
        return events.follow(r, self.id, start, last_seq=events.seq_of(r, self.id, start),
                             ended=lambda: self.report() is not None)

    def wait(self, timeout: float | None = None) -> JobReport:
        """Block until the job ends: on the result backend's pub/sub (no polling), looking at
        the stored report every ``WAIT_CHECK_S`` too, since a message published while the
        subscriber was reconnecting (a Redis restart) is never delivered."""
        end = None if timeout is None else time.monotonic() + timeout
        result = self._client.app.AsyncResult(pipeline.finalize_id(self.id))
        while True:
            done = self.report()
            if done is not None:
                return done
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                raise JobTimeoutError(self.id, timeout or 0)
            step = WAIT_CHECK_S if left is None else min(WAIT_CHECK_S, left)
            try:
                data = result.get(timeout=step, propagate=True)
                return JobReport.model_validate(data)
            except CeleryTimeoutError:
                continue
            except (RuntimeError, *TRANSIENT_ERRORS) as exc:  # the subscriber lost Redis
                log.warning("job %s: result subscription lost (%s); reading the report",
                            self.id, type(exc).__name__)
                time.sleep(1.0)

    def cancel(self) -> bool:
        """Revoke every pending task of the job and end it ``cancelled``.

        Running tasks stop at their next step. False if the job had already ended or stopped.
        """
        jobs = self._client.jobs
        spec = jobs.spec(self.id)
        reason = "stopped" if spec.stream else "cancelled"  # a live stream is stopped, not failed
        if jobs.meta(self.id).get("state") in FINAL_STATES or not jobs.request_abort(self.id, reason):
            return False
        meta = jobs.meta(self.id)
        if spec.stream:
            ids = _stream_task_ids(spec, meta, self._client.settings)
        else:
            # Every keyframe of every chunk sent so far (chunks run in parallel, so the count
            # of keyframes seen is not where they end).
            chunks = int(meta.get("chunk_next", 1))
            per = json.loads(meta["plan"])["chunk_slots"] if "plan" in meta else 1
            seen = chunks * per * spec.slot_size
            seen = max(seen, int(meta.get("keyframes_total", 0)))
            keyframes = keyframe_indices(seen * spec.keyframe_stride, spec.keyframe_stride)
            # Batch 1 names a Stage 1 task for every keyframe: a superset of the ids for any
            # batch the workers use (this client's STAGE1_BATCH may not be theirs).
            ids = pipeline.job_task_ids(self.id, keyframes, spec.slot_size, batch=1, chunks=chunks)
        self._client.app.control.revoke(ids)
        if jobs.close_barrier(self.id):
            pipeline.send_finalize(self._client.app, self.id)
        return True
