"""Admission by what a job holds: in line by priority then submission, woken when a job ends;
stalls (not waits) fail a job; frames on a Redis of their own."""

from __future__ import annotations

import time

import redis

from zroact_tasks.config import Settings
from zroact_tasks.control.ingest import plan
from zroact_tasks.local import EmbeddedRedis
from zroact_tasks.media import video
from zroact_tasks.media.store import USED, WAITING
from zroact_tasks.models import JobSpec
from zroact_tasks.testing.sample_media import make_video, render_frame

from .conftest import start_cluster
from .test_chunks import PeakWatcher
from .test_ingest import spec_for


def raw_mjpeg(path, frames: int = 150):
    """A raw MJPEG stream: no container, no declared frame count, no seeking."""
    path.write_bytes(b"".join(video.encode_jpeg(render_frame(i), 90) for i in range(frames)))
    return path


def wait_for(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_twenty_jobs_are_admitted_by_priority_then_submission(redis_server, standin, assets,
                                                               tmp_path):
    """20 jobs (a long one, raw MJPEG without a frame count, short mp4s) under a budget that
    fits two at a time: all complete; once in line, each is admitted in (priority, submission)
    order, and as soon as a job ends (never while the cluster is idle)."""
    url = redis_server.url.rsplit("/", 1)[0] + "/10"
    r = redis.Redis.from_url(url)
    r.flushdb()
    long = make_video(tmp_path / "long.mp4", frames=1800, fps=30)
    mjpeg = [raw_mjpeg(tmp_path / f"raw{i}.mjpeg") for i in range(4)]
    sample = plan(spec_for(assets["video"]), Settings(), (224, 224)).footprint(spec_for(assets["video"]),
                                                                   Settings(), True)
    budget = int(2.5 * sample)
    env = {"ZROACT_MODEL": str(assets["model"]), "ZROACT_VLM_URL": standin.url,
           "ZROACT_FRAME_BUDGET_BYTES": str(budget)}
    cluster, client = start_cluster(url, env, tmp_path)
    try:
        stage1 = [w for w in cluster.workers if w.role == "stage1"][0]
        cluster.remove_worker(stage1)  # admitted jobs hold their room until Stage 1 returns
        videos = [long] + [mjpeg[i % 4] if i % 5 == 0 else assets["video"] for i in range(19)]
        priorities = [5] + [(9, 0, 5)[i % 3] for i in range(19)]
        jobs = [client.submit(v, priority=p) for v, p in zip(videos, priorities)]
        # Every job has asked for admission: at most three are in (two fit, or one alone).
        wait_for(lambda: sum("plan" in client.jobs.meta(j.id) for j in jobs) == 20)
        running = [j for j in jobs if "ingest_started" in client.jobs.meta(j.id)]
        assert 1 <= len(running) <= 3 and r.zcard(WAITING) == 20 - len(running)
        cluster.wait_ready(client.app, workers=[cluster.add_worker("stage1")])
        reports = [j.wait(timeout=400) for j in jobs]
    finally:
        cluster.stop()
        client.close()
    assert [rep.status for rep in reports] == ["succeeded"] * 20, [
        (rep.status, rep.error) for rep in reports]
    assert len(reports[0].keyframes) == 180 and len(reports[1].keyframes) == 15  # long; raw
    meta = {j.id: client.jobs.meta(j.id) for j in jobs}
    started = {j: float(m["ingest_started"]) for j, m in meta.items()}
    ended = {j: float(m["ended_at"]) for j, m in meta.items()}
    rank = {j.id: (p, submitted(meta[j.id])) for j, p in zip(jobs, priorities)}
    woken = sorted((j for j in started if j not in {x.id for x in running}), key=started.get)
    assert len(woken) == 20 - len(running)
    compared = 0
    for a, b in zip(woken, woken[1:]):
        if started[a] + 0.3 < started[b]:  # apart enough to tell which went first
            assert rank[a] < rank[b], (rank[a], rank[b])
            compared += 1
    assert compared >= 8, compared  # the order was seen, not assumed
    for job in woken:  # woken by an end: some job ended at most 2 s before it started
        before = [e for e in ended.values() if e <= started[job] + 0.05]
        assert before and started[job] - max(before) < 2.0, job
    assert int(r.get(USED) or 0) == 0 and r.zcard(WAITING) == 0


def test_a_stall_fails_a_job_but_waiting_for_admission_does_not(redis_server, assets, tmp_path):
    """JOB_STALL_S=3 and no Stage 1 worker: job A stalls at Stage 1 and fails; job B waits
    behind it (a budget of one byte) for longer than 3 s without failing, then is admitted and
    stalls at Stage 1 in turn."""
    url = redis_server.url.rsplit("/", 1)[0] + "/11"
    redis.Redis.from_url(url).flushdb()
    env = {"ZROACT_MODEL": str(assets["model"]), "ZROACT_FRAME_BUDGET_BYTES": "1",
           "ZROACT_JOB_STALL_S": "3"}
    cluster, client = start_cluster(url, env, tmp_path)
    try:
        cluster.remove_worker([w for w in cluster.workers if w.role == "stage1"][0])
        client.settings = client.settings.model_copy(update={"job_stall_s": 3.0})
        a = client.submit(assets["short_video"])
        wait_for(lambda: "ingest_started" in client.jobs.meta(a.id))
        b = client.submit(assets["short_video"])
        status = b.status()
        assert (status.state, status.stall_s, status.deadline_s) == ("queued", 3.0, None)
        report_a, report_b = a.wait(timeout=60), b.wait(timeout=60)
        meta_a, meta_b = client.jobs.meta(a.id), client.jobs.meta(b.id)
    finally:
        cluster.stop()
        client.close()
    for report in (report_a, report_b):
        assert report.status == "failed" and report.error.type == "JobStalledError"
        assert report.error.message == "no progress at stage 1 for 3 s (JOB_STALL_S)"
    waited = float(meta_b["ingest_started"]) - float(meta_a["ended_at"])
    assert -0.5 < waited < 2.0  # B was admitted when A ended, after waiting > 3 s
    assert float(meta_b["ingest_started"]) - submitted(meta_b) > 3.0


def submitted(meta: dict) -> float:
    return JobSpec.model_validate_json(meta["spec"]).submitted_at


def test_frames_on_a_redis_of_their_own(redis_server, standin, assets, tmp_path):
    """FRAMES_URL: the frames (and their accounting) live on the second Redis, none on the
    cluster's."""
    url = redis_server.url.rsplit("/", 1)[0] + "/12"
    main = redis.Redis.from_url(url)
    main.flushdb()
    with EmbeddedRedis() as frames_server:
        frames = redis.Redis.from_url(frames_server.url)
        env = {"ZROACT_MODEL": str(assets["model"]), "ZROACT_VLM_URL": standin.url,
               "ZROACT_FRAMES_URL": frames_server.url}
        cluster, client = start_cluster(url, env, tmp_path)
        seen_on_main = []
        try:
            with PeakWatcher(frames) as watcher:
                job = client.submit(assets["video"])
                watcher.job_id = job.id
                while job.report() is None:
                    seen_on_main += [k for k in main.scan_iter("*frames*")]
                    time.sleep(0.05)
                report = job.wait(timeout=60)
        finally:
            cluster.stop()
            client.close()
        assert report.status == "succeeded" and all(s.verdict for s in report.slots)
        assert watcher.peak > 0 and seen_on_main == []
        assert frames.exists(USED) and int(frames.get(USED)) == 0
