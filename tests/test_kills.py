"""Workers killed with SIGKILL mid-job: nothing lost, nothing duplicated."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import redis

from zroact_tasks.testing.taskevents import EventRecorder

from .conftest import start_cluster
from .helpers import validate_report

VISIBILITY_TIMEOUT_S = 10


def pool_children(pid: int) -> list[int]:
    """The worker's prefork pool processes (same command line; not e.g. a resource tracker)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    kids = [int(p) for p in path.read_text().split()] if path.exists() else []
    return [k for k in kids if Path(f"/proc/{k}/cmdline").exists()
            and Path(f"/proc/{k}/cmdline").read_bytes() == cmdline]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


PREFORK = {"ZROACT_STAGE1_PIPELINE_DEPTH": "0"}
"""A Stage 1 worker as a prefork pool (one clip per process), not the pipelined default."""


@pytest.fixture
def slow_cluster(redis_server, standin, assets, tmp_path, request):
    """A cluster on its own database whose Stage 1 takes 0.4 s a clip (a simulated GPU);
    parametrize it indirectly with extra environment (``PREFORK``, GPU options)."""
    extra = dict(getattr(request, "param", {}))
    url = redis_server.url.rsplit("/", 1)[0] + "/8"
    redis.Redis.from_url(url).flushdb()  # nothing left over from an earlier test's cluster
    options = {"gpu_lock": str(tmp_path / "gpu.lock"), "per_clip_s": 0.4,
               **json.loads(extra.pop("gpu", "{}"))}
    env = {"ZROACT_MODEL": str(assets["model"]), "ZROACT_VLM_URL": standin.url,
           "ZROACT_DETECTOR": "zroact_tasks.testing.simgpu:SimulatedGPUDetector",
           "ZROACT_DETECTOR_OPTIONS": json.dumps(options),
           "ZROACT_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S), "ZROACT_VLM_TIMEOUT_S": "30",
           **extra}
    cluster, client = start_cluster(url, env, tmp_path / "logs")
    yield cluster, client
    cluster.stop()
    client.close()


def role(cluster, name):
    return [w for w in cluster.workers if w.role == name][0]


def in_flight_on(recorder, hostname: str) -> list[str]:
    """Ids of the tasks running on ``hostname`` now: started and not ended since."""
    with recorder.log.lock:
        return [t.id for t in recorder.log.tasks.values() if t.hostname == hostname
                and t.started and (t.ended is None or t.ended < t.started)]


def assert_complete_once(report, recorder, n_slots: int, *,
                         repaired: frozenset[int] = frozenset()) -> None:
    """Every slot ended once. A slot in ``repaired`` may have no chord body: its last clip ran
    on the killed worker, which may have died holding the chord's dispatch claim (Celery 5.7
    extends it to the publish retry budget, ~2 min here), and then the reconciler does the
    body's work — it sends the slot's Stage 2 request itself, once."""
    validate_report(report.model_dump(mode="json"))
    assert report.status == "succeeded", report.model_dump()
    assert len({k.index for k in report.keyframes}) == len(report.keyframes)
    assert all(k.error is None and k.detections for k in report.keyframes)
    assert len(report.slots) == n_slots and all(s.verdict is not None for s in report.slots)
    # Runs, not ids: a body that ran twice keeps its one id ({job}:slot:N) but starts twice.
    groups = -(-len(report.keyframes) // 3)  # SLOT_SIZE 3: full slots and a trailing partial one
    bodies = recorder.log.starts("zroact.control.slot_ready", prefix=report.job_id)
    ran = {int(b.rsplit(":", 1)[1]) for b in bodies}
    assert ran <= set(range(groups)) and set(range(groups)) - ran <= repaired, bodies
    assert set(bodies.values()) == {1}, bodies  # each chord body ran once


@pytest.mark.parametrize("slow_cluster", [PREFORK], indirect=True)
def test_sigkill_of_a_stage1_pool_child_mid_task(slow_cluster, assets):
    cluster, client = slow_cluster
    stage1 = role(cluster, "stage1")
    with EventRecorder(client.app) as recorder:
        job = client.submit(assets["short_video"])  # 4 clips of 0.4 s, 1 slot
        wait_until(lambda: job.status().stage1_done >= 1, 60, "the first clip")
        (child,) = pool_children(stage1.proc.pid)
        time.sleep(0.1)  # the child is inside its next 0.4 s clip
        in_flight = in_flight_on(recorder, stage1.name)
        os.kill(child, signal.SIGKILL)
        report = job.wait(timeout=120)
        time.sleep(0.3)
    assert_complete_once(report, recorder, 1)
    assert stage1.alive and pool_children(stage1.proc.pid) != [child]  # a new pool child
    assert len(in_flight) == 1, in_flight  # a clip was running when the child died
    killed = recorder.log.tasks[in_flight[0]]
    # The killed clip ran again (once) and only that run reported; the other clips ran once.
    assert (killed.starts, killed.succeeded, killed.failed) == (2, 1, 0), killed
    runs = recorder.log.starts("zroact.stage1.detect_clips", prefix=job.id)
    assert len(runs) == 4 and sum(runs.values()) == 5, runs


def test_sigkill_of_stage2_pool_children_mid_request(slow_cluster, standin, assets):
    cluster, client = slow_cluster
    stage2 = role(cluster, "stage2")
    standin.hold()
    first = len(standin.requests)
    with EventRecorder(client.app) as recorder:
        job = client.submit(assets["short_video"])
        assert standin.wait_for_requests(first + 1, timeout=60)  # the request is in flight
        for child in pool_children(stage2.proc.pid):
            os.kill(child, signal.SIGKILL)
        time.sleep(0.5)
        standin.release()
        report = job.wait(timeout=120)
        time.sleep(0.3)
    assert_complete_once(report, recorder, 1)
    judge = recorder.log.tasks[f"{job.id}:s2:0"]
    # Two runs of the one id: the killed one never reported, the rerun did, once.
    assert (judge.starts, judge.succeeded, judge.failed) == (2, 1, 0), judge
    assert len(standin.requests) - first == 2  # the killed request was made again, once


@pytest.mark.parametrize("slow_cluster", [PREFORK], indirect=True)
def test_sigkill_of_a_whole_worker_redelivers_after_the_visibility_timeout(slow_cluster, assets):
    cluster, client = slow_cluster
    stage1 = role(cluster, "stage1")
    with EventRecorder(client.app) as recorder:
        job = client.submit(assets["short_video"])
        wait_until(lambda: job.status().stage1_done >= 1, 60, "the first clip")
        time.sleep(0.1)
        cluster.workers.remove(stage1)  # no supervisor restart: we start a new one ourselves
        stage1.signal(signal.SIGKILL)  # parent and pool child: the running task stays unacked
        killed_at = time.time()
        in_flight = in_flight_on(recorder, stage1.name)
        stage1.proc.wait()
        replacement = cluster.add_worker("stage1")
        cluster.wait_ready(client.app, workers=[replacement])
        report = job.wait(timeout=VISIBILITY_TIMEOUT_S + 60)
        time.sleep(0.3)
    assert_complete_once(report, recorder, 1)
    assert len(in_flight) == 1
    rerun = recorder.log.tasks[in_flight[0]]
    assert rerun.hostname == replacement.name and rerun.ended
    assert rerun.start_hosts == [stage1.name, replacement.name] and rerun.succeeded == 1, rerun
    waited = rerun.started - killed_at
    print(f"redelivery after whole-worker SIGKILL: {waited:.1f} s")
    # The unacked task comes back once it is older than the visibility timeout, at the next
    # 1 s restore scan: generous bound for a loaded machine.
    assert VISIBILITY_TIMEOUT_S - 1 < waited
    assert waited < VISIBILITY_TIMEOUT_S + 15


@pytest.mark.parametrize("slow_cluster", [{"gpu": json.dumps({"per_clip_s": 0.25})}],
                         indirect=True)
def test_sigkill_of_a_pipelined_stage1_worker_holding_prefetched_clips(slow_cluster, assets):
    """The pipelined worker (default) holds STAGE1_PIPELINE_DEPTH clips at once: one inferred,
    the others reserved and prepared. Killed, every one comes back and each result is recorded
    once."""
    from zroact_tasks.events import events_key

    cluster, client = slow_cluster
    stage1 = role(cluster, "stage1")
    assert pool_children(stage1.proc.pid) == []  # one process: threads, not a prefork pool
    with EventRecorder(client.app) as recorder:
        job = client.submit(assets["video"])  # 41 clips of 0.25 s, 13 slots
        wait_until(lambda: job.status().stage1_done >= 3, 60, "three clips")
        wait_until(lambda: len(in_flight_on(recorder, stage1.name)) >= 4, 10, "a full pipeline")
        cluster.workers.remove(stage1)
        stage1.signal(signal.SIGKILL)
        in_flight = in_flight_on(recorder, stage1.name)
        done_before = {t.id for t in recorder.log.tasks.values()
                       if t.name == "zroact.stage1.detect_clips" and t.succeeded}
        stage1.proc.wait()
        replacement = cluster.add_worker("stage1")
        cluster.wait_ready(client.app, workers=[replacement])
        report = job.wait(timeout=VISIBILITY_TIMEOUT_S + 90)
        time.sleep(0.3)
    # The killed worker held more than the clip on the GPU: prefetched, prepared ones too.
    assert len(in_flight) >= 2, in_flight
    order = sorted(k.index for k in report.keyframes)
    killed_slots = frozenset(order.index(int(tid.rsplit(":", 1)[1])) // 3 for tid in in_flight)
    assert_complete_once(report, recorder, 13, repaired=killed_slots)
    judges = recorder.log.starts("zroact.stage2.judge_slot", prefix=job.id)
    assert judges == {f"{job.id}:s2:{s}": 1 for s in range(13)}, judges  # a body or a repair
    clips = {i: t for i, t in recorder.log.tasks.items() if t.name == "zroact.stage1.detect_clips"
             and i.startswith(job.id)}
    assert len(clips) == 41
    for tid in in_flight:  # each came back, ran on the replacement, reported once
        t = clips[tid]
        assert t.start_hosts == [stage1.name, replacement.name] and t.succeeded == 1, t
    for tid in done_before:  # a clip acked before the kill never ran again
        assert clips[tid].starts == 1, clips[tid]
    assert all(t.succeeded == 1 and t.failed == 0 for t in clips.values())
    # Each keyframe's result recorded once: one keyframe event each in the job's stream.
    r = client.jobs.r
    entries = r.xrange(events_key(job.id))
    kinds = [(e[1].get(b"kind") or e[1].get("kind")) for e in entries]
    keyframe_events = [e for e, k in zip(entries, kinds) if k in (b"keyframe", "keyframe")]
    indices = [json.loads(e[1].get(b"data") or e[1].get("data"))["keyframe"]
               for e in keyframe_events]
    assert sorted(indices) == [k.index for k in report.keyframes] and len(set(indices)) == 41


def test_a_task_that_kills_every_worker_is_not_requeued_forever(redis_server, assets, tmp_path):
    from zroact_tasks.testing.sample_media import make_video

    url = redis_server.url.rsplit("/", 1)[0] + "/9"
    redis.Redis.from_url(url).flushdb()
    env = {"ZROACT_MODEL": str(assets["model"]),
           "ZROACT_DETECTOR": "zroact_tasks.testing.crashing:CrashingDetector"}
    cluster, client = start_cluster(url, env, tmp_path / "logs")
    try:
        video = make_video(tmp_path / "one.mp4", frames=12)  # one keyframe
        report = client.submit(video).wait(timeout=120)
        validate_report(report.model_dump(mode="json"))
        assert report.status == "failed"  # its one keyframe, never run: nothing came of the job
        (kf,) = report.keyframes
        assert kf.error.endswith("killed its worker on 3 deliveries; not run again")
        assert role(cluster, "stage1").alive  # the worker's pool replaced each dead child
    finally:
        cluster.stop()
        client.close()
