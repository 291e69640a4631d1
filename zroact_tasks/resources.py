"""Per-process handles that tasks share: settings, job records, the frame store.

Built lazily on first use, so each prefork child makes its own connections after the fork.
"""

from __future__ import annotations

from functools import cache

from .config import get_settings
from .jobstate import JobStore
from .media.store import FrameStore
from .redisconn import connect


@cache
def jobs() -> JobStore:
    s = get_settings()
    return JobStore(s.redis_url, s.result_ttl_s, s.redis_retry_s, s.events_max)


@cache
def frames() -> FrameStore:
    s = get_settings()
    # The TTL is a backstop (finalize deletes the frames): each write renews it, so it only has
    # to outlast a job that stopped moving.
    return FrameStore(connect(s.frames_url or s.redis_url, retry_s=s.redis_retry_s),
                      ttl_s=int(s.job_stall_s) + 3600)
