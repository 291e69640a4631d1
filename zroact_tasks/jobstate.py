"""A job's records in Redis, and the barrier that lets exactly one step build its report.

Keys (all under ``zroact:job:{id}``, all with a TTL):

- ``…`` (hash): the spec, state, totals, video info, warnings, error, timestamps.
- ``…:kf`` (hash): keyframe index -> its Stage 1 result (JSON). Written by Stage 1 tasks.
- ``…:groups`` (hash): group (slot) index -> its final record (JSON), first writer wins.
- ``…:groups_done`` (set) and ``…:done`` (string): the barrier (see ``record_group``).
- ``…:pending`` (list), ``…:inflight`` and ``…:offered`` (sets): the job's window of slots (see
  ``pump_slots``); ``…:repair`` (string): the reconciler's lock (control/reconcile.py).
- ``…:frames``: the frame store (media/store.py).

Cluster-wide: ``zroact:deadlines`` (unfinished jobs by deadline), ``zroact:deliveries:{task}``
(poison-task counts, with a TTL) and the ``zroact:metrics:*`` counters. The meta hash's
``progress_at`` is when the job last recorded something (the reconciler reads it).

A plain counter is not a safe barrier when tasks are redelivered (it fired early in our
measurements, ``CELERY-NOTES.md``); a set of finished groups plus ``SET NX`` stays exact.
"""

from __future__ import annotations

import json
import time
from typing import Any


from .errors import JobNotFoundError, PoisonTaskError
from .models import JobSpec, JobStatus
from .redisconn import RETRY_BOUND_S, connect

# Record a group's result once, then report whether this call closed the barrier. A verdict
# replaces an error recorded before it (a slot's verdict is never lost to a spurious error) as
# long as the report is not being built. Returns 0: nothing changed; 1: recorded; 2: recorded
# and the job is complete (this caller must enqueue finalize).
_RECORD_GROUP = """
local total = redis.call('HGET', KEYS[3], 'groups_total')
if total and tonumber(ARGV[1]) >= tonumber(total) then return 0 end  -- past the video's end
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  local new = cjson.decode(ARGV[2])
  if new['verdict'] == nil or redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
  local old = cjson.decode(redis.call('HGET', KEYS[1], ARGV[1]))
  if old['verdict'] ~= nil then return 0 end
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
end
local seq = redis.call('HINCRBY', KEYS[3], 'event_seq', 1)
redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[6], '*', 'seq', seq, 'kind', 'slot', 'data', ARGV[5])
redis.call('EXPIRE', KEYS[5], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[3], 'progress_at', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
if total and redis.call('SCARD', KEYS[2]) >= tonumber(total) then
  if redis.call('SET', KEYS[4], '1', 'NX', 'EX', ARGV[3]) then return 2 end
end
return 1
"""

# Called once the total is known (the chunk that found the video's end): slots past the end (a
# chunk decoded beyond a frame that failed) no longer count; closes the barrier if every group
# already ended.
_CHECK_BARRIER = """
redis.call('HSET', KEYS[3], 'groups_total', ARGV[2])
local total = tonumber(ARGV[2])
for _, g in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if tonumber(g) >= total then redis.call('SREM', KEYS[2], g) end
end
if redis.call('SCARD', KEYS[2]) >= total then
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


# The per-job window: offer slots to a pending list (once each: a re-run ingest offers them
# again); move them to the in-flight set while it has room. Returns the slots to send now.
# Sets (not counters), so a redelivered release or offer is harmless.
_PUMP = """
if ARGV[1] ~= '' and redis.call('SADD', KEYS[3], ARGV[5]) == 1 then
  redis.call('RPUSH', KEYS[1], ARGV[1])
end
if ARGV[2] ~= '' then redis.call('SREM', KEYS[2], ARGV[2]) end
local window = tonumber(ARGV[3])
local out = {}
while window == 0 or redis.call('SCARD', KEYS[2]) < window do
  local item = redis.call('LPOP', KEYS[1])
  if not item then break end
  redis.call('SADD', KEYS[2], item)
  table.insert(out, item)
end
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
return out
"""

# Chunked ingest, paced: send the job's next chunk only if, with it, the slots stored but not
# through Stage 1 plus the chunks being decoded stay within LEAD chunks' worth, and the slots
# not yet ended (their keyframes wait for Stage 2) within twice that. Sending while under the
# lead let a 20-minute video hold 11 slots of a lead of 8; a VLM slower than Stage 1 made the
# keyframes waiting for it grow with the video. Called when a chunk is stored, a slot leaves the
# window and a slot ends. Returns the chunk numbers to send now (each once).
_NEXT_CHUNKS = """
if redis.call('HEXISTS', KEYS[1], 'abort') == 1 or redis.call('HEXISTS', KEYS[1], 'chunks_end') == 1 then
  return {}
end
local per, lead = tonumber(ARGV[1]), tonumber(ARGV[2])
local nxt = tonumber(redis.call('HGET', KEYS[1], 'chunk_next') or '1')
local queued = redis.call('LLEN', KEYS[2]) + redis.call('SCARD', KEYS[3])
local unended = math.max(0, redis.call('SCARD', KEYS[5]) - redis.call('SCARD', KEYS[6]))
-- A chunk offers each slot once its frames are stored: those of chunks still decoding count
-- once (queued), not twice (queued and decoding).
local early = 0
for c = math.max(0, nxt - 2 * lead - 2), nxt - 1 do
  if redis.call('SISMEMBER', KEYS[4], tostring(c)) == 0 then
    for j = c * per, c * per + per - 1 do
      early = early + redis.call('SISMEMBER', KEYS[5], tostring(j))
    end
  end
end
-- Chunks from HINT on (past the declared frame count) wait until every chunk before them is
-- stored without finding the end: a short video sends no chunk past its end.
local hint = tonumber(ARGV[3])
local out = {}
while true do
  local stored = redis.call('SCARD', KEYS[4])
  local decoding = (nxt - stored + 1) * per - early
  if decoding + queued > lead * per or decoding + unended > 2 * lead * per then break end
  if hint > 0 and nxt >= hint and stored < nxt then break end
  table.insert(out, nxt)
  nxt = nxt + 1
end
redis.call('HSET', KEYS[1], 'chunk_next', nxt)
return out
"""

# A chunk is stored: remember it (once) and, if it found the video's end, the earliest such
# chunk. Returns {chunks done, the end chunk or -1, chunks sent}.
_CHUNK_DONE = """
local added = redis.call('SADD', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[4])
if added == 1 then
  redis.call('HINCRBY', KEYS[1], 'keyframes_seen', ARGV[3])
  redis.call('HSET', KEYS[1], 'progress_at', ARGV[5])
end
if ARGV[2] ~= '' then
  local old = redis.call('HGET', KEYS[1], 'chunks_end')
  if not old or tonumber(ARGV[1]) < tonumber(old) then
    redis.call('HSET', KEYS[1], 'chunks_end', ARGV[1], 'frames_end', ARGV[2])
  end
end
return {redis.call('SCARD', KEYS[2]), tonumber(redis.call('HGET', KEYS[1], 'chunks_end') or '-1'),
        tonumber(redis.call('HGET', KEYS[1], 'chunk_next') or '1')}
"""

# Record Stage 1 results: an error never replaces a result (a duplicate run of a clip whose
# frames were already freed fails; the first run's detections stand).
_RECORD_KEYFRAMES = """
for i = 4, #ARGV, 3 do
  local changed = 0
  if ARGV[i + 2] == '1' then
    changed = redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
  else
    local old = redis.call('HGET', KEYS[1], ARGV[i])
    -- an event for a new result, or one that mends an error; a duplicate result says nothing
    if not old or cjson.decode(old)['error'] then changed = 1 end
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
  if changed == 1 then
    local seq = redis.call('HINCRBY', KEYS[2], 'event_seq', 1)
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'seq', seq, 'kind', 'keyframe',
               'data', ARGV[i + 1])
  end
end
redis.call('EXPIRE', KEYS[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'progress_at', ARGV[2])
return 1
"""

# Save the report once: a second finalize (redelivered, or re-sent by the reconciler) must not
# count the job's end twice.
_SAVE_REPORT = """
if redis.call('HSETNX', KEYS[1], 'report', ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'ended_at', ARGV[3])
local seq = redis.call('HINCRBY', KEYS[1], 'event_seq', 1)
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'seq', seq, 'kind', 'end', 'data',
           cjson.encode({status = ARGV[2]}))
redis.call('ZREM', KEYS[2], ARGV[4])
redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
return 1
"""

RESENDS = "zroact:metrics:resends"
"""Hash: what the reconciler sent again -> count (for metrics)."""
RESEND_KINDS = ("ingest", "stage1", "stage2", "finalize", "window", "lost_task", "stream")
"""``lost_task``: a message given back from a lost worker; the others: a job's missing step."""

JOB_PARTS = ("", "kf", "groups", "groups_done", "done", "pending", "inflight", "offered",
             "chunks", "events")
"""Every per-job key but the frame store's (which deletes its own)."""


def _key(job_id: str, part: str = "") -> str:
    return f"zroact:job:{job_id}" + (f":{part}" if part else "")


def events_key(job_id: str) -> str:
    """The job's Redis Stream of events (events.py): each keyframe's Stage 1 result and each
    slot's end, as recorded, then the job's end; capped at ``EVENTS_MAX`` entries."""
    return _key(job_id, "events")


class JobStore:
    """Reads and writes one cluster's job records."""

    def __init__(self, redis_url: str, ttl_s: int, retry_s: float = RETRY_BOUND_S,
                 events_max: int = 10_000) -> None:
        self.r = connect(redis_url, decode_responses=True, retry_s=retry_s)
        self.ttl_s, self.events_max = ttl_s, events_max
        self._record = self.r.register_script(_RECORD_GROUP)
        self._check = self.r.register_script(_CHECK_BARRIER)
        self._pump = self.r.register_script(_PUMP)
        self._save = self.r.register_script(_SAVE_REPORT)
        self._next_chunks = self.r.register_script(_NEXT_CHUNKS)
        self._chunk_done = self.r.register_script(_CHUNK_DONE)
        self._record_kf = self.r.register_script(_RECORD_KEYFRAMES)

    # --- job meta -------------------------------------------------------------------------
    def create(self, spec: JobSpec, deadline_s: float, stall_s: float = 0.0) -> None:
        """Record a new job; 0 = no limit, for ``deadline_s`` (absolute, from submission) and
        ``stall_s`` (without progress)."""
        key = _key(spec.job_id)
        pipe = self.r.pipeline()
        pipe.hset(key, mapping={"spec": spec.model_dump_json(), "state": "queued",
                                "progress_at": spec.submitted_at, "stall_s": stall_s,
                                "deadline_s": deadline_s})
        pipe.expire(key, self.ttl_s)
        pipe.zadd(DEADLINES, {spec.job_id: spec.submitted_at + deadline_s if deadline_s
                              else float("inf")})
        pipe.execute()

    def overdue(self, now: float) -> list[str]:
        return self.r.zrangebyscore(DEADLINES, "-inf", now)

    def progress_times(self, job_ids: list[str]) -> dict[str, tuple[float | None, float]]:
        """Job -> (last progress, its stall limit), in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(_key(job_id), ["progress_at", "stall_s"])
        out = {}
        for job_id, (progress, stall) in zip(job_ids, pipe.execute()):
            out[job_id] = (float(progress) if progress else None, float(stall or 0))
        return out

    def unfinished(self) -> list[str]:
        return self.r.zrange(DEADLINES, 0, -1)

    def touch(self, job_id: str) -> None:
        """The job made progress (the reconciler leaves it alone for ``REPAIR_QUIET_S``)."""
        self.r.hset(_key(job_id), "progress_at", time.time())

    def count_resend(self, what: str) -> None:
        self.r.hincrby(RESENDS, what, 1)

    def lock_repair(self, job_id: str, seconds: float) -> bool:
        """One repair of a job per ``seconds`` across every control worker."""
        return bool(self.r.set(_key(job_id, "repair"), "1", nx=True, ex=max(1, int(seconds))))

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

    def forgive_delivery(self, task_id: str) -> None:
        """Take back one delivery (the task was requeued on purpose, not killed)."""
        key = f"zroact:deliveries:{task_id}"
        pipe = self.r.pipeline(transaction=False)
        pipe.decr(key)
        pipe.expire(key, self.ttl_s)
        pipe.execute()

    # --- the per-job window of slots in flight ------------------------------------------------
    def pump_slots(self, job_id: str, window: int, offer: dict | None = None,
                   release: dict | None = None) -> list[dict]:
        """Offer a new slot and/or release a finished one; the slots that may be sent now."""
        encode = lambda item: json.dumps(item, sort_keys=True) if item else ""  # noqa: E731
        items = self._pump(
            keys=[_key(job_id, "pending"), _key(job_id, "inflight"), _key(job_id, "offered")],
            args=[encode(offer), encode(release), window, self.ttl_s,
                  str(offer["slot"]) if offer else ""])
        return [json.loads(i) for i in items]

    # --- chunked ingest --------------------------------------------------------------------
    def next_chunks(self, job_id: str, per_chunk: int, lead: int, hint: int = 0) -> list[int]:
        """The job's chunks to send now (``_NEXT_CHUNKS``); ``hint``: the chunks the declared
        frame count fills (0: none declared)."""
        keys = [_key(job_id), _key(job_id, "pending"), _key(job_id, "inflight"),
                _key(job_id, "chunks"), _key(job_id, "offered"), _key(job_id, "groups_done")]
        return [int(c) for c in self._next_chunks(keys=keys, args=[per_chunk, lead, hint])]

    def chunk_done(self, job_id: str, chunk: int, keyframes: int,
                   end_frame: int | None) -> tuple[int, int, int]:
        """Record a stored chunk (``end_frame``: frames decoded, if it found the video's end):
        (chunks done, the end chunk or -1, chunks sent)."""
        done, end, sent = self._chunk_done(
            keys=[_key(job_id), _key(job_id, "chunks")],
            args=[chunk, "" if end_frame is None else end_frame, keyframes, self.ttl_s,
                  time.time()])
        return int(done), int(end), int(sent)

    def chunks_stored(self, job_id: str) -> set[int]:
        return {int(c) for c in self.r.smembers(_key(job_id, "chunks"))}

    def offered(self, job_id: str) -> set[int]:
        """Slots already offered to the window (a re-run chunk does not store them again)."""
        return {int(s) for s in self.r.smembers(_key(job_id, "offered"))}

    # --- Stage 1 ------------------------------------------------------------------------
    def record_keyframes(self, job_id: str, results: list[dict]) -> None:
        """Store Stage 1 results (each with a ``keyframe`` field): a result replaces anything,
        an error replaces nothing (``_RECORD_KEYFRAMES``)."""
        args: list = [self.ttl_s, time.time(), self.events_max]
        for r in results:
            args += [str(r["keyframe"]), json.dumps(r), "1" if r.get("error") else "0"]
        self._record_kf(keys=[_key(job_id, "kf"), _key(job_id), events_key(job_id)], args=args)

    def keyframe_records(self, job_id: str, keyframes: list[int]) -> dict[int, dict]:
        """The recorded Stage 1 results of these keyframes (absent ones left out)."""
        values = self.r.hmget(_key(job_id, "kf"), [str(k) for k in keyframes])
        return {k: json.loads(v) for k, v in zip(keyframes, values) if v is not None}

    def keyframes(self, job_id: str) -> dict[int, dict]:
        return {int(k): json.loads(v) for k, v in self.r.hgetall(_key(job_id, "kf")).items()}

    # --- groups and the barrier -----------------------------------------------------------
    def _barrier_keys(self, job_id: str) -> list[str]:
        return [_key(job_id, "groups"), _key(job_id, "groups_done"), _key(job_id), _key(job_id, "done")]

    def record_group(self, job_id: str, group: int, record: dict,
                     keyframes: list[int] | None = None) -> int:
        """Store a group's final record (first writer wins). 2 = caller must enqueue finalize.
        A recorded slot is also an event (``events_key``) naming its ``keyframes``."""
        event = json.dumps({"slot": group, "keyframes": keyframes or [], **record})
        return int(self._record(keys=[*self._barrier_keys(job_id), events_key(job_id)],
                                args=[str(group), json.dumps(record), self.ttl_s, time.time(),
                                      event, self.events_max]))

    def unfinished_slots(self, job_id: str) -> int:
        """Slots offered that have not ended (Stage 1, the wait for Stage 2, Stage 2)."""
        return len(self.r.sdiff(_key(job_id, "offered"), _key(job_id, "groups_done")))

    def trim_slot(self, job_id: str, slot: int, keyframes: list[int]) -> None:
        """Forget a slot's records (a stream's rolling window); its ``groups_done`` entry stays,
        so the job's barrier still counts it."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hdel(_key(job_id, "kf"), *map(str, keyframes))
        pipe.hdel(_key(job_id, "groups"), str(slot))
        pipe.execute()

    def group_record(self, job_id: str, group: int) -> dict | None:
        raw = self.r.hget(_key(job_id, "groups"), str(group))
        return json.loads(raw) if raw else None

    def group_done(self, job_id: str, group: int) -> bool:
        return bool(self.r.hexists(_key(job_id, "groups"), str(group)))

    def set_groups_total(self, job_id: str, total: int) -> bool:
        """Publish the group count; True if every group had already ended (enqueue finalize)."""
        return bool(self._check(keys=self._barrier_keys(job_id), args=[self.ttl_s, total]))

    def close_barrier(self, job_id: str) -> bool:
        """End the job now (failure, cancel, deadline); True for the one caller that won."""
        return bool(self.r.set(_key(job_id, "done"), "1", nx=True, ex=self.ttl_s))

    def groups(self, job_id: str) -> dict[int, dict]:
        return {int(k): json.loads(v) for k, v in self.r.hgetall(_key(job_id, "groups")).items()}

    # --- the report -----------------------------------------------------------------------
    def save_report(self, job_id: str, report_json: str, state: str) -> bool:
        """Keep the report (the first one only: False if one was saved before)."""
        saved = bool(self._save(keys=[_key(job_id), DEADLINES, JOBS_ENDED, events_key(job_id)],
                                args=[report_json, state, time.time(), job_id, self.events_max]))
        # The report outlives the job's working records only as long as the result TTL.
        pipe = self.r.pipeline(transaction=False)
        for part in JOB_PARTS:
            pipe.expire(_key(job_id, part), self.ttl_s)
        pipe.execute()
        return saved

    def pending_and_inflight(self, job_id: str) -> tuple[list[dict], list[dict]]:
        pipe = self.r.pipeline(transaction=False)
        pipe.lrange(_key(job_id, "pending"), 0, -1)
        pipe.smembers(_key(job_id, "inflight"))
        pending, inflight = pipe.execute()
        return [json.loads(i) for i in pending], [json.loads(i) for i in inflight]

    def barrier_closed(self, job_id: str) -> bool:
        return bool(self.r.exists(_key(job_id, "done")))

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
            idle_s=round(max(0.0, end - float(meta.get("progress_at", submitted))), 3),
            stall_s=float(meta.get("stall_s", 0)),
            deadline_s=float(meta.get("deadline_s", 0)) or None,
        )
