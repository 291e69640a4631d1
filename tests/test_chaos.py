"""Faults together: SIGKILLs of pool children and of whole workers, a Redis restart, a flaky VLM.

A real redis-server with AOF (``appendfsync everysec``), real workers under LocalCluster's
supervisor (which restarts a dead worker, as compose's ``restart: unless-stopped`` does), and the
vLLM stand-in answering 503 to 15 % of requests. Every job must reach its report soon after the
last fault, none by its deadline, every slot once with a verdict or a permanent error, and the
cluster's books must balance afterwards. Runs are counted from task-started events, not ids.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

import pytest
import redis

from zroact_tasks.errors import JobTimeoutError
from zroact_tasks.jobstate import RESENDS
from zroact_tasks.local import EmbeddedRedis
from zroact_tasks.media.store import RESERVED, USED
from zroact_tasks.testing.sample_media import make_video
from zroact_tasks.testing.vllm_standin import expected_content

from .conftest import start_cluster
from .helpers import validate_report
from .test_kills import pool_children

pytestmark = pytest.mark.chaos  # minutes of faults: run after the main suite (.ci/run)

# Errors a slot or keyframe may end with: causes that no retry can cure.
PERMANENT = ("VLM HTTP 503", "deliveries; not run again")
NOT_ALLOWED = ("ConnectionError", "TimeoutError", "Connection refused", "redis", "Redis",
               "BusyLoading", "ReadOnly", "OperationalError", "slot failed: {")

RECOVERY_S = 60.0
"""Every report must arrive within this after the last fault."""


@dataclass
class ChaosLog:
    faults: list[tuple[float, str]] = field(default_factory=list)

    def add(self, what: str) -> None:
        self.faults.append((time.monotonic(), what))

    @property
    def last(self) -> float:
        return max(t for t, _ in self.faults)


@pytest.fixture(scope="module")
def chaos_videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("chaos")
    return [make_video(d / f"v{n}.mp4", frames=n, colour=colour)
            for n, colour in ((132, "red"), (170, "green"), (211, "blue"), (250, "red"))]


def _kill_loop(cluster, rng: random.Random, until: float, log: ChaosLog, stop: threading.Event,
               min_gap: float, max_gap: float) -> None:
    while not stop.wait(rng.uniform(min_gap, max_gap)) and time.monotonic() < until:
        worker = rng.choice([w for w in cluster.workers if w.alive] or [None])
        if worker is None:
            continue
        children = pool_children(worker.proc.pid)
        if children and rng.random() < 0.6:
            os.kill(rng.choice(children), signal.SIGKILL)
            log.add(f"SIGKILL child of {worker.role}")
        else:
            worker.signal(signal.SIGKILL)
            log.add(f"SIGKILL {worker.role}")


def run_chaos(seed: int, videos, standin, assets, tmp_path, *, jobs: int, chaos_s: float,
              redis_kill: str, env_extra: dict | None = None, gaps=(2.0, 5.0)) -> dict:
    rng = random.Random(seed)
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = EmbeddedRedis(appendonly=True, workdir=workdir).start()
    standin.reset()
    standin.set_fault("503", share=0.15, seed=seed)
    env = {"ZROACT_MODEL": str(assets["model"]), "ZROACT_LABELS": str(assets["labels"]),
           "ZROACT_VLM_URL": standin.url, **(env_extra or {})}
    cluster, client = start_cluster(server.url, env, tmp_path / "logs")
    log, stop = ChaosLog(), threading.Event()
    try:
        submitted = [client.submit(videos[rng.randrange(len(videos))]) for _ in range(jobs)]
        time.sleep(1.5)  # past appendfsync everysec: the submissions are on disk
        start = time.monotonic()
        killer = threading.Thread(target=_kill_loop, args=(cluster, rng, start + chaos_s, log,
                                                           stop, *gaps), daemon=True)
        killer.start()
        time.sleep(rng.uniform(0.3, 0.6) * chaos_s)
        if redis_kill == "graceful":
            server.stop()  # SIGTERM: Redis writes its AOF on the way down
        else:
            server.proc.send_signal(signal.SIGKILL)  # up to 1 s of writes lost
            server.proc.wait()
        log.add(f"Redis {redis_kill} stop")
        time.sleep(rng.uniform(1.0, 3.0))
        server = EmbeddedRedis(port=server.port, appendonly=True, workdir=workdir).start()
        log.add("Redis back")
        killer.join(chaos_s + 10)
        stop.set()
        reports, ended_at = {}, {}
        for job in submitted:
            remaining = log.last + RECOVERY_S - time.monotonic()
            try:
                reports[job.id] = job.wait(timeout=max(1.0, remaining))
            except JobTimeoutError:
                raise AssertionError(diagnose(server.url, submitted)) from None
            ended_at[job.id] = time.monotonic()
        standin.set_fault(None)
        resends = redis.Redis.from_url(server.url, decode_responses=True).hgetall(RESENDS)
        result = {"seed": seed, "reports": reports, "faults": log.faults,
                  "recovery_s": max(ended_at.values()) - log.last,
                  "requests": list(standin.requests), "resends": resends}
        summary(result, redis_kill)
        assert result["recovery_s"] <= RECOVERY_S
        check_reports(result)
        check_books(server.url)
        return result
    finally:
        stop.set()
        cluster.stop()
        client.close()
        server.stop()


def diagnose(url: str, jobs) -> str:
    """What the unfinished jobs are waiting for, for a failure message."""
    r = redis.Redis.from_url(url, decode_responses=True)
    lines = []
    for job in jobs:
        meta = r.hgetall(f"zroact:job:{job.id}")
        if "report" in meta:
            continue
        status = job.status()
        age = time.time() - float(meta.get("progress_at", 0))
        lines.append(f"{job.id} {status.state} s1 {status.stage1_done}/{status.stage1_total} "
                     f"s2 {status.stage2_done}/{status.stage2_total} idle {age:.0f} s "
                     f"inflight {r.smembers(f'zroact:job:{job.id}:inflight')} "
                     f"pending {r.llen(f'zroact:job:{job.id}:pending')}")
    queues = {k: r.llen(k) for k in r.scan_iter("*") if r.type(k) == "list"}
    return (f"{len(lines)} unfinished; queues {queues}; unacked {r.hlen('unacked')}; "
            f"resends {r.hgetall(RESENDS)}\n" + "\n".join(lines[:20]))


def check_books(url: str, timeout: float = 20.0) -> None:
    """No frames, no reservations, counters at 0, every per-job key with a TTL."""
    r = redis.Redis.from_url(url, decode_responses=True)
    deadline = time.monotonic() + timeout
    while True:  # the reconciler recounts within RECONCILE_INTERVAL_S
        frames = list(r.scan_iter("zroact:job:*:frames"))
        state = (frames, r.hlen(RESERVED), int(r.get(USED) or 0), r.zcard("zroact:deadlines"))
        if state == ([], 0, 0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert state == ([], 0, 0, 0), f"frames, reservations, held bytes, unfinished: {state}"
    no_ttl = [k for k in r.scan_iter("zroact:job:*") if r.ttl(k) == -1]
    no_ttl += [k for k in r.scan_iter("zroact:held:*") if r.ttl(k) == -1]
    no_ttl += [k for k in r.scan_iter("celery-task-meta-*") if r.ttl(k) == -1]
    assert not no_ttl, f"keys without a TTL: {no_ttl[:10]}"


def check_reports(result: dict) -> None:
    answered = result["requests"]
    for job_id, report in result["reports"].items():
        data = report.model_dump(mode="json")
        validate_report(data)
        assert report.status in ("succeeded", "completed_with_errors"), (job_id, data["error"])
        slots = [s.slot for s in report.slots]
        assert slots == sorted(set(slots)), f"a slot twice: {slots}"
        for kf in report.keyframes:
            assert kf.detections or kf.error, kf
            if kf.error:
                assert any(p in kf.error for p in PERMANENT), kf.error
        for slot in report.slots:
            if slot.error:
                assert any(p in slot.error for p in PERMANENT), slot.error
                assert not any(p in slot.error for p in NOT_ALLOWED), slot.error
            else:
                # The verdict is the stand-in's answer to a request for this very slot.
                assert any(slot.verdict.model_dump() == json.loads(expected_content(r))
                           for r in answered
                           if f"frame {slot.keyframes[0]}" in json.dumps(r.get("messages", ""))), slot


def summary(result: dict, label: str) -> str:
    reports = result["reports"].values()
    errors = sum(1 for r in reports for s in r.slots if s.error)
    line = (f"chaos {label} seed {result['seed']}: {len(result['reports'])} jobs, "
            f"{len(result['faults'])} faults, {sum(len(r.slots) for r in reports)} slots "
            f"({errors} with a permanent error), last report {result['recovery_s']:.1f} s "
            f"after the last fault; re-sent {result['resends'] or 'nothing'}")
    print(line)
    return line


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_chaos_with_a_graceful_redis_restart(seed, chaos_videos, standin, assets, tmp_path):
    """Shipped defaults (visibility timeout 1200 s): a lost worker's tasks come back through
    its expired heartbeat, not the visibility timeout."""
    run_chaos(seed, chaos_videos, standin, assets, tmp_path, jobs=10, chaos_s=30.0,
              redis_kill="graceful")


@pytest.mark.parametrize("seed", [11, 12])
def test_chaos_with_a_sigkilled_redis(seed, chaos_videos, standin, assets, tmp_path):
    """Redis SIGKILLed: up to 1 s of acknowledged writes is lost (a publish, a record, an ack),
    which the reconciler repairs once a job has been quiet for REPAIR_QUIET_S. Shipped
    defaults."""
    run_chaos(seed, chaos_videos, standin, assets, tmp_path, jobs=10, chaos_s=30.0,
              redis_kill="sigkill")


@pytest.mark.soak
@pytest.mark.timeout(600)
def test_soak_hundred_jobs_through_chaos_at_a_lower_rate(chaos_videos, standin, assets, tmp_path):
    """100 jobs; a kill every 6-12 s for two minutes and one graceful Redis restart."""
    run_chaos(21, chaos_videos, standin, assets, tmp_path, jobs=100, chaos_s=120.0,
              redis_kill="graceful", gaps=(6.0, 12.0))
