"""Which MEDIA_ROOT the live control workers resolve job paths against, published by each
worker's heartbeat, so that the HTTP API can refuse jobs no control worker could open (an API
that stores uploads under its MEDIA_ROOT while the workers have another, or none, would accept
every upload and every job would then fail "no such file")."""

from __future__ import annotations

import json

import redis

from ..liveness import worker_key

KEY = "zroact:control:media_roots"
"""Hash: control worker boot id -> {"root": its resolved MEDIA_ROOT or null}."""
TTL_S = 30 * 86400
"""Renewed each beat; entries of dead workers are dropped when read."""

serving: str | None = None
"""Set by ``zroact worker control`` before it starts ("" = no MEDIA_ROOT): what the heartbeat
publishes (liveness.py). None in any other process."""


def publish(r: redis.Redis, boot_id: str, root: str) -> None:
    pipe = r.pipeline()
    pipe.hset(KEY, boot_id, json.dumps({"root": root or None}))
    pipe.expire(KEY, TTL_S)
    pipe.execute()


def publish_serving(r: redis.Redis, boot_id: str) -> None:
    if serving is not None:
        publish(r, boot_id, serving)


def live_roots(r: redis.Redis) -> dict[str, str | None]:
    """Boot id -> MEDIA_ROOT of every control worker whose heartbeat is alive."""
    entries = {(k.decode() if isinstance(k, bytes) else k): v for k, v in r.hgetall(KEY).items()}
    if not entries:
        return {}
    hosts = r.mget([worker_key(b) for b in entries])
    live = {b: json.loads(v)["root"] for (b, v), h in zip(entries.items(), hosts) if h is not None}
    dead = [b for b, h in zip(entries, hosts) if h is None]
    if dead:
        r.hdel(KEY, *dead)
    return live


def mismatch(r: redis.Redis, root: str) -> str | None:
    """Why no live control worker can open files under ``root`` (None when one can, or when no
    control worker is up: a job then waits in the queue for one)."""
    live = live_roots(r)
    if not live or root in live.values():
        return None
    theirs = sorted({str(v) if v else "none" for v in live.values()})
    return (f"no control worker resolves paths under this API's MEDIA_ROOT {root} (theirs: "
            f"{', '.join(theirs)}): give the control workers the same ZROACT_MEDIA_ROOT")
