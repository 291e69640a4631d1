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


class FrameStore:
    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self._redis = client  # must not decode responses: values are bytes
        self._ttl_s = ttl_s

    def put_many(self, job_id: str, frames: dict[int, bytes], kind: str = "full") -> None:
        if not frames:
            return
        key = frames_key(job_id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(key, mapping={frame_field(i, kind): data for i, data in frames.items()})
        pipe.expire(key, self._ttl_s)
        pipe.execute()

    def get_many(self, job_id: str, indices: list[int], kind: str = "full") -> dict[int, bytes]:
        """Every requested frame, in one round trip; FrameMissingError if any is absent."""
        unique = sorted(set(indices))
        values = self._redis.hmget(frames_key(job_id), [frame_field(i, kind) for i in unique])
        missing = [i for i, v in zip(unique, values) if v is None]
        if missing:
            raise FrameMissingError(job_id, missing)
        return dict(zip(unique, values))

    def delete(self, job_id: str) -> None:
        self._redis.delete(frames_key(job_id))
