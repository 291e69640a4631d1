"""Redis clients that ride out a Redis restart: timeouts on every socket, retries with backoff.

Every Redis client zroact makes (job records, frame store, the client's and the API's) comes
from ``connect``, and Celery's broker and result backend get the same values (celeryconfig.py).
A restart of Redis (seconds; longer while it loads a big AOF) is then a pause, not an error:
each command is retried for about ``RETRY_BOUND_S`` before the error reaches the caller. Only
after that does a task give its message back to the queue (``TransientTask``).
"""

from __future__ import annotations

from functools import cache

import redis
from kombu.exceptions import OperationalError
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, ReadOnlyError
from redis.retry import Retry

SOCKET_TIMEOUT_S = 15.0
"""A command whose reply takes longer than this fails (and is retried): a silent network."""
CONNECT_TIMEOUT_S = 5.0
HEALTH_CHECK_S = 15
"""A pooled connection idle this long is pinged before use (a restart closed it)."""
BACKOFF_BASE_S, BACKOFF_CAP_S = 0.25, 4.0
RETRY_BOUND_S = 60.0
"""How long one command keeps retrying by default (``ZROACT_REDIS_RETRY_S``): longer than a
Redis restart with AOF."""


def retries_for(bound_s: float) -> int:
    """How many backoff sleeps (0.25 s doubling, capped at 4 s) add up to ``bound_s``."""
    total, n = 0.0, 0
    while total < bound_s:
        total += min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**n)
        n += 1
    return n

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,  # refused, reset, closed; BusyLoadingError (loading the AOF) too
    redis.TimeoutError,
    ReadOnlyError,  # a replica promoted late, or a primary turned read-only
    OperationalError,  # kombu's wrapper of the same errors (publishing a task)
)
"""Errors that mean "Redis is not there right now", never that the work is wrong."""


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS)


def client_options(retry_s: float = RETRY_BOUND_S) -> dict:
    """Keyword arguments for ``redis.Redis``: timeouts, keepalive, retries for ``retry_s``."""
    return {
        "socket_timeout": SOCKET_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_keepalive": True,
        "health_check_interval": HEALTH_CHECK_S,
        "retry": Retry(ExponentialBackoff(cap=BACKOFF_CAP_S, base=BACKOFF_BASE_S),
                       retries_for(retry_s)),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError, BusyLoadingError,
                           ReadOnlyError],
    }


@cache
def connect(url: str, decode_responses: bool = False,
            retry_s: float = RETRY_BOUND_S) -> redis.Redis:
    """One pool per process, URL and options; redis-py resets pools inherited across a fork."""
    return redis.Redis.from_url(url, decode_responses=decode_responses,
                                **client_options(retry_s))
