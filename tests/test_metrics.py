"""The Prometheus exporter, scraped over HTTP while real jobs run on the session cluster."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from celeryconfig import QUEUES
from zroact_tasks import pipeline
from zroact_tasks.client import Client
from zroact_tasks.config import Settings
from zroact_tasks.local import EmbeddedRedis, free_port
from zroact_tasks.metrics import EventConsumer, MetricsExporter

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=10)
    response.raise_for_status()
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_until(url: str, ready, timeout: float = 30.0) -> Samples:
    """Scrape until ``ready(samples)`` (task events arrive asynchronously), then return the scrape."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture(scope="module")
def exporter(cluster):
    _, client = cluster
    with MetricsExporter(client.settings, port=0) as exp:
        # Workers send a heartbeat event every 2 s: the first one shows the receiver is subscribed.
        ready = scrape_until(exp.url, lambda s: value(s, "zroact_exporter_events_total") > 0)
        assert value(ready, "zroact_exporter_events_total") > 0, "the exporter receives no events"
        yield exp


def runtime_count(samples: Samples, task: str) -> float:
    return value(samples, "zroact_task_runtime_seconds_count", stage=task.split(".")[1], task=task)


# The short video: 47 frames -> 4 keyframes -> slot 0 (3 keyframes, Stage 2) + slot 1 (Stage 1 only).
SHORT_JOB_TASKS = {pipeline.INGEST: 1, pipeline.DETECT: 4, pipeline.SLOT_READY: 2,
                   pipeline.JUDGE: 1, pipeline.FINALIZE: 1}


def test_a_job_shows_in_queue_job_and_latency_metrics(exporter, client, assets):
    before = scrape(exporter.url)
    report = client.submit(assets["short_video"]).wait(timeout=120)
    assert report.status == "succeeded"
    after = scrape_until(exporter.url, lambda s: all(
        runtime_count(s, task) - runtime_count(before, task) >= n for task, n in SHORT_JOB_TASKS.items()))

    for task, n in SHORT_JOB_TASKS.items():
        assert runtime_count(after, task) - runtime_count(before, task) == n, task
        assert delta(before, after, "zroact_tasks_total", task=task, outcome="succeeded") == n, task
    stages = {"control": 4, "stage1": 4, "stage2": 1}
    for stage, n in stages.items():
        assert delta(before, after, "zroact_task_queue_wait_seconds_count", stage=stage) == n, stage
        assert value(after, "zroact_task_queue_wait_seconds_sum", stage=stage) >= 0
    # Every observation falls in some bucket: +Inf holds the count.
    assert value(after, "zroact_task_runtime_seconds_bucket", stage="stage1", task=pipeline.DETECT,
                 le="+Inf") == runtime_count(after, pipeline.DETECT)
    assert value(after, "zroact_task_runtime_seconds_sum", stage="stage1", task=pipeline.DETECT) > 0

    for queue in QUEUES:
        assert ("zroact_queue_depth", (("queue", queue),)) in after, queue
        assert value(after, "zroact_queue_depth", queue=queue) == 0, queue
    assert value(after, "zroact_jobs_ended_total", state="succeeded") >= 1
    assert delta(before, after, "zroact_jobs_ended_total", state="succeeded") == 1
    assert value(after, "zroact_redis_up") == 1


def test_a_vlm_error_is_counted(exporter, client, standin, assets):
    before = scrape(exporter.url)
    standin.set_fault("garbage", count=1)
    report = client.submit(assets["short_video"]).wait(timeout=120)
    assert report.status == "failed"  # its one slot failed
    after = scrape_until(exporter.url, lambda s: delta(
        before, s, "zroact_vlm_errors_total", kind="VLMResponseError") >= 1)
    assert delta(before, after, "zroact_vlm_errors_total", kind="VLMResponseError") == 1
    assert delta(before, after, "zroact_jobs_ended_total", state="failed") == 1
    # The slot's error is recorded by a task that itself succeeds: wait for the judge's outcome,
    # whichever it is, then check it.
    def judged(s: Samples) -> float:
        return sum(delta(before, s, "zroact_tasks_total", task=pipeline.JUDGE, outcome=outcome)
                   for outcome in ("succeeded", "failed"))

    ended = scrape_until(exporter.url, lambda s: judged(s) >= 1)
    assert judged(ended) == 1, "no outcome of the judge task was counted"
    assert delta(before, ended, "zroact_tasks_total", task=pipeline.JUDGE, outcome="failed") == 0
    assert delta(before, ended, "zroact_tasks_total", task=pipeline.JUDGE, outcome="succeeded") == 1


def test_running_jobs_and_every_ending_are_counted(exporter, client, standin, assets, tmp_path):
    """zroact_jobs{state="running"} while a job runs; zroact_jobs_ended_total for cancelled and
    failed jobs; zroact_vlm_errors_total for a VLM that stays unavailable."""
    before = scrape(exporter.url)
    standin.hold()
    held = len(standin.requests)
    job = client.submit(assets["short_video"])
    assert standin.wait_for_requests(held + 1, timeout=60)  # running: its slot is at Stage 2
    during = scrape(exporter.url)
    assert value(during, "zroact_jobs", state="running") == value(before, "zroact_jobs", state="running") + 1
    assert job.cancel()
    standin.release()
    assert job.wait(timeout=60).status == "cancelled"

    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video")
    assert client.submit(bad).wait(timeout=60).status == "failed"

    standin.set_fault("503")  # every try: the session cluster's one retry fails too
    report = client.submit(assets["short_video"]).wait(timeout=120)
    assert report.status == "failed" and "VLM HTTP 503" in report.slots[0].error

    after = scrape_until(exporter.url, lambda s: delta(
        before, s, "zroact_vlm_errors_total", kind="VLMUnavailableError") >= 1)
    assert value(after, "zroact_jobs", state="running") == value(before, "zroact_jobs", state="running")
    for state, ended in (("cancelled", 1), ("failed", 2), ("completed_with_errors", 0),
                         ("succeeded", 0)):  # failed: the bad video, and the job no VLM answered
        assert delta(before, after, "zroact_jobs_ended_total", state=state) == ended, state
    assert delta(before, after, "zroact_vlm_errors_total", kind="VLMUnavailableError") == 1


def test_queue_depth_counts_messages_no_worker_took(redis_server, assets):
    """A Redis database without workers: what is sent stays queued, and the exporter counts it."""
    url = redis_server.url.rsplit("/", 1)[0] + "/10"
    r = redis.Redis.from_url(url)
    r.flushdb()
    client = Client(settings=Settings(redis_url=url))
    try:
        with MetricsExporter(client.settings, port=0) as exp:
            empty = scrape(exp.url)
            assert [value(empty, "zroact_queue_depth", queue=q) for q in QUEUES] == [0, 0, 0]
            job = client.submit(assets["short_video"])
            # kombu keeps priorities 3, 6 and 9 in lists of their own: those count too.
            client.app.send_task(pipeline.JUDGE, args=(job.id, 0, [9], {}), priority=9)
            samples = scrape(exp.url)
            assert value(samples, "zroact_queue_depth", queue="control") == 1
            assert value(samples, "zroact_queue_depth", queue="stage1") == 0
            assert value(samples, "zroact_queue_depth", queue="stage2") == 1
            assert value(samples, "zroact_jobs", state="queued") == 1
            assert value(samples, "zroact_jobs", state="running") == 0
    finally:
        client.close()
        r.flushdb()
        r.close()


def test_the_endpoint_answers_when_redis_is_down_and_logs_no_password(caplog):
    url = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    with caplog.at_level(logging.INFO), MetricsExporter(Settings(redis_url=url), port=0) as exp:
        samples = scrape(exp.url)
    assert value(samples, "zroact_redis_up") == 0
    assert ("zroact_queue_depth", (("queue", "control"),)) not in samples  # unknown, not 0
    assert "s3cret-pw" not in caplog.text
    assert "redis://:**@127.0.0.1" in caplog.text


def test_the_exporter_process_serves_until_sigterm():
    """``python -m zroact_tasks.metrics`` (what ``zroact metrics`` runs) on a Redis with a password."""
    with EmbeddedRedis(password="s3cret-pw") as server:
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "zroact_tasks.metrics", "--port", str(port)],
                                env={**os.environ, "ZROACT_REDIS_URL": server.url},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
                    break
                except httpx.TransportError:
                    assert proc.poll() is None and time.monotonic() < deadline, "exporter did not start"
                    time.sleep(0.1)
            assert "zroact_redis_up 1.0" in text and 'zroact_queue_depth{queue="stage2"} 0.0' in text
            assert "_created" not in text
            proc.terminate()
            output, _ = proc.communicate(timeout=15)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, output
    assert "s3cret-pw" not in output and f"redis://:**@127.0.0.1:{server.port}/0" in output


def test_events_out_of_order_still_give_one_wait_and_one_runtime():
    """task-sent comes over the publisher's connection and may arrive after the worker's events."""
    registry = CollectorRegistry()
    consumer = EventConsumer(app=None, registry=registry)
    for event in [
        {"type": "task-received", "uuid": "j:s2:0", "name": pipeline.JUDGE, "timestamp": 100.5},
        {"type": "task-started", "uuid": "j:s2:0", "timestamp": 100.5},
        {"type": "task-succeeded", "uuid": "j:s2:0", "runtime": 2.0, "timestamp": 102.5},
        {"type": "task-sent", "uuid": "j:s2:0", "name": pipeline.JUDGE, "timestamp": 100.25},
        {"type": "worker-heartbeat", "hostname": "stage2@h", "timestamp": 103.0},
        {"type": "task-sent", "uuid": "j:s1:9", "name": pipeline.DETECT, "timestamp": 100.0},
        {"type": "task-started", "uuid": "j:s1:9", "timestamp": 101.0},
        {"type": "task-failed", "uuid": "j:s1:9", "timestamp": 101.5},
    ]:
        consumer.on_event(event)
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "zroact_task_queue_wait_seconds_count", stage="stage2") == 1
    assert value(samples, "zroact_task_queue_wait_seconds_sum", stage="stage2") == 0.25
    assert value(samples, "zroact_task_runtime_seconds_sum", stage="stage2", task=pipeline.JUDGE) == 2.0
    assert value(samples, "zroact_tasks_total", task=pipeline.JUDGE, outcome="succeeded") == 1
    # A failure carries no runtime: it is taken from task-started.
    assert value(samples, "zroact_task_runtime_seconds_sum", stage="stage1", task=pipeline.DETECT) == 0.5
    assert value(samples, "zroact_tasks_total", task=pipeline.DETECT, outcome="failed") == 1
    assert value(samples, "zroact_exporter_events_total") == 8
