"""A job's records in Redis, and the barrier that lets exactly one step build its report.

Keys (all under ``zroact:job:{id}``, all with a TTL):

- ``…`` (hash): the spec, state, totals, video info, warnings, error, timestamps.
- ``…:kf`` (hash): keyframe index -> its Stage 1 result (JSON). Written by Stage 1 tasks.
- ``…:groups`` (hash): group (slot) index -> its final record (JSON), first writer wins.
- ``…:groups_done`` (set) and ``…:done`` (string): the barrier (see ``record_group``).
- ``…:pending`` (list) and ``…:inflight`` (set): the job's window of slots (see ``pump_slots``).
- ``…:frames``: the frame store (media/store.py).

Cluster-wide: ``zroact:deadlines`` (unfinished jobs by deadline), ``zroact:deliveries:{task}``
(poison-task counts, with a TTL) and the ``zroact:metrics:*`` counters.

A plain counter is not a safe barrier when tasks are redelivered (it fired early in our
measurements, ``CELERY-NOTES.md``); a set of finished groups plus ``SET NX`` stays exact.
"""

from __future__ import annotations

import json
import time
from functools import cache
from typing import Any

import redis

from .errors import JobNotFoundError, PoisonTaskError
from .models import JobSpec, JobStatus

# Record a group's result once, then report whether this call closed the barrier.
# Returns 0: the group was already recorded; 1: recorded; 2: recorded and the job is complete
# (this caller must enqueue finalize).
_RECORD_GROUP = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
local total = redis.call('HGET', KEYS[3], 'groups_total')
if total and redis.call('SCARD', KEYS[2]) >= tonumber(total) then
  if redis.call('SET', KEYS[4], '1', 'NX', 'EX', ARGV[3]) then return 2 end
end
return 1
"""

# Called once the total is known (end of ingest): closes the barrier if every group already ended.
_CHECK_BARRIER = """
local total = redis.call('HGET', KEYS[3], 'groups_total')
if total and redis.call('SCARD', KEYS[2]) >= tonumber(total) then
  if redis.call('SET', KEYS[4], '1', 'NX', 'EX', ARGV[1]) then return 1 end
end
return 0
"""


DEADLINES = "zroact:deadlines"
"""Sorted set of unfinished jobs, scored by the time they must have ended."""
VLM_ERRORS = "zroact:metrics:vlm_errors"
"""Hash: VLM error class name -> count, since the cluster's Redis started (for metrics)."""
JOBS_ENDED = "zroact:metrics:jobs_ended"
"""Hash: final job state -> count (for metrics)."""


# The per-job window: offer slots to a pending list; move them to the in-flight set while it has
# room. Returns the slots to send now. A set (not a counter), so a redelivered release is harmless.
_PUMP = """
if ARGV[1] ~= '' then redis.call('RPUSH', KEYS[1], ARGV[1]) end
if ARGV[2] ~= '' then redis.call('SREM', KEYS[2], ARGV[2]) end
local window = tonumber(ARGV[3])
local out = {}
while window == 0 or redis.call('SCARD', KEYS[2]) < window do
  local item = redis.call('LPOP', KEYS[1])
  if not item then break end
  redis.call('SADD', KEYS[2], item)
  table.insert(out, item)
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return out
"""


def _key(job_id: str, part: str = "") -> str:
    return f"zroact:job:{job_id}" + (f":{part}" if part else "")


@cache
def _client(url: str) -> redis.Redis:
    # One pool per process and URL; redis-py resets pools it finds inherited across a fork.
    return redis.Redis.from_url(url, decode_responses=True, health_check_interval=30)


class JobStore:
    """Reads and writes one cluster's job records."""

    def __init__(self, redis_url: str, ttl_s: int) -> None:
        self.r = _client(redis_url)
        self.ttl_s = ttl_s
        self._record = self.r.register_script(_RECORD_GROUP)
        self._check = self.r.register_script(_CHECK_BARRIER)
        self._pump = self.r.register_script(_PUMP)

    # --- job meta -------------------------------------------------------------------------
    def create(self, spec: JobSpec, deadline_s: float) -> None:
        key = _key(spec.job_id)
        pipe = self.r.pipeline()
        pipe.hset(key, mapping={"spec": spec.model_dump_json(), "state": "queued"})
        pipe.expire(key, self.ttl_s)
        pipe.zadd(DEADLINES, {spec.job_id: spec.submitted_at + deadline_s})
        pipe.execute()

    def overdue(self, now: float) -> list[str]:
        return self.r.zrangebyscore(DEADLINES, "-inf", now)

    def stage_of(self, job_id: str) -> str:
        """Where an unfinished job is: ``ingest``, ``stage 1`` or ``stage 2``."""
        meta = self.r.hmget(_key(job_id), ["groups_total", "keyframes_total"])
        if meta[0] is None:
            return "ingest"
        return "stage 1" if self.r.hlen(_key(job_id, "kf")) < int(meta[1] or 0) else "stage 2"

    def spec(self, job_id: str) -> JobSpec:
        raw = self.r.hget(_key(job_id), "spec")
        if raw is None:
            raise JobNotFoundError(job_id)
        return JobSpec.model_validate_json(raw)

    def meta(self, job_id: str) -> dict[str, str]:
        data = self.r.hgetall(_key(job_id))
        if not data:
            raise JobNotFoundError(job_id)
        return data

    def update(self, job_id: str, **fields: Any) -> None:
        encoded = {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}
        self.r.hset(_key(job_id), mapping=encoded)

    def set_state_if_active(self, job_id: str, state: str) -> None:
        """Move to ``state`` unless the job already reached a final state."""
        key = _key(job_id)
        if self.r.hget(key, "state") in ("queued", "running"):
            self.r.hset(key, "state", state)

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(_key(job_id), "abort") is not None

    def request_abort(self, job_id: str, reason: str) -> bool:
        """Ask every task of the job to stop; False if the job was already stopping."""
        return bool(self.r.hsetnx(_key(job_id), "abort", reason))

    def check_delivery(self, task_id: str, limit: int) -> None:
        """Count a delivery of ``task_id``; PoisonTaskError once it exceeds ``limit``."""
        key = f"zroact:deliveries:{task_id}"
        pipe = self.r.pipeline(transaction=False)
        pipe.incr(key)
        pipe.expire(key, self.ttl_s)
        count = pipe.execute()[0]
        if count > limit:
            raise PoisonTaskError(task_id, count)

    # --- the per-job window of slots in flight ------------------------------------------------
    def pump_slots(self, job_id: str, window: int, offer: dict | None = None,
                   release: dict | None = None) -> list[dict]:
        """Offer a new slot and/or release a finished one; the slots that may be sent now."""
        encode = lambda item: json.dumps(item, sort_keys=True) if item else ""  # noqa: E731
        items = self._pump(keys=[_key(job_id, "pending"), _key(job_id, "inflight")],
                           args=[encode(offer), encode(release), window, self.ttl_s])
        return [json.loads(i) for i in items]

    # --- Stage 1 ------------------------------------------------------------------------
    def record_keyframes(self, job_id: str, results: list[dict]) -> None:
        """Store Stage 1 results (each with a ``keyframe`` field); rewriting one is harmless."""
        key = _key(job_id, "kf")
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(key, mapping={str(r["keyframe"]): json.dumps(r) for r in results})
        pipe.expire(key, self.ttl_s)
        pipe.execute()

    def keyframes(self, job_id: str) -> dict[int, dict]:
        return {int(k): json.loads(v) for k, v in self.r.hgetall(_key(job_id, "kf")).items()}

    # --- groups and the barrier -----------------------------------------------------------
    def _barrier_keys(self, job_id: str) -> list[str]:
        return [_key(job_id, "groups"), _key(job_id, "groups_done"), _key(job_id), _key(job_id, "done")]

    def record_group(self, job_id: str, group: int, record: dict) -> int:
        """Store a group's final record (first writer wins). 2 = caller must enqueue finalize."""
        return int(self._record(keys=self._barrier_keys(job_id),
                                args=[str(group), json.dumps(record), self.ttl_s]))

    def group_done(self, job_id: str, group: int) -> bool:
        return bool(self.r.hexists(_key(job_id, "groups"), str(group)))

    def set_groups_total(self, job_id: str, total: int) -> bool:
        """Publish the group count; True if every group had already ended (enqueue finalize)."""
        self.r.hset(_key(job_id), "groups_total", total)
        return bool(self._check(keys=self._barrier_keys(job_id), args=[self.ttl_s]))

    def close_barrier(self, job_id: str) -> bool:
        """End the job now (failure, cancel, deadline); True for the one caller that won."""
        return bool(self.r.set(_key(job_id, "done"), "1", nx=True, ex=self.ttl_s))

    def groups(self, job_id: str) -> dict[int, dict]:
        return {int(k): json.loads(v) for k, v in self.r.hgetall(_key(job_id, "groups")).items()}

    # --- the report -----------------------------------------------------------------------
    def save_report(self, job_id: str, report_json: str, state: str) -> None:
        pipe = self.r.pipeline()
        pipe.hset(_key(job_id), mapping={"report": report_json, "state": state,
                                          "ended_at": time.time()})
        pipe.zrem(DEADLINES, job_id)
        pipe.hincrby(JOBS_ENDED, state, 1)
        # The report outlives the job's working records only as long as the result TTL.
        for part in ("", "kf", "groups", "groups_done", "done", "pending", "inflight"):
            pipe.expire(_key(job_id, part), self.ttl_s)
        pipe.execute()

    def count_vlm_error(self, kind: str) -> None:
        self.r.hincrby(VLM_ERRORS, kind, 1)

    def report_json(self, job_id: str) -> str | None:
        return self.r.hget(_key(job_id), "report")

    def status(self, job_id: str) -> JobStatus:
        meta = self.meta(job_id)
        pipe = self.r.pipeline(transaction=False)
        pipe.hlen(_key(job_id, "kf"))
        pipe.hvals(_key(job_id, "groups"))
        kf_done, group_records = pipe.execute()
        stage2_done = sum(1 for g in map(json.loads, group_records) if g.get("stage2"))
        submitted = json.loads(meta["spec"])["submitted_at"]
        end = float(meta.get("ended_at", time.time()))
        return JobStatus(
            job_id=job_id,
            state=meta.get("state", "queued"),
            stage1_done=kf_done,
            stage1_total=int(meta.get("keyframes_total", meta.get("keyframes_seen", 0))),
            stage2_done=stage2_done,
            stage2_total=int(meta.get("slots_total", meta.get("slots_seen", 0))),
            elapsed_s=round(max(0.0, end - submitted), 3),
        )
