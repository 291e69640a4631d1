"""The frame store: where decoded frames wait between stages.

Frames live in Redis (the cluster's one shared service), so workers on other hosts read them
without a shared disk. One hash per job, field = frame index, value = JPEG bytes, so a clip's 16
frames come back in one HMGET round trip. The hash carries a TTL as a backstop; the job's
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
"""Bytes of frames held for all jobs (the backpressure budget counts these)."""
RESERVED = "zroact:frames:reserved"
"""Hash: job -> bytes its admitted ingest still expects to write (see ``admit``). Per job, so a
redelivered ingest overwrites its own reservation and the job's end clears it."""

# Admit an ingest if its estimate fits in the budget beside what is held and reserved, or if
# nothing is held at all (a video bigger than the budget still runs, alone). What the job itself
# already holds is in its estimate (a re-run ingest must not wait for its own frames).
_ADMIT = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0') - tonumber(redis.call('GET', KEYS[3]) or '0')
local reserved = 0
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do reserved = reserved + tonumber(v) end
reserved = reserved - tonumber(redis.call('HGET', KEYS[2], ARGV[3]) or '0')
if used + reserved + tonumber(ARGV[1]) <= tonumber(ARGV[2]) or used + reserved <= 0 then
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[1])
  return 1
end
return 0
"""

# Delete a job's frames and take their bytes off the global count, once.
_DELETE = """
local n = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HDEL', KEYS[4], ARGV[1])
if n > 0 then redis.call('DECRBY', KEYS[3], n) end
return n
"""


# Store frames once: a field already there (a re-run ingest, a chunk sent again) is neither
# rewritten nor counted again, and nothing is stored once the job has ended (its barrier is
# closed), so the held-bytes counters only ever count what is really held.
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

# Recount the global counters from the jobs that really exist: the held bytes of unfinished
# jobs, and no reservation of a job that has ended. Anything a crash left behind goes.
_RECONCILE = """
local jobs = redis.call('ZRANGE', KEYS[1], 0, -1)
local live, used = {}, 0
for _, job in ipairs(jobs) do
  live[job] = true
  used = used + tonumber(redis.call('GET', 'zroact:job:' .. job .. ':frames_bytes') or '0')
end
local dropped = 0
local reserved = redis.call('HKEYS', KEYS[3])
for _, job in ipairs(reserved) do
  if not live[job] then redis.call('HDEL', KEYS[3], job); dropped = dropped + 1 end
end
local before = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('SET', KEYS[2], used)
return {before, used, dropped}
"""


def _bytes_key(job_id: str) -> str:
    return f"zroact:job:{job_id}:frames_bytes"


class FrameStore:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._redis = client  # must not decode responses: values are bytes
        self._ttl_s = ttl_s
        self._admit = client.register_script(_ADMIT)
        self._delete = client.register_script(_DELETE)
        self._put = client.register_script(_PUT)
        self._reconcile = client.register_script(_RECONCILE)

    def put_many(self, job_id: str, frames: dict[int, bytes], kind: str = "full") -> int:
        """Store frames not stored yet; the bytes added, or -1 if the job has ended."""
        if not frames:
            return 0
        args: list = [self._ttl_s]
        for i, data in frames.items():
            args += [frame_field(i, kind), data]
        return int(self._put(keys=[frames_key(job_id), _bytes_key(job_id), USED,
                                   f"zroact:job:{job_id}:done"], args=args))

    def get_many(self, job_id: str, indices: list[int], kind: str = "full") -> dict[int, bytes]:
        """Every requested frame, in one round trip; FrameMissingError if any is absent."""
        unique = sorted(set(indices))
        values = self._redis.hmget(frames_key(job_id), [frame_field(i, kind) for i in unique])
        missing = [i for i, v in zip(unique, values) if v is None]
        if missing:
            raise FrameMissingError(job_id, missing)
        return dict(zip(unique, values))

    def delete(self, job_id: str) -> None:
        self._delete(keys=[frames_key(job_id), _bytes_key(job_id), USED, RESERVED], args=[job_id])

    def used_bytes(self) -> int:
        return int(self._redis.get(USED) or 0)

    def admit(self, job_id: str, estimate: int, budget: int) -> bool:
        """Reserve ``estimate`` bytes for a job's ingest if the budget has room (``_ADMIT``)."""
        return bool(self._admit(keys=[USED, RESERVED, _bytes_key(job_id)],
                                args=[estimate, budget, job_id]))

    def reconcile(self, unfinished_key: str) -> tuple[int, int, int]:
        """Recount ``USED`` from the unfinished jobs (the sorted set at ``unfinished_key``) and
        drop reservations of ended jobs: (bytes before, bytes now, reservations dropped)."""
        before, used, dropped = self._reconcile(keys=[unfinished_key, USED, RESERVED])
        return int(before), int(used), int(dropped)

    def held_bytes(self, job_id: str) -> int:
        return int(self._redis.get(_bytes_key(job_id)) or 0)

    def release(self, job_id: str) -> None:
        """The job's ingest ended: its frames are now counted as held, not reserved."""
        self._redis.hdel(RESERVED, job_id)
