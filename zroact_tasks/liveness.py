"""Which worker holds which task, and whether that worker is still alive.

With ``acks_late`` a task a worker has taken (running, prefetched, or waiting for its ETA)
stays in kombu's ``unacked`` hash until it is acked. If the whole worker dies, Redis gives those
messages back only after the visibility timeout, which must exceed the longest task. To get
them back sooner, every worker's main process

- keeps a heartbeat key ``zroact:worker:{boot}`` alive (``boot`` is new at each start, so a
  worker restarted under the same name is a different holder), and
- records, for each message it receives, ``zroact:held:{delivery_tag}`` -> its boot id.

Control workers then give back every unacked message whose holder's heartbeat has expired
(control/reconcile.py). A holder that is only slow is never mistaken for a dead one as long as
its heartbeat thread runs: it beats every ``WORKER_LOST_S / 6``.

The same thread watches the worker's consumer. After a Redis restart a Celery worker can stay
connected and idle while its queue fills (kombu's BRPOP never re-armed: celery#9054, #10205,
reproduced here about one restart in twenty under load). A worker with a free pool slot that
received nothing for ``CONSUMER_STALL_S`` while its queues held ready messages asks itself for
a warm shutdown; its supervisor (compose's restart policy, ``zroact run``) starts it again.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid

from celery.signals import task_received, worker_init, worker_ready, worker_shutdown
from celery.worker import state as worker_state

from .config import get_settings
from .redisconn import TRANSIENT_ERRORS, connect

log = logging.getLogger(__name__)

BOOT_ID = uuid.uuid4().hex
"""This process's identity as a holder of tasks (a worker's main process receives them)."""
_stop = threading.Event()


def worker_key(boot_id: str) -> str:
    return f"zroact:worker:{boot_id}"


def held_key(delivery_tag: str) -> str:
    return f"zroact:held:{delivery_tag}"


def beat_interval(lost_after_s: float) -> float:
    return max(0.2, lost_after_s / 6)


def _redis():
    return connect(get_settings().redis_url)


class ConsumerWatch:
    """Whether this worker's consumer stopped taking messages it has room for."""

    def __init__(self, app, queues: list[str], capacity: int, stall_s: float) -> None:
        self.app, self.queues, self.capacity, self.stall_s = app, queues, capacity, stall_s
        self.lists: list[str] | None = None
        self.since: float | None = None  # first seen with ready messages and a free slot
        self.last_received = time.monotonic()

    def _ready_lists(self) -> list[str]:
        if self.lists is None:  # kombu keeps one list per queue and priority step
            with self.app.connection_for_write() as conn:
                channel = conn.default_channel
                self.lists = list(dict.fromkeys(channel._q_for_pri(q, p) for q in self.queues
                                                for p in channel.priority_steps))
        return self.lists

    def ready(self) -> int:
        pipe = _redis().pipeline(transaction=False)
        for name in self._ready_lists():
            pipe.llen(name)
        return sum(pipe.execute())

    def stalled(self, now: float) -> bool:
        """True once ready messages waited ``stall_s`` with a free slot and none received."""
        try:
            waiting = self.ready()
        except TRANSIENT_ERRORS:  # Redis away: the consumer is reconnecting, not stalled
            self.since = None
            return False
        if not waiting or len(worker_state.reserved_requests) >= self.capacity:
            self.since = None
            return False
        if self.since is None or self.last_received >= self.since:
            self.since = now
            return False
        return now - self.since >= self.stall_s


_watch: ConsumerWatch | None = None


def _beat(hostname: str, lost_after_s: float) -> None:
    ttl_ms = int(lost_after_s * 1000)
    while True:
        try:
            _redis().set(worker_key(BOOT_ID), hostname, px=ttl_ms)
            from .control import media_roots  # here: both import this module
            from .stage1 import registry

            registry.publish_serving(_redis(), BOOT_ID)  # a Stage 1 worker's model
            media_roots.publish_serving(_redis(), BOOT_ID)  # a control worker's MEDIA_ROOT
        except TRANSIENT_ERRORS as exc:  # Redis away: the next beat tries again
            log.warning("heartbeat not written: %s", type(exc).__name__)
        watch = _watch
        if watch is not None and watch.stalled(time.monotonic()):
            log.error("worker %s took no task for %g s while its queues held some (its broker "
                      "consumer stopped); shutting down to be restarted", hostname,
                      watch.stall_s)
            os.kill(os.getpid(), signal.SIGTERM)  # warm: kombu gives back what it holds
            return
        if _stop.wait(beat_interval(lost_after_s)):
            return


@worker_init.connect  # before the consumer takes any message
def _start(sender=None, **_: object) -> None:
    hostname = getattr(sender, "hostname", "") or ""
    threading.Thread(target=_beat, args=(hostname, get_settings().worker_lost_s),
                     name="zroact-heartbeat", daemon=True).start()


@worker_ready.connect
def _watch_consumer(sender=None, **_: object) -> None:
    global _watch
    consumer = getattr(sender, "task_consumer", None)
    if consumer is None:
        return
    capacity = getattr(getattr(sender, "controller", None), "concurrency", None) or 1
    _watch = ConsumerWatch(sender.app, [q.name for q in consumer.queues], int(capacity),
                           get_settings().consumer_stall_s)


@task_received.connect
def _held(request=None, **_: object) -> None:
    if _watch is not None:
        _watch.last_received = time.monotonic()
    tag = getattr(getattr(request, "message", None), "delivery_tag", None)
    if not tag:
        return
    try:
        _redis().set(held_key(tag), BOOT_ID, ex=get_settings().visibility_timeout_s)
    except TRANSIENT_ERRORS:  # unrecorded: the visibility timeout still brings it back
        log.warning("holder of %s not recorded (Redis unavailable)", request.id)


@worker_shutdown.connect
def _stop_beating(**_: object) -> None:
    # A worker that stops cleanly gives back what it did not run (kombu restores its unacked
    # messages on close); anything left after that is the reconciler's to give back.
    _stop.set()
    try:
        _redis().delete(worker_key(BOOT_ID))
    except TRANSIENT_ERRORS:
        pass
