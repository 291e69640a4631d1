"""Task timestamps from Celery's own events (tests and bench), and the latencies derived from them.

A receiver thread records ``task-sent``, ``task-started`` and ``task-succeeded``/``-failed``
events (all workers and clients send them: ``task_send_sent_event`` and ``-E``). From those:

- dispatch latency = start - max(enqueue, the moment a worker slot came free);
- handoff = a slot's last Stage 1 result -> its Stage 2 task enqueued.

Task ids are derived from the job id (``{job}:s2:0``), so a task that runs twice (a redelivery)
keeps one :class:`TaskTimes`: ``started``/``ended`` are the last run's, while ``starts``,
``start_times``, ``succeeded``, ``failed`` and ``revoked`` count every event. Tests count runs
with those, never with the number of ids.
"""

from __future__ import annotations

import heapq
import threading
from dataclasses import dataclass, field

import numpy as np
from celery import Celery


@dataclass
class TaskTimes:
    id: str
    name: str = ""
    sent: float | None = None
    started: float | None = None
    ended: float | None = None
    hostname: str = ""
    start_times: list[float] = field(default_factory=list)  # one per task-started event
    start_hosts: list[str] = field(default_factory=list)
    succeeded: int = 0
    failed: int = 0
    revoked: int = 0

    @property
    def starts(self) -> int:
        """How many times the task started (a redelivered task starts more than once)."""
        return len(self.start_times)


@dataclass
class EventLog:
    tasks: dict[str, TaskTimes] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_event(self, event: dict) -> None:
        kind, uuid = event.get("type", ""), event.get("uuid")
        if not uuid or not kind.startswith("task-"):
            return
        with self.lock:
            t = self.tasks.setdefault(uuid, TaskTimes(uuid))
            if not t.name and event.get("name"):  # task-received carries it too
                t.name = event["name"]
            if kind == "task-sent":
                t.sent, t.name = event["timestamp"], event.get("name", t.name)
            elif kind == "task-started":
                t.started, t.hostname = event["timestamp"], event.get("hostname", "")
                t.start_times.append(event["timestamp"])
                t.start_hosts.append(t.hostname)
            elif kind in ("task-succeeded", "task-failed"):
                t.ended = event["timestamp"]
                if kind == "task-succeeded":
                    t.succeeded += 1
                else:
                    t.failed += 1
            elif kind == "task-revoked":
                t.revoked += 1

    def starts(self, name: str | None = None, prefix: str = "") -> dict[str, int]:
        """Task id -> how many times it started, for tasks named ``name`` whose id starts with
        ``prefix`` (a job id) and that started at least once."""
        with self.lock:
            return {t.id: t.starts for t in self.tasks.values()
                    if t.starts and (name is None or t.name == name) and t.id.startswith(prefix)}

    def started_after(self, moment: float, prefix: str = "") -> list[tuple[str, str, float]]:
        """(id, name, start time) of every start later than ``moment`` (``time.time()``)."""
        with self.lock:
            return sorted(((t.id, t.name, s) for t in self.tasks.values() if t.id.startswith(prefix)
                           for s in t.start_times if s > moment), key=lambda x: x[2])


class EventRecorder:
    """Capture a cluster's task events in a background thread while a benchmark runs."""

    def __init__(self, app: Celery) -> None:
        self.app, self.log = app, EventLog()
        self._receiver = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-events", daemon=True)

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self._receiver = self.app.events.Receiver(conn, handlers={"*": self.log.on_event})
            self._ready.set()
            self._receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self) -> EventRecorder:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(5)


def dispatch_latencies(tasks: list[TaskTimes], concurrency: dict[str, int]) -> list[float]:
    """Per task: start - max(enqueue, the moment a slot of its worker came free) (seconds)."""
    by_worker: dict[str, list[TaskTimes]] = {}
    for t in tasks:
        if t.sent is not None and t.started is not None and t.ended is not None:
            by_worker.setdefault(t.hostname, []).append(t)
    latencies = []
    for host, items in by_worker.items():
        slots = [float("-inf")] * concurrency.get(host, 1)  # when each pool slot was last freed
        heapq.heapify(slots)
        for t in sorted(items, key=lambda t: t.started):
            free_at = heapq.heappop(slots)
            latencies.append(t.started - max(t.sent, free_at))
            heapq.heappush(slots, t.ended)
    return latencies


def handoffs(tasks: dict[str, TaskTimes], job_ids: list[str], stride: int, slot_size: int) -> list[float]:
    """Per slot: last Stage 1 result of its keyframes -> its Stage 2 task enqueued (seconds)."""
    out = []
    for job in job_ids:
        ends: dict[int, float] = {}
        for tid, t in tasks.items():
            if tid.startswith(f"{job}:s1:") and t.ended is not None:
                position = (int(tid.rsplit(":", 1)[1]) + 1) // stride - 1
                slot = position // slot_size
                ends[slot] = max(ends.get(slot, 0.0), t.ended)
        for slot, last_stage1 in ends.items():
            judge = tasks.get(f"{job}:s2:{slot}")
            if judge is not None and judge.sent is not None:
                out.append(judge.sent - last_stage1)
    return out


def percentiles_ms(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    p50, p99 = np.percentile(np.asarray(values) * 1000.0, [50, 99])
    return round(float(p50), 2), round(float(p99), 2)


def busy_fraction(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Fraction of [start, end] covered by at least one interval."""
    covered, cursor = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, cursor), min(b, end)
        if b > a:
            covered += b - a
            cursor = b
    return covered / (end - start) if end > start else 0.0
