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
"""

from __future__ import annotations

import logging
import threading
import uuid

from celery.signals import task_received, worker_init, worker_shutdown

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


def _beat(hostname: str, lost_after_s: float) -> None:
    ttl_ms = int(lost_after_s * 1000)
    while True:
        try:
            _redis().set(worker_key(BOOT_ID), hostname, px=ttl_ms)
        except TRANSIENT_ERRORS as exc:  # Redis away: the next beat tries again
            log.warning("heartbeat not written: %s", type(exc).__name__)
        if _stop.wait(beat_interval(lost_after_s)):
            return


@worker_init.connect  # before the consumer takes any message
def _start(sender=None, **_: object) -> None:
    hostname = getattr(sender, "hostname", "") or ""
    threading.Thread(target=_beat, args=(hostname, get_settings().worker_lost_s),
                     name="zroact-heartbeat", daemon=True).start()


@task_received.connect
def _held(request=None, **_: object) -> None:
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
