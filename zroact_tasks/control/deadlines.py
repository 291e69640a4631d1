"""Stalls and deadlines: a job that made no progress for ``JOB_STALL_S`` (waiting for admission
apart), or still running past its optional ``JOB_DEADLINE_S``, ends ``failed``.

The same sweeper thread runs the reconciler first (control/reconcile.py): the deadline is the
last resort, repair is the recovery path.

Each control worker's main process runs a sweeper thread (several control workers may sweep the
same job: ``close_barrier`` lets exactly one of them end it). A periodic sweep instead of a
countdown task on purpose: on Redis a countdown longer than the visibility timeout is delivered
twice.
"""

from __future__ import annotations

import logging
import threading
import time

from celery.signals import worker_ready, worker_shutdown

from .. import pipeline, resources
from ..config import get_settings
from ..errors import ZroactError
from ..models import JobError
from ..redisconn import is_transient

log = logging.getLogger(__name__)

_stop = threading.Event()


class JobDeadlineError(ZroactError):
    """The job did not end within its ``JOB_DEADLINE_S``."""


class JobStalledError(ZroactError):
    """The job made no progress for its ``JOB_STALL_S``."""


def _due(jobs, now: float) -> dict[str, JobError]:
    """Jobs to end now, each with why: overdue, or stalled (not while waiting for admission)."""
    due = {}
    for job_id in jobs.overdue(now):
        meta = jobs.r.hmget(f"zroact:job:{job_id}", ["deadline_s"])
        allowed = float(meta[0] or 0)
        due[job_id] = JobError(type="JobDeadlineError", message=(
            f"timed out at {jobs.stage_of(job_id)} after {allowed:g} s (JOB_DEADLINE_S)"))
    stalled = {j: (p, limit) for j, (p, limit) in jobs.progress_times(jobs.unfinished()).items()
               if j not in due and limit and p is not None and now - p >= limit}
    if stalled:
        waiting = set(resources.frames().waiting())
        for job_id, (progress, limit) in stalled.items():
            if job_id in waiting:
                jobs.touch(job_id)  # waiting for admission is not a stall
                continue
            due[job_id] = JobError(type="JobStalledError", message=(
                f"no progress at {jobs.stage_of(job_id)} for {limit:g} s (JOB_STALL_S)"))
    return due


def sweep(app, now: float | None = None) -> list[str]:
    """End every overdue or stalled job; returns the ids this call ended."""
    jobs, ended = resources.jobs(), []
    for job_id, error in _due(jobs, time.time() if now is None else now).items():
        if jobs.close_barrier(job_id):
            jobs.update(job_id, error=error.model_dump_json())
            jobs.request_abort(job_id, "failed")
            pipeline.send_finalize(app, job_id)
            ended.append(job_id)
            log.warning("job %s %s", job_id, error.message)
    return ended


def _loop(app, interval: float) -> None:
    from .reconcile import Reconciler  # noqa: PLC0415 - imports the control tasks

    reconciler = Reconciler(app)
    while not _stop.wait(interval):
        try:
            reconciler.sweep()
            sweep(app)
        except Exception as exc:  # an outage must not kill the sweeper; the next round retries
            reconciler.redis_ok_since = None
            if is_transient(exc):
                log.warning("sweep skipped: Redis unavailable (%s)", type(exc).__name__)
            else:
                log.exception("sweep failed")


@worker_ready.connect
def _start(sender=None, **_: object) -> None:
    consumer = getattr(sender, "task_consumer", None)
    queues = {q.name for q in consumer.queues} if consumer is not None else set()
    if "control" not in queues:
        return
    settings = get_settings()
    interval = min(settings.reconcile_interval_s, max(0.2, settings.job_stall_s / 20))
    threading.Thread(target=_loop, args=(sender.app, interval), name="zroact-deadlines",
                     daemon=True).start()


@worker_shutdown.connect
def _halt(**_: object) -> None:
    _stop.set()
