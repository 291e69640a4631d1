"""The frame store: where decoded frames wait between stages.

Frames live in Redis (the cluster's one shared service), so workers on other hosts read them
without a shared disk. One hash per job, field = frame index, value = the encoded frame (Stage 1's
copies raw + zstd at the model's input size, Stage 2's keyframes JPEG), so a clip's 16 frames come back
in one HMGET round trip. The hash carries a TTL as a backstop; the job's
finalize step deletes it.
"""

from __future__ import annotations

import redis

from ..errors import FrameMissingError


FIELD_PREFIX = {"full": "", "stage1": "s1:"}


def frames_key(job_id: str) -> str:
    return f"zroact:job:{job_id}:frames"


def frame_field(index: int, kind: str = "full") -> str:
    return f"{FIELD_PREFIX[kind]}{index}"


USED = "zroact:frames:bytes"
"""Bytes of frames held for all jobs."""
RESERVED = "zroact:frames:reserved"
"""Hash: admitted job -> its footprint (``admit``). A job counts in the budget for the larger of
its footprint and what it really holds, from admission until its frames are deleted."""
WAITING = "zroact:frames:waiting"
"""Sorted set: jobs waiting for admission, by priority then submission (``admit``/``wake``)."""
FOOTPRINTS = "zroact:frames:footprints"
"""Hash: waiting job -> the footprint it asked admission for."""

# Room in the budget: what the admitted jobs count (each the larger of its footprint and its
# held bytes) plus the candidate's footprint, or nothing admitted at all (a job bigger than the
# budget still runs, alone).
_FITS = """
local function fits(footprint, budget)
  local counted, any = 0, false
  local admitted = redis.call('HGETALL', KEYS[2])
  for i = 1, #admitted, 2 do
    local held = tonumber(redis.call('GET', 'zroact:job:' .. admitted[i] .. ':frames_bytes') or '0')
    counted = counted + math.max(tonumber(admitted[i + 1]), held)
    any = true
  end
  return (not any) or counted + footprint <= budget
end
"""

# Admit a job if it is first in line (priority, then submission) and fits; else it joins the
# line and is woken by ``wake`` when a job ends. An admitted job asking again (a redelivered
# first chunk) is admitted.
_ADMIT = _FITS + """
if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 1 then return 1 end
redis.call('ZADD', KEYS[3], 'NX', ARGV[4], ARGV[3])
local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
if head == ARGV[3] and fits(tonumber(ARGV[1]), tonumber(ARGV[2])) then
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[3])
  return 1
end
redis.call('HSET', KEYS[4], ARGV[3], ARGV[1])
return 0
"""

# Admit waiting jobs in order while the first in line fits (no overtaking: no starvation).
_WAKE = _FITS + """
local woken = {}
while true do
  local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  if not head then break end
  local footprint = tonumber(redis.call('HGET', KEYS[4], head) or '0')
  if not fits(footprint, tonumber(ARGV[1])) then break end
  redis.call('HSET', KEYS[2], head, footprint)
  redis.call('ZREM', KEYS[3], head)
  redis.call('HDEL', KEYS[4], head)
  table.insert(woken, head)
end
return woken
"""

# Delete a job's frames and take their bytes off the global count, once; mark the job closed
# so that no late write (a chunk still decoding) stores frames again.
_DELETE = """
local n = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('DEL', KEYS[1], KEYS[2], KEYS[7])
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
redis.call('HDEL', KEYS[6], ARGV[1])
redis.call('SET', KEYS[8], '1', 'EX', ARGV[2])
if n > 0 then redis.call('DECRBY', KEYS[3], n) end
return n
"""


# Store frames once: a field already there (a re-run chunk) is neither rewritten nor counted
# again, and nothing is stored once the job has ended, so the held-bytes counters only ever
# count what is really held.
_PUT = """
if redis.call('EXISTS', KEYS[4]) == 1 then return -1 end
local added = 0
for i = 2, #ARGV, 2 do
  if redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) == 1 then
    added = added + string.len(ARGV[i + 1])
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
if added > 0 then
  redis.call('INCRBY', KEYS[2], added)
  redis.call('INCRBY', KEYS[3], added)
end
redis.call('EXPIRE', KEYS[2], ARGV[1])
return added
"""

# Free frames no unfinished slot needs. ARGV: ttl, the slot whose Stage 1 just ended (or -1),
# then triples (field, lo, hi): the field goes once every slot lo..hi has ended Stage 1
# (lo = -1: at once). Atomic, so two slots ending together cannot both keep a shared frame.
_FREE = """
if tonumber(ARGV[2]) >= 0 then
  redis.call('SADD', KEYS[4], ARGV[2])
  redis.call('EXPIRE', KEYS[4], ARGV[1])
end
local freed = 0
for i = 3, #ARGV, 3 do
  local lo, hi, gone = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2]), true
  if lo >= 0 then
    for slot = lo, hi do
      if redis.call('SISMEMBER', KEYS[4], slot) == 0 then gone = false; break end
    end
  end
  if gone then
    local n = redis.call('HSTRLEN', KEYS[1], ARGV[i])
    if n > 0 then
      redis.call('HDEL', KEYS[1], ARGV[i])
      freed = freed + n
    end
  end
end
if freed > 0 then
  redis.call('DECRBY', KEYS[2], freed)
  redis.call('DECRBY', KEYS[3], freed)
end
return freed
"""

# Recount the global counter from the jobs that really exist (ARGV: the unfinished jobs), and
# drop admissions and waiting places of jobs that have ended. Anything a crash left behind goes.
_RECONCILE = """
local live, used = {}, 0
for _, job in ipairs(ARGV) do
  live[job] = true
  used = used + tonumber(redis.call('GET', 'zroact:job:' .. job .. ':frames_bytes') or '0')
end
local dropped = 0
for _, key in ipairs({KEYS[2], KEYS[4]}) do
  for _, job in ipairs(redis.call('HKEYS', key)) do
    if not live[job] then redis.call('HDEL', key, job); dropped = dropped + 1 end
  end
end
for _, job in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  if not live[job] then redis.call('ZREM', KEYS[3], job) end
end
local before = tonumber(redis.call('GET', KEYS[1]) or '0')
redis.call('SET', KEYS[1], used)
return {before, used, dropped}
"""
def _bytes_key(job_id: str) -> str:
    return f"zroact:job:{job_id}:frames_bytes"


def _closed_key(job_id: str) -> str:
    return f"zroact:job:{job_id}:frames_closed"


def _ended_key(job_id: str) -> str:
    return f"zroact:job:{job_id}:s1_ended"


class FrameStore:
    """Frames and their accounting (admission, budget), on one Redis: the cluster's, or
    ``FRAMES_URL``'s. Nothing here reads the job records, so the two can be apart."""

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._redis = client  # must not decode responses: values are bytes
        self._ttl_s = ttl_s
        self._admit = client.register_script(_ADMIT)
        self._wake = client.register_script(_WAKE)
        self._delete = client.register_script(_DELETE)
        self._put = client.register_script(_PUT)
        self._free = client.register_script(_FREE)
        self._reconcile = client.register_script(_RECONCILE)

    def put_many(self, job_id: str, frames: dict[int, bytes], kind: str = "full") -> int:
        """Store frames not stored yet; the bytes added, or -1 if the job has ended."""
        if not frames:
            return 0
        args: list = [self._ttl_s]
        for i, data in frames.items():
            args += [frame_field(i, kind), data]
        return int(self._put(keys=[frames_key(job_id), _bytes_key(job_id), USED,
                                   _closed_key(job_id)], args=args))

    def get_many(self, job_id: str, indices: list[int], kind: str = "full") -> dict[int, bytes]:
        """Every requested frame, in one round trip; FrameMissingError if any is absent."""
        unique = sorted(set(indices))
        values = self._redis.hmget(frames_key(job_id), [frame_field(i, kind) for i in unique])
        missing = [i for i, v in zip(unique, values) if v is None]
        if missing:
            raise FrameMissingError(job_id, missing)
        return dict(zip(unique, values))

    def free(self, job_id: str, *, ended_slot: int = -1,
             stage1: dict[int, tuple[int, int]] | None = None, full: list[int] = ()) -> int:
        """Free frames no unfinished slot needs: ``stage1`` maps a frame to the slots (lo, hi)
        whose clips use it (freed once all of them ended Stage 1, ``ended_slot`` included);
        ``full`` keyframes go at once. The bytes freed."""
        args: list = [self._ttl_s, ended_slot]
        for index, (lo, hi) in (stage1 or {}).items():
            args += [frame_field(index, "stage1"), lo, hi]
        for index in full:
            args += [frame_field(index, "full"), -1, -1]
        return int(self._free(keys=[frames_key(job_id), _bytes_key(job_id), USED,
                                    _ended_key(job_id)], args=args))

    def delete(self, job_id: str) -> None:
        self._delete(keys=[frames_key(job_id), _bytes_key(job_id), USED, RESERVED, WAITING,
                           FOOTPRINTS, _ended_key(job_id), _closed_key(job_id)],
                     args=[job_id, self._ttl_s])

    def used_bytes(self) -> int:
        return int(self._redis.get(USED) or 0)

    def admit(self, job_id: str, footprint: int, budget: int, *, priority: int,
              submitted_at: float) -> bool:
        """Admit the job now, or put it in line (False): see ``_ADMIT``."""
        rank = priority * 1e11 + submitted_at  # priority first, then first come first served
        return bool(self._admit(keys=[USED, RESERVED, WAITING, FOOTPRINTS],
                                args=[footprint, budget, job_id, repr(rank)]))

    def wake(self, budget: int) -> list[str]:
        """Admit waiting jobs in line order while they fit: the jobs to start now."""
        woken = self._wake(keys=[USED, RESERVED, WAITING, FOOTPRINTS], args=[budget])
        return [w.decode() if isinstance(w, bytes) else w for w in woken]

    def waiting(self) -> list[str]:
        """Jobs in line for admission, first first."""
        return [w.decode() for w in self._redis.zrange(WAITING, 0, -1)]

    def is_waiting(self, job_id: str) -> bool:
        return self._redis.zscore(WAITING, job_id) is not None

    def reconcile(self, unfinished: list[str]) -> tuple[int, int, int]:
        """Recount ``USED`` from the unfinished jobs and drop admissions of ended jobs:
        (bytes before, bytes now, entries dropped)."""
        before, used, dropped = self._reconcile(keys=[USED, RESERVED, WAITING, FOOTPRINTS],
                                                args=unfinished)
        return int(before), int(used), int(dropped)

    def held_bytes(self, job_id: str) -> int:
        return int(self._redis.get(_bytes_key(job_id)) or 0)
