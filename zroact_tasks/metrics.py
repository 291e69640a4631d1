"""A Prometheus exporter for a zroact cluster: queue depth, jobs, VLM errors, task latencies.

Flower has no queue-length metric; this adds it. ``ClusterCollector`` reads Redis at each scrape
(queues, jobs by state, VLM errors); ``EventConsumer`` follows Celery's task events in a thread,
as Flower does, and feeds the latency histograms (whose counts start when the exporter starts).
``serve()`` runs it as a process (``python -m zroact_tasks.metrics``); ``MetricsExporter`` runs
it in-process. The metrics are listed in docs/metrics.md.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections import OrderedDict
from typing import Self

import prometheus_client
import redis
from kombu.utils.url import maybe_sanitize_url
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

import celeryconfig

from .app import make_app
from .config import Settings, get_settings
from .jobstate import DEADLINES, JOBS_ENDED, RESEND_KINDS, RESENDS, VLM_ERRORS
from .models import FINAL_STATES

log = logging.getLogger(__name__)

DEFAULT_PORT = 9808
PRIORITY_SEP, PRIORITY_STEPS = "\x06\x16", (3, 6, 9)  # kombu.transport.redis (step 0 = plain name)
JOB_SCAN_LIMIT = 10_000  # unfinished jobs whose state is read per scrape (earliest deadlines)
TRACKED_TASKS = 50_000  # tasks remembered (id -> name, sent, started); then the oldest are dropped
BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)


class ClusterCollector:
    """Reads Redis at every scrape. Its registry needs ``auto_describe=False`` (no early scrape)."""

    def __init__(self, redis_url: str, queues: tuple[str, ...] = celeryconfig.QUEUES,
                 key_prefix: str = "") -> None:
        self.r = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=5,
                                      socket_connect_timeout=5, socket_keepalive=True)
        self.queues, self.key_prefix = queues, key_prefix

    def collect(self):
        up = GaugeMetricFamily("zroact_redis_up", "1 if the last scrape could read Redis.")
        try:
            families = self._families()
        except redis.RedisError as exc:
            log.warning("metrics scrape: cannot read Redis: %s", type(exc).__name__)
            families = []
        up.add_metric([], 1.0 if families else 0.0)
        yield up
        yield from families

    def _families(self) -> list:
        pipe = self.r.pipeline(transaction=False)
        for queue in self.queues:
            name = self.key_prefix + queue
            for key in [name] + [f"{name}{PRIORITY_SEP}{p}" for p in PRIORITY_STEPS]:
                pipe.llen(key)
        pipe.zrange(DEADLINES, 0, JOB_SCAN_LIMIT - 1)
        pipe.hgetall(JOBS_ENDED)
        pipe.hgetall(VLM_ERRORS)
        pipe.hgetall(RESENDS)
        *lengths, unfinished, ended, vlm_errors, resends = pipe.execute()

        n = 1 + len(PRIORITY_STEPS)  # lists per queue
        depth = {queue: sum(lengths[i * n:(i + 1) * n]) for i, queue in enumerate(self.queues)}
        pipe = self.r.pipeline(transaction=False)
        for job_id in unfinished:
            pipe.hget(f"zroact:job:{job_id}", "state")
        found = pipe.execute() if unfinished else []
        return [
            _family(GaugeMetricFamily, "zroact_queue_depth", "Messages waiting in a queue.", "queue", depth),
            _family(GaugeMetricFamily, "zroact_jobs", f"Unfinished jobs by state (the first {JOB_SCAN_LIMIT}"
                    " by deadline).", "state", {s: found.count(s) for s in ("queued", "running")}),
            _family(CounterMetricFamily, "zroact_jobs_ended", "Jobs ended, by final state.", "state",
                    {s: int(ended.get(s, 0)) for s in sorted(FINAL_STATES | set(ended))}),
            _family(CounterMetricFamily, "zroact_vlm_errors", "Stage 2 VLM errors, by error class.",
                    "kind", {k: int(v) for k, v in sorted(vlm_errors.items())}),
            _family(CounterMetricFamily, "zroact_resends", "Steps the reconciler sent again, by "
                    "what was missing.", "what", {w: int(resends.get(w, 0)) for w in sorted(
                        set(RESEND_KINDS) | set(resends))}),
        ]


def _family(kind, name: str, doc: str, label: str, values: dict):
    family = kind(name, doc, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


class EventConsumer:
    """Follows Celery task events in a thread and records latencies and outcomes."""

    def __init__(self, app, registry: CollectorRegistry) -> None:
        self.app = app
        self.runtime = Histogram("zroact_task_runtime_seconds", "Task run time (started -> ended).",
                                 ["stage", "task"], buckets=BUCKETS, registry=registry)
        self.queue_wait = Histogram("zroact_task_queue_wait_seconds", "Task queue wait "
                                    "(sent -> started).", ["stage"], buckets=BUCKETS, registry=registry)
        self.outcomes = Counter("zroact_tasks", "Tasks ended, by outcome.", ["task", "outcome"],
                                registry=registry)
        self.received = Counter("zroact_exporter_events", "Celery events received.", registry=registry)
        self._tasks: OrderedDict[str, dict] = OrderedDict()  # uuid -> name, sent, started
        self._receiver = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zroact-metrics-events", daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(timeout)

    def _run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                with self.app.connection_for_read() as conn:
                    conn.ensure_connection(max_retries=1)
                    self._receiver = self.app.events.Receiver(conn, handlers={"*": self.on_event})
                    delay = 1.0
                    self._receiver.capture(limit=None, timeout=None, wakeup=True)
            except Exception as exc:  # noqa: BLE001 - a lost broker must not end the thread
                if self._stop.is_set():
                    break
                log.warning("metrics events: %s; reconnecting in %.0f s", type(exc).__name__, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)

    def on_event(self, event: dict) -> None:
        """One task's events may come out of order: task-sent is the publisher's, the rest the worker's."""
        self.received.inc()
        kind, uuid = event.get("type", ""), event.get("uuid")
        if not uuid or not kind.startswith("task-"):
            return
        task = self._tasks.get(uuid)
        if task is None:  # kept after it ends too (a late task-sent); the oldest are dropped
            task = self._tasks[uuid] = {"name": "", "sent": None, "started": None, "waited": False}
            if len(self._tasks) > TRACKED_TASKS:
                self._tasks.popitem(last=False)
        task["name"] = event.get("name") or task["name"]
        now = event.get("timestamp", time.time())
        if kind in ("task-sent", "task-started"):
            task[kind.removeprefix("task-")] = now
            if task["sent"] is not None and task["started"] is not None and not task["waited"]:
                task["waited"] = True
                wait = max(0.0, task["started"] - task["sent"])
                self.queue_wait.labels(stage_of(task["name"])).observe(wait)
        elif kind in ("task-succeeded", "task-failed", "task-revoked", "task-rejected", "task-retried"):
            self._ended(task, kind.removeprefix("task-"), event, now)

    def _ended(self, task: dict, outcome: str, event: dict, now: float) -> None:
        name = task["name"] or "unknown"
        runtime = event.get("runtime")
        if runtime is None and task["started"] is not None and outcome != "revoked":
            runtime = now - task["started"]
        if runtime is not None:
            self.runtime.labels(stage_of(name), name).observe(max(0.0, runtime))
        self.outcomes.labels(name, outcome).inc()
        if outcome == "retried":  # it runs again under the same id (its new task-sent may be in)
            task["started"], task["waited"] = None, False


def stage_of(task_name: str) -> str:
    """``zroact.stage1.detect_clips`` -> ``stage1``; anything else -> ``unknown``."""
    parts = task_name.split(".")
    return parts[1] if len(parts) == 3 and parts[0] == "zroact" else "unknown"


class MetricsExporter:
    """The collector and the event consumer behind one ``/metrics`` HTTP endpoint."""

    def __init__(self, settings: Settings, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
        self.settings, self.host, self.port = settings, host, port
        self.app = make_app(settings)
        self.registry = CollectorRegistry(auto_describe=False)
        prefix = self.app.conf.broker_transport_options.get("global_keyprefix", "")
        self.registry.register(ClusterCollector(settings.redis_url, key_prefix=prefix))
        self.events = EventConsumer(self.app, self.registry)
        self._server = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def start(self) -> Self:
        self._server, _ = start_http_server(self.port, addr=self.host, registry=self.registry)
        self.port = self._server.server_address[1]  # the real one when port 0 was asked
        self.events.start()
        log.info("metrics for %s on %s", maybe_sanitize_url(self.settings.redis_url), self.url)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.events.stop()
        self.app.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(settings: Settings | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    """Run the exporter until SIGTERM or Ctrl-C."""
    prometheus_client.disable_created_metrics()  # no ``*_created`` series (process-wide)
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    exporter = MetricsExporter(settings or get_settings(), host, port).start()
    try:
        while not stop.wait(1.0):
            pass
    finally:  # Ctrl-C too
        exporter.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m zroact_tasks.metrics",
                                     description="Prometheus exporter for a zroact cluster.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: all).")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--redis-url", help="The cluster's Redis [ZROACT_REDIS_URL].")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    settings = settings.model_copy(update={"redis_url": args.redis_url}) if args.redis_url else settings
    try:
        serve(settings, args.host, args.port)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
