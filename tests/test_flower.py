"""Real Flower against the session cluster's Redis: a job's tasks in ``/api/tasks`` and ``/metrics``.

Flower runs as in docker-compose.yml: basic auth, persistent state in a shelve file.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from zroact_tasks import pipeline
from zroact_tasks.local import free_port

from .helpers import skip_unless_ci

try:  # not importorskip at module level: in CI a Flower that does not import must fail, not skip
    importlib.import_module("flower")
    FLOWER_ERROR = None
except ImportError as exc:
    FLOWER_ERROR = f"flower does not import: {exc} (pip install -e '.[flower]')"


@pytest.fixture(autouse=True)
def _flower_installed():
    if FLOWER_ERROR is not None:
        skip_unless_ci(FLOWER_ERROR)

AUTH = ("zroact", "flower-test-pw")
# The short video: 47 frames -> 4 keyframes -> slot 0 (3 keyframes, Stage 2) + slot 1 (Stage 1 only).
SHORT_JOB_TASKS = {pipeline.INGEST: 1, pipeline.DETECT: 4, pipeline.SLOT_READY: 2,
                   pipeline.JUDGE: 1, pipeline.FINALIZE: 1}


def poll(fetch, ready, timeout: float, what: str):
    """Call ``fetch()`` until ``ready(result)``; fail with the last result after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = fetch()
        if ready(result):
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; last: {result!r}"[:2000])
        time.sleep(0.2)


@contextmanager
def flower(redis_url: str, db: Path, log: Path):
    """Flower on a free loopback port; yields its base URL; SIGTERM (state saved) at the end."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    env["ZROACT_REDIS_URL"] = redis_url
    cmd = [sys.executable, "-m", "celery", "-A", "zroact_tasks.app", "flower", f"--port={port}",
           "--address=127.0.0.1", f"--basic-auth={AUTH[0]}:{AUTH[1]}", "--persistent=True",
           f"--db={db}"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def health():
        if proc.poll() is not None:
            pytest.fail(f"flower exited {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            return httpx.get(f"{base}/healthcheck", timeout=2).status_code
        except httpx.TransportError:
            return None

    try:
        poll(health, lambda code: code == 200, 60, "flower to answer")
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def flower_metrics(base: str) -> list:
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def job_tasks(base: str, job_id: str) -> dict[str, dict]:
    response = httpx.get(f"{base}/api/tasks", params={"search": job_id}, auth=AUTH, timeout=5)
    response.raise_for_status()
    return response.json()


def test_flower_shows_a_jobs_tasks_and_counts_them(cluster, assets, tmp_path):
    workers, client = cluster
    with flower(client.settings.redis_url, tmp_path / "flower.db", tmp_path / "flower.log") as base:
        # The API needs the credentials; the health check and the metrics do not.
        assert httpx.get(f"{base}/api/tasks", timeout=5).status_code == 401
        assert httpx.get(f"{base}/api/tasks", auth=(AUTH[0], "wrong"), timeout=5).status_code == 401
        assert httpx.get(f"{base}/api/tasks", auth=AUTH, timeout=5).status_code == 200

        # Flower follows the event stream once every worker's heartbeat shows it online.
        names = {w.name for w in workers.workers}
        poll(lambda: {s.labels["worker"] for s in flower_metrics(base)
                      if s.name == "flower_worker_online" and s.value == 1},
             lambda online: names <= online, 30, f"workers {sorted(names)} online in flower")

        job = client.submit(assets["short_video"])
        assert job.wait(timeout=120).status == "succeeded"

        # Task ids carry the job id, so a plain search for it finds them all (and only them).
        expected = sum(SHORT_JOB_TASKS.values())
        tasks = poll(lambda: job_tasks(base, job.id),
                     lambda t: len(t) >= expected and all(v["state"] == "SUCCESS" for v in t.values()),
                     30, f"job {job.id}'s {expected} tasks in /api/tasks")
        assert Counter(t["name"] for t in tasks.values()) == SHORT_JOB_TASKS
        assert all(task_id.startswith(f"{job.id}:") for task_id in tasks)
        assert {task_id.split(":", 1)[1] for task_id in tasks} == {
            "ingest", "s1:9", "s1:19", "s1:29", "s1:39", "slot:0", "slot:1", "s2:0", "finalize"}
        assert all(job.id in t["args"] for t in tasks.values())  # the job id is the first argument
        assert {t["worker"].split("-", 1)[0] for t in tasks.values()} == {"control", "stage1", "stage2"}

        # /metrics counts the same tasks: flower_events_total{task, type, worker} (summed over workers).
        everything = httpx.get(f"{base}/api/tasks", auth=AUTH, timeout=5).json().values()
        succeeded_in_api = Counter(t["name"] for t in everything if t["state"] == "SUCCESS")
        samples = flower_metrics(base)
        succeeded, runtimes = Counter(), Counter()
        for s in samples:
            if s.name == "flower_events_total" and s.labels["type"] == "task-succeeded":
                succeeded[s.labels["task"]] += s.value
            elif s.name == "flower_task_runtime_seconds_count":
                runtimes[s.labels["task"]] += s.value
        for name, n in SHORT_JOB_TASKS.items():
            assert succeeded[name] >= n and runtimes[name] >= n, name
            assert succeeded[name] == succeeded_in_api[name], name  # nothing else ran meanwhile
        sent = sum(s.value for s in samples if s.name == "flower_events_total"
                   and s.labels["type"] == "task-sent" and s.labels["task"] == pipeline.DETECT)
        assert sent >= 4  # task_send_sent_event: Flower sees tasks before they start

    # --persistent: a restarted Flower still knows the job's tasks (compose keeps the db in a volume).
    with flower(client.settings.redis_url, tmp_path / "flower.db", tmp_path / "flower.log") as base:
        restored = poll(lambda: job_tasks(base, job.id), lambda t: len(t) >= expected, 15,
                        "the saved tasks after a restart")
        assert Counter(t["name"] for t in restored.values()) == SHORT_JOB_TASKS
