"""Which model the Stage 1 queue serves, published by its workers for the rest of the cluster.

Ingest resizes frames to the model's input once, at decode time (yowo.model_frame), but control
workers never load the model. So every Stage 1 worker publishes what it loaded:

- ``MODEL``: the model the queue serves (JSON of ``ModelInfo``), read by ingest when it plans a
  job. It outlives its workers: a queue scaled to zero still has a model, and a job submitted
  then is planned for it.
- ``SERVERS``: hash, worker boot id (liveness.BOOT_ID) -> the model it serves. A worker starting
  with another model while a worker whose heartbeat is alive serves a different one is refused
  (``check_joins``): one queue, one model, or clips would be judged by whichever took them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import redis

from ..errors import ModelConflictError
from ..liveness import worker_key

MODEL = "zroact:stage1:model"
SERVERS = "zroact:stage1:servers"
TTL_S = 30 * 86400
"""Every key expires (nothing is kept forever); each beat renews both, so only a queue with no
Stage 1 worker for 30 days forgets its model (its next job then waits for a worker)."""


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of the cluster needs to know of a Stage 1 model."""

    name: str
    width: int
    height: int
    clip_length: int
    num_classes: int
    fingerprint: str
    """sha256 of the model's files (an ONNX model and its external data), or the detector
    class and options of another runtime: two workers agree only if these are equal."""

    @property
    def input_size(self) -> tuple[int, int]:
        return self.width, self.height

    def describe(self) -> str:
        return (f"{self.name} ({self.width}x{self.height}, T={self.clip_length}, "
                f"{self.num_classes} classes, {self.fingerprint[:12]})")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> "ModelInfo":
        return cls(**json.loads(text))


def files_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def current(r: redis.Redis) -> ModelInfo | None:
    """The model the Stage 1 queue serves, or None if no Stage 1 worker ever started."""
    raw = r.get(MODEL)
    return ModelInfo.from_json(raw) if raw else None


def live_servers(r: redis.Redis) -> dict[str, tuple[str, ModelInfo]]:
    """Boot id -> (worker host, model) for the workers whose heartbeat is alive; the entries of
    dead workers are dropped on the way."""
    entries = r.hgetall(SERVERS)
    if not entries:
        return {}
    boots = [b.decode() if isinstance(b, bytes) else b for b in entries]
    hosts = r.mget([worker_key(b) for b in boots])
    live, dead = {}, []
    for boot, host, raw in zip(boots, hosts, entries.values()):
        if host is None:
            dead.append(boot)
        else:
            live[boot] = (host.decode() if isinstance(host, bytes) else host,
                          ModelInfo.from_json(raw))
    if dead:
        r.hdel(SERVERS, *dead)
    return live


def check_joins(r: redis.Redis, info: ModelInfo, boot_id: str = "") -> None:
    """ModelConflictError if a live worker serves another model on the Stage 1 queue."""
    for boot, (host, other) in live_servers(r).items():
        if boot != boot_id and other.fingerprint != info.fingerprint:
            raise ModelConflictError(
                f"this worker's model {info.describe()} differs from {other.describe()} that "
                f"{host or 'a live worker'} serves on the stage1 queue; one model per queue: "
                f"stop those workers first")


def publish(r: redis.Redis, info: ModelInfo, boot_id: str) -> None:
    """Record that this worker serves ``info`` and that the queue now serves it."""
    pipe = r.pipeline()
    pipe.hset(SERVERS, boot_id, info.to_json())
    pipe.expire(SERVERS, TTL_S)
    pipe.set(MODEL, info.to_json(), ex=TTL_S)
    pipe.execute()


serving: ModelInfo | None = None
"""Set by ``zroact worker stage1`` in the worker's main process before it starts: what the
heartbeat publishes (again at every beat, so a Redis that lost its data learns it back)."""


def publish_serving(r: redis.Redis, boot_id: str) -> None:
    if serving is not None:
        publish(r, serving, boot_id)
