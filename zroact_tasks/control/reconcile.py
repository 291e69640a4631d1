"""Nothing stranded: lost workers' tasks go back, stopped jobs are repaired, budgets recounted.

Runs in each control worker's sweeper thread (control/deadlines.py), every
``RECONCILE_INTERVAL_S``. Three duties:

1. **Lost workers.** An unacked message whose holder's heartbeat has expired (liveness.py) goes
   back to the head of its queue, through kombu's own ``restore_by_tag`` (a WATCH transaction,
   so two control workers cannot give it back twice).
2. **Stranded jobs.** A job that recorded nothing, and had no task queued or held by any worker,
   for ``REPAIR_QUIET_S`` (seen so by two sweeps that far apart) has lost a message: a Redis
   restart that cut a worker's BRPOP after the pop (kombu moves a message to ``unacked`` only
   once it has it), a chord counter incremented twice by a retried command, a Redis that died
   before its AOF fsync. What it misses is sent again — the ingest, a slot's Stage 1 chord, a
   slot's Stage 2 request, the window's next slots or ``finalize``. Past ``NO_PROGRESS_S``
   (above the visibility timeout) a job is repaired even if some task of it looks held. Every step is idempotent,
   so a re-send that races the original is harmless (tests/test_reconcile.py sends each twice).
3. **Budgets.** The held-bytes counter is recounted from the unfinished jobs' own counters, and
   reservations of jobs that ended are dropped.

Each re-send is logged with the job (and slot) and counted in ``zroact:metrics:resends``
(``zroact_resends_total`` in docs/metrics.md).
"""

from __future__ import annotations

import json
import logging
import time

from celery import Celery

from .. import liveness, pipeline, resources
from ..config import get_settings
from ..errors import JobNotFoundError
from ..jobstate import DEADLINES
from ..media import clips
from ..models import JobSpec
from ..redisconn import connect

log = logging.getLogger(__name__)


def _task_id(raw: bytes | str) -> str | None:
    """The task id of a queued message, or of an unacked one ([message, exchange, key])."""
    try:
        message = json.loads(raw)
        if isinstance(message, list):
            message = message[0]
        return message["headers"]["id"]
    except (ValueError, KeyError, TypeError, IndexError):
        return None


class Reconciler:
    """One control worker's view; ``sweep()`` does one round of the three duties."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.settings = get_settings()
        self.r = connect(self.settings.redis_url, retry_s=self.settings.redis_retry_s)
        self.redis_ok_since: float | None = None
        self.quiet_since: dict[str, float] = {}  # job -> when this worker first saw it quiet

    # --- 1. lost workers ------------------------------------------------------------------
    def restore_lost_tasks(self, now: float | None = None) -> list[str]:
        """Give back the unacked messages of dead holders; the task ids given back."""
        now = time.time() if now is None else now
        with self.app.connection_for_write() as conn:
            channel = conn.default_channel
            unacked = self.r.hgetall(channel.unacked_key)
            if not unacked:
                return []
            tags = list(unacked)
            pipe = self.r.pipeline(transaction=False)
            for tag in tags:
                pipe.get(liveness.held_key(tag.decode()))
                pipe.zscore(channel.unacked_index_key, tag)
            found = pipe.execute()
            holders = {found[2 * i] for i in range(len(tags)) if found[2 * i]}
            pipe = self.r.pipeline(transaction=False)
            for boot in holders:
                pipe.exists(liveness.worker_key(boot.decode()))
            alive = {boot for boot, up in zip(holders, pipe.execute()) if up}
            restored = []
            for i, tag in enumerate(tags):
                holder, since = found[2 * i], found[2 * i + 1]
                if holder in alive:
                    continue
                # No holder recorded: its worker died between taking the message and
                # recording it; give it the same grace as a heartbeat.
                if holder is None and (since is None or now - since < self.settings.worker_lost_s):
                    continue
                task_id = _task_id(unacked[tag]) or "?"
                channel.qos.restore_by_tag(tag.decode())  # to the end consumers pop next
                self.r.delete(liveness.held_key(tag.decode()))
                restored.append(task_id)
                resources.jobs().count_resend("lost_task")
                log.warning("task %s given back: its worker is lost", task_id)
            return restored

    # --- 2. stranded jobs -------------------------------------------------------------------
    def queued_or_held(self) -> tuple[set[str], set[str]]:
        """Ids of every task waiting in a queue, and of every task held by a worker."""
        with self.app.connection_for_write() as conn:
            channel = conn.default_channel
            lists = [channel._q_for_pri(q, p) for q in ("control", "stage1", "stage2")
                     for p in channel.priority_steps]
            pipe = self.r.pipeline(transaction=False)
            for name in dict.fromkeys(lists):
                pipe.lrange(name, 0, -1)
            pipe.hvals(channel.unacked_key)
            found = pipe.execute()
        queued = {_task_id(m) for messages in found[:-1] for m in messages} - {None}
        held = {_task_id(m) for m in found[-1]} - {None}
        return queued, held

    @staticmethod
    def recorded(jobs, job_id: str, task_ids: set[str]) -> bool:
        """Whether the work of every one of these tasks of the job is recorded. A message can
        stay held after its task ended: a Redis restart between the task and its ack leaves
        it in the unacked hash of a live worker until the visibility timeout; it is no sign
        of work going on."""
        steps = [t[len(job_id) + 1:].split(":") for t in task_ids]
        keyframes = [int(s[1]) for s in steps if s[0] == "s1" and len(s) == 2]
        kf = jobs.keyframe_records(job_id, keyframes) if keyframes else {}
        groups = jobs.groups(job_id) if any(s[0] in ("s2", "slot") for s in steps) else {}
        chunks = jobs.chunks_stored(job_id) if any(s[0] == "ingest" for s in steps) else set()
        for step in steps:
            if step[0] == "s1" and len(step) == 2 and int(step[1]) in kf:
                continue
            if step[0] in ("s2", "slot") and len(step) == 2 and int(step[1]) in groups:
                continue
            if step[0] == "ingest" and int(step[1] if len(step) == 2 else 0) in chunks:
                continue
            return False
        return True

    def stranded(self, now: float | None = None) -> list[str]:
        """Unfinished jobs to repair: quiet (nothing recorded, nothing queued or held) since
        ``REPAIR_QUIET_S``, or nothing recorded since ``NO_PROGRESS_S`` whatever looks held.
        A job waiting for admission is not stranded: a job's end wakes it."""
        now = time.time() if now is None else now
        jobs, s = resources.jobs(), self.settings
        idle: dict[str, float] = {}
        for job_id, (progress, _) in jobs.progress_times(jobs.unfinished()).items():
            age = now - progress if progress is not None else float("inf")
            if age >= s.repair_quiet_s:
                idle[job_id] = age
        waiting = set(resources.frames().waiting()) if idle else set()
        idle = {j: age for j, age in idle.items() if j not in waiting}
        if not idle:
            self.quiet_since.clear()
            return []
        queued, held = self.queued_or_held()
        busy = {task_id.split(":", 1)[0] for task_id in queued}
        holds: dict[str, set[str]] = {}
        for task_id in held:
            holds.setdefault(task_id.split(":", 1)[0], set()).add(task_id)
        busy |= {job_id for job_id, ids in holds.items()
                 if job_id in idle and not self.recorded(jobs, job_id, ids)}
        out = []
        for job_id, age in idle.items():
            if job_id in busy:
                self.quiet_since.pop(job_id, None)
                if age >= s.no_progress_s:
                    out.append(job_id)
                continue
            since = self.quiet_since.setdefault(job_id, now)
            if now - since >= s.repair_quiet_s:
                out.append(job_id)
        for job_id in set(self.quiet_since) - set(idle):
            del self.quiet_since[job_id]
        return out

    def repair(self, job_id: str) -> list[str]:
        """Send again what the job misses; what was sent (e.g. ``["stage2:4"]``)."""
        from .tasks import finish_ingest, send_next_chunks  # noqa: PLC0415

        jobs = resources.jobs()
        if not jobs.lock_repair(job_id, self.settings.repair_quiet_s):
            return []  # another control worker repairs it
        try:
            meta = jobs.meta(job_id)
        except JobNotFoundError:  # expired or deleted: nothing to finish
            jobs.r.zrem(DEADLINES, job_id)
            return []
        sent: list[str] = []
        spec = JobSpec.model_validate_json(meta["spec"])
        if "report" in meta:
            jobs.r.zrem(DEADLINES, job_id)
        elif jobs.barrier_closed(job_id) or "abort" in meta:
            jobs.close_barrier(job_id)
            pipeline.send_finalize(self.app, job_id)
            sent.append("finalize")
        elif spec.stream:  # a reader that died lets its lease lapse: another goes on
            from .stream import reader_alive  # noqa: PLC0415

            if "stream_ended" not in meta and not reader_alive(jobs, job_id):
                pipeline.send_stream(self.app, spec.model_dump(mode="json"))
                sent.append("stream")
            if "frame_size" in meta:
                sent += self._repair_slots(job_id, meta)
        elif "plan" not in meta or "ingest_started" not in meta:  # chunk 0 (the plan) was lost
            pipeline.send_ingest(self.app, spec.model_dump(mode="json"), 0)
            sent.append("ingest:0")
        else:
            sent += self._repair_chunks(spec, meta)
            if not sent:
                sent += self._repair_slots(job_id, meta)
            if not sent and "chunks_end" not in meta:
                sent += [f"ingest:{c}" for c in send_next_chunks(spec, meta)]
            if not sent and "groups_total" not in meta and "chunks_end" in meta:
                finish_ingest(spec, meta)  # every chunk stored; the totals were lost
                sent.append("finalize")
        jobs.touch(job_id)  # give what was sent REPAIR_QUIET_S to show progress
        for what in sent:
            jobs.count_resend(what.split(":")[0])
            log.warning("job %s: re-sent %s (nothing recorded, queued or held for %g s)",
                        job_id, what, self.settings.repair_quiet_s)
        return sent

    def _repair_chunks(self, spec: JobSpec, meta: dict) -> list[str]:
        """Chunks sent but never stored (up to the video's end, once it is known)."""
        stored = resources.jobs().chunks_stored(spec.job_id)
        sent = int(meta.get("chunk_next", 1))
        if "chunks_end" in meta:
            sent = min(sent, int(meta["chunks_end"]) + 1)
        missing = [c for c in range(sent) if c not in stored]
        for chunk in missing:
            pipeline.send_ingest(self.app, spec.model_dump(mode="json"), chunk)
        return [f"ingest:{c}" for c in missing]

    def _repair_slots(self, job_id: str, meta: dict) -> list[str]:
        from .report import stage1_slot_error  # noqa: PLC0415
        from .tasks import pump, record_group, release_slot, slot_params  # noqa: PLC0415

        jobs, settings = resources.jobs(), self.settings
        spec = JobSpec.model_validate_json(meta["spec"])
        stage2 = meta.get("stage2") == "true"
        total = int(meta["keyframes_total"]) if "keyframes_total" in meta else None
        offered = sorted(jobs.offered(job_id))
        if total is not None:
            offered = [j for j in offered if j * spec.slot_size < total]
        groups = jobs.groups(job_id)
        kf = jobs.keyframes(job_id)
        pending, _ = jobs.pending_and_inflight(job_id)
        waiting = {item["slot"] for item in pending}
        frame_size = json.loads(meta["frame_size"])
        sent = []
        for slot in offered:
            keyframes = clips.slot_keyframes(slot, spec.slot_size, spec.keyframe_stride, total)
            if slot in groups or slot in waiting:
                continue
            judge = stage2 and len(keyframes) == spec.slot_size
            if all(k in kf for k in keyframes):  # Stage 1 is done: its body was lost
                failed = [kf[k] for k in keyframes if kf[k].get("error")]
                if failed:
                    record_group(job_id, slot, {"error": stage1_slot_error(failed[0])}, keyframes)
                elif judge:
                    detections = {str(k): kf[k]["detections"] for k in keyframes}
                    pipeline.send_judge(self.app, job_id, slot, keyframes, detections,
                                        spec.priority)
                    sent.append(f"stage2:{slot}")
                else:
                    record_group(job_id, slot, {"stage2": False}, keyframes)
                release_slot(job_id, slot, keyframes)
            else:
                pipeline.send_slot(self.app, job_id, slot, keyframes,
                                   params=slot_params(spec, frame_size), judge=judge,
                                   batch=settings.stage1_batch, priority=spec.priority)
                sent.append(f"stage1:{slot}")
        if not sent and waiting:
            pump(spec, stage2, frame_size)  # the window has room: let the next slots in
            sent.append("window")
        slots = len(clips.job_slots(total, spec.slot_size, spec.keyframe_stride)) if total else None
        if (not sent and slots is not None and len(groups) >= slots
                and jobs.set_groups_total(job_id, slots)):
            pipeline.send_finalize(self.app, job_id)  # every slot ended; the barrier was lost
            sent.append("finalize")
        return sent

    # --- 3. budgets ---------------------------------------------------------------------------
    def recount_budget(self) -> None:
        """Recount the frames held, drop admissions of ended jobs, and wake waiting jobs that
        fit (a backstop: a job's end wakes them, unless its worker died just then)."""
        from .tasks import wake_waiting  # noqa: PLC0415

        before, now, dropped = resources.frames().reconcile(resources.jobs().unfinished())
        if before != now or dropped:
            log.info("frame budget recounted: %d -> %d bytes held, %d stale admissions "
                     "dropped", before, now, dropped)
        wake_waiting()

    # --- one round ------------------------------------------------------------------------------
    def sweep(self) -> None:
        now = time.time()
        self.r.ping()
        if self.redis_ok_since is None:
            self.redis_ok_since = now
        # After an outage, workers need a beat or two to renew their heartbeats.
        if now - self.redis_ok_since >= 2 * liveness.beat_interval(self.settings.worker_lost_s):
            self.restore_lost_tasks(now)
        for job_id in self.stranded(now):
            self.repair(job_id)
        self.recount_budget()
