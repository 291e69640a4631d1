"""A job end to end on real Redis, real worker processes and the vLLM stand-in."""

from __future__ import annotations

import json
import time

import cv2
import pytest
import redis

from zroact_tasks.media.clips import keyframe_indices
from zroact_tasks.testing.sample_media import square_bbox
from zroact_tasks.testing.taskevents import EventRecorder
from zroact_tasks.testing.vllm_standin import expected_content

from .helpers import (assert_revoked_after, decode_data_url, psnr, read_frames, validate_report,
                      wait_for_success)

PROMPT = "Is the red square really moving?"


def _images(request: dict) -> list:
    parts = request["messages"][0]["content"]
    return [decode_data_url(p["image_url"]["url"]) for p in parts if p["type"] == "image_url"]


def test_job_end_to_end(client, standin, assets):
    first = len(standin.requests)
    job = client.submit(assets["video"], prompt=PROMPT)
    report = job.wait(timeout=180)
    data = report.model_dump(mode="json")
    validate_report(data)
    assert report.status == "succeeded", data
    assert (report.video.frames, report.video.width, report.video.height) == (419, 320, 240)

    # Every keyframe ran Stage 1, and its top detection is the red square of that very frame.
    assert [k.index for k in report.keyframes] == keyframe_indices(419, 10)
    for kf in report.keyframes:
        top = kf.detections[0]
        assert (top.label, top.class_id) == ("red_action", 0) and top.score > 0.8
        assert top.box == pytest.approx(square_bbox(kf.index, 320, 240, 40), abs=3)
        assert kf.time_s == pytest.approx(kf.index / 30.0, abs=1e-3)

    # 13 full slots of 3 consecutive keyframes; the trailing 2 get no Stage 2 request.
    assert [s.keyframes for s in report.slots] == [keyframe_indices(419, 10)[3 * j: 3 * j + 3]
                                                    for j in range(13)]
    requests = standin.requests[first:]
    assert len(requests) == 13
    frames = read_frames(assets["video"], {i for s in report.slots for i in s.keyframes})
    for slot in report.slots:
        matching = [r for r in requests
                    if all(psnr(img, frames[kf]) >= 30 for img, kf in zip(_images(r), slot.keyframes))]
        assert len(matching) == 1, f"slot {slot.slot}: {len(matching)} requests carry its frames"
        request = matching[0]
        assert slot.verdict.model_dump() == json.loads(expected_content(request))
        assert slot.error is None
        content = request["messages"][0]["content"]
        assert [p["type"] for p in content] == ["image_url"] * 3 + ["text"]
        assert content[3]["text"].startswith(PROMPT)
        assert f"frame {slot.keyframes[0]}" in content[3]["text"] and "red_action" in content[3]["text"]
        assert request["response_format"]["json_schema"]["name"] == "verdict"
        assert request["model"] == standin.model and request["max_tokens"] > 0
    assert report.stage2.status == "done" and report.stage2.model == standin.model

    status = job.status()
    assert (status.state, status.stage1_done, status.stage1_total) == ("succeeded", 41, 41)
    assert (status.stage2_done, status.stage2_total) == (13, 13)
    # The job's frames are gone; its report stays, with an expiry.
    r = redis.Redis.from_url(client.settings.redis_url)
    assert not r.exists(f"zroact:job:{job.id}:frames")
    assert 0 < r.ttl(f"zroact:job:{job.id}") <= client.settings.result_ttl_s


def test_a_bad_vlm_answer_fails_only_its_slot(client, standin, assets):
    first = len(standin.requests)
    standin.set_fault("garbage", count=1)  # drawn as a request is recorded: the first one
    report = client.submit(assets["video"]).wait(timeout=180)  # 13 slots, one request each
    validate_report(report.model_dump(mode="json"))
    assert report.status == "completed_with_errors"
    assert len(report.slots) == 13 and all(k.error is None for k in report.keyframes)
    failed = [s for s in report.slots if s.error is not None]
    assert len(failed) == 1, [(s.slot, s.error) for s in failed]
    requests = standin.requests[first:]
    assert len(requests) == 13
    frames = read_frames(assets["video"], {i for s in report.slots for i in s.keyframes})

    def request_of(slot) -> dict:
        (match,) = [r for r in requests if all(
            psnr(img, frames[kf]) >= 30 for img, kf in zip(_images(r), slot.keyframes))]
        return match

    (bad,) = failed
    assert "not JSON" in bad.error and bad.verdict is None
    assert request_of(bad) is requests[0]  # the slot whose request got the garbage
    for slot in report.slots:  # every other slot kept its own verdict
        if slot is not bad:
            assert slot.verdict.model_dump() == json.loads(expected_content(request_of(slot)))


def test_cancel_revokes_the_job_and_deletes_its_frames(client, standin, assets):
    standin.hold()
    first = len(standin.requests)
    with EventRecorder(client.app) as recorder:
        job = client.submit(assets["video"])  # 41 clips: most still queued at the cancel
        assert standin.wait_for_requests(first + 1, timeout=60)
        # Slot 0 is offered as soon as its frames are in, so its request can come before chunk
        # 0 has offered the rest: cancel once it has, so that there is work pending to revoke.
        wait_for_success(recorder, f"{job.id}:ingest")
        assert job.cancel() is True
        returned_at = time.time()
        report = job.wait(timeout=60)
        standin.release()  # the running judges get their answers and end
        judges_before = assert_revoked_after(recorder, job.id, returned_at)
    assert report.status == "cancelled"
    validate_report(report.model_dump(mode="json"))
    # It says it was cancelled, not that Stage 1 failed or the file was short.
    assert report.stage2.status == "cancelled" and report.warnings == []
    unjudged = [s.error for s in report.slots if s.verdict is None]  # (none if ingest had not
    assert all(e == "cancelled" for e in unjudged), unjudged  # counted the keyframes yet)
    # Every VLM request came from a judge already running at the cancel.
    assert 1 <= len(standin.requests) - first <= judges_before
    r = redis.Redis.from_url(client.settings.redis_url)
    assert not r.exists(f"zroact:job:{job.id}:frames")
    assert job.cancel() is False  # already ended
    # The cluster still serves the next job.
    assert client.submit(assets["short_video"]).wait(timeout=120).status == "succeeded"


def test_bad_video_fails_the_job_with_the_reason(client, tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video")
    report = client.submit(bad).wait(timeout=60)
    assert report.status == "failed"
    assert report.error.type == "VideoDecodeError" and report.error.input_error
    assert str(bad) in report.error.message
    assert report.stage2.status == "not_run"
    validate_report(report.model_dump(mode="json"))


def test_a_job_past_its_deadline_ends_failed_with_the_stage(redis_server, standin, assets, tmp_path):
    """A cluster with a 3 s deadline and a VLM that never answers: the job ends, it never hangs."""
    from .conftest import start_cluster

    env = {"ZROACT_MODEL": str(assets["model"]), "ZROACT_VLM_URL": standin.url,
           "ZROACT_JOB_DEADLINE_S": "3", "ZROACT_VLM_TIMEOUT_S": "60"}
    # Its own Redis database, so these workers do not take the session cluster's tasks.
    url = redis_server.url.rsplit("/", 1)[0] + "/5"
    cluster, client = start_cluster(url, env, tmp_path)
    try:
        standin.set_fault("slow")
        client.settings = client.settings.model_copy(update={"job_deadline_s": 3.0})
        report = client.submit(assets["short_video"]).wait(timeout=60)
        assert report.status == "failed"
        assert report.error.type == "JobDeadlineError"
        assert report.error.message == "timed out at stage 2 after 3 s (JOB_DEADLINE_S)"
        validate_report(report.model_dump(mode="json"))
    finally:
        standin.release()
        cluster.stop()
        client.close()


def test_deadlines_name_ingest_and_stage_1(redis_server, assets, tmp_path):
    """No Stage 1 worker and a budget of 1 byte: job A (over the whole budget, so admitted alone)
    waits at Stage 1 holding its frames; job B waits for room at ingest. Each ends at its deadline
    naming where it was."""
    from .conftest import start_cluster

    url = redis_server.url.rsplit("/", 1)[0] + "/7"
    redis.Redis.from_url(url).flushdb()
    env = {"ZROACT_MODEL": str(assets["model"]), "ZROACT_JOB_DEADLINE_S": "3",
           "ZROACT_FRAME_BUDGET_BYTES": "1"}
    cluster, client = start_cluster(url, env, tmp_path)
    try:
        cluster.remove_worker([w for w in cluster.workers if w.role == "stage1"][0])
        settings = client.settings
        client.settings = settings.model_copy(update={"job_deadline_s": 8.0})
        a = client.submit(assets["short_video"])
        deadline = time.monotonic() + 30
        while "keyframes_total" not in client.jobs.meta(a.id) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert a.status().stage1_total == 4  # ingested, over the budget: it runs alone
        client.settings = settings.model_copy(update={"job_deadline_s": 3.0})
        b = client.submit(assets["short_video"])
        report_b = b.wait(timeout=60)
        assert a.status().state == "running"  # A still waits at Stage 1, holding its frames
        report_a = a.wait(timeout=60)
        for report in (report_a, report_b):
            validate_report(report.model_dump(mode="json"))
            assert report.status == "failed" and report.error.type == "JobDeadlineError"
        assert report_b.error.message == "timed out at ingest after 3 s (JOB_DEADLINE_S)"
        assert report_b.keyframes == []  # it never got past ingest
        assert report_a.error.message == "timed out at stage 1 after 8 s (JOB_DEADLINE_S)"  # its own deadline
    finally:
        cluster.stop()
        client.close()


def stage1_queued(r: redis.Redis) -> list[str]:
    """Task ids waiting in the stage1 queue (every kombu priority list of it)."""
    ids = []
    for key in ["stage1"] + [f"stage1\x06\x16{p}" for p in (3, 6, 9)]:
        ids += [json.loads(m)["headers"]["id"] for m in r.lrange(key, 0, -1)]
    return ids


def test_job_window_and_stage2_max_side(redis_server, standin, assets, tmp_path):
    """JOB_WINDOW_SLOTS=2: a long job has two slots in the Stage 1 queue at a time, so a short
    job submitted after it goes first. STAGE2_MAX_SIDE=160: the VLM gets 160x120 images."""
    from .conftest import start_cluster

    url = redis_server.url.rsplit("/", 1)[0] + "/2"
    r = redis.Redis.from_url(url)
    r.flushdb()
    env = {"ZROACT_MODEL": str(assets["model"]), "ZROACT_VLM_URL": standin.url,
           "ZROACT_JOB_WINDOW_SLOTS": "2", "ZROACT_STAGE2_MAX_SIDE": "160"}
    cluster, client = start_cluster(url, env, tmp_path)
    try:
        cluster.remove_worker([w for w in cluster.workers if w.role == "stage1"][0])
        first = len(standin.requests)
        long_job = client.submit(assets["video"])  # 41 clips in 14 slots
        deadline = time.monotonic() + 30
        while long_job.status().stage1_total == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # whatever ingest would still send is sent
        queued = stage1_queued(r)
        assert sorted(queued) == sorted(f"{long_job.id}:s1:{k}" for k in (9, 19, 29, 39, 49, 59))
        short_job = client.submit(assets["short_video"])  # 4 clips in 2 slots: both fit its window
        deadline = time.monotonic() + 30
        while len(stage1_queued(r)) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(stage1_queued(r)) == 10
        cluster.wait_ready(client.app, workers=[cluster.add_worker("stage1", concurrency=1)])
        short, long_ = short_job.wait(timeout=120), long_job.wait(timeout=180)
        assert short.status == long_.status == "succeeded"
        ended = {j.id: float(client.jobs.meta(j.id)["ended_at"]) for j in (short_job, long_job)}
        assert ended[short_job.id] < ended[long_job.id]  # not behind the long job's 41 clips
        requests = standin.requests[first:]
        assert len(requests) == 13 + 1
        frames = read_frames(assets["video"], {9, 19, 29})
        for request in requests:
            images = _images(request)
            assert [img.shape for img in images] == [(120, 160, 3)] * 3
        small = [cv2.resize(frames[k], (160, 120), interpolation=cv2.INTER_AREA) for k in (9, 19, 29)]
        assert any(all(psnr(img, ref) >= 28 for img, ref in zip(_images(req), small))
                   for req in requests)  # slot 0's frames, downscaled
    finally:
        cluster.stop()
        client.close()


@pytest.fixture(scope="module")
def batch2_cluster(redis_server, standin, assets, tmp_path_factory):
    """Workers with STAGE1_BATCH=2: a Stage 1 task takes two keyframes of a slot."""
    from .conftest import start_cluster

    url = redis_server.url.rsplit("/", 1)[0] + "/1"
    redis.Redis.from_url(url).flushdb()
    env = {"ZROACT_MODEL": str(assets["model"]), "ZROACT_VLM_URL": standin.url,
           "ZROACT_STAGE1_BATCH": "2"}
    cluster, client = start_cluster(url, env, tmp_path_factory.mktemp("batch2"))
    yield cluster, client
    cluster.stop()
    client.close()


def test_stage1_batch_of_two_keyframes_per_task(batch2_cluster, assets):
    cluster, client = batch2_cluster
    with EventRecorder(client.app) as recorder:
        report = client.submit(assets["video"]).wait(timeout=180)
        time.sleep(0.3)
    validate_report(report.model_dump(mode="json"))
    assert report.status == "succeeded"
    for kf in report.keyframes:
        assert kf.detections[0].box == pytest.approx(square_bbox(kf.index, 320, 240, 40), abs=3)
    # Slots of 3 keyframes in tasks of 2: [9, 19] [29] | [39, 49] [59] | ...; each ran once.
    keyframes = keyframe_indices(419, 10)
    expected = {f"{report.job_id}:s1:{b[0]}" for j in range(0, len(keyframes), 3)
                for b in (keyframes[j:j + 2], keyframes[j + 2:j + 3]) if b}
    runs = recorder.log.starts("zroact.stage1.detect_clips", prefix=report.job_id)
    assert set(runs) == expected and set(runs.values()) == {1}, runs


def test_cancel_from_a_client_with_another_stage1_batch(batch2_cluster, assets):
    cluster, client = batch2_cluster
    from zroact_tasks.client import Client

    stage1 = [w for w in cluster.workers if w.role == "stage1"][0]
    cluster.remove_worker(stage1)
    other = Client(settings=client.settings.model_copy(update={"stage1_batch": 3}))
    try:
        with EventRecorder(client.app) as recorder:
            job = client.submit(assets["video"])
            deadline = time.monotonic() + 30
            while job.status().stage1_total == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # its window of slots is in the Stage 1 queue
            assert other.job(job.id).cancel()
            returned_at = time.time()
            cluster.wait_ready(client.app, workers=[cluster.add_worker("stage1")])
            assert job.wait(timeout=60).status == "cancelled"
            assert_revoked_after(recorder, job.id, returned_at)
    finally:
        other.close()


def test_a_stage2_worker_keeps_2_to_3_requests_in_flight(client, standin, assets):
    """The session cluster's one Stage 2 worker, planned from the stand-in's capacity (it would
    take 5): with 13 slots waiting, 3 requests are in flight, never more."""
    standin.hold()
    first = len(standin.requests)
    job = client.submit(assets["video"])
    try:
        assert standin.wait_for_requests(first + 3, timeout=60)
        samples = []
        for _ in range(20):  # a second of samples: no fourth request comes
            samples.append(standin.in_flight)
            time.sleep(0.05)
        assert max(samples) == min(samples) == 3, samples
        assert len(standin.requests) - first == 3
    finally:
        job.cancel()
        standin.release()
    assert job.wait(timeout=60).status == "cancelled"


def test_default_priority_sets_the_level_of_a_jobs_messages(redis_server, assets, monkeypatch):
    """ZROACT_DEFAULT_PRIORITY is the priority of a job submitted without one; Redis keeps four
    levels (0-2, 3-5, 6-8, 9), each in a list of its own. A database without workers: the ingest
    message stays where it was put."""
    from zroact_tasks.client import Client
    from zroact_tasks.config import Settings

    url = redis_server.url.rsplit("/", 1)[0] + "/10"  # no workers here (test_metrics shares it the same way)
    r = redis.Redis.from_url(url)
    r.flushdb()
    lists = {0: "control", 3: "control\x06\x163", 6: "control\x06\x166", 9: "control\x06\x169"}

    def level_of(job) -> int:
        (level,) = [lv for lv, key in lists.items()
                    if any(json.loads(m)["headers"]["id"] == f"{job.id}:ingest" for m in r.lrange(key, 0, -1))]
        return level

    try:
        for env, given, level in [(None, None, 3), ("9", None, 9), ("9", 0, 0), ("7", None, 6)]:
            if env is None:
                monkeypatch.delenv("ZROACT_DEFAULT_PRIORITY", raising=False)
            else:
                monkeypatch.setenv("ZROACT_DEFAULT_PRIORITY", env)
            client = Client(settings=Settings(redis_url=url))
            try:
                job = client.submit(assets["short_video"], priority=given)
                assert level_of(job) == level, (env, given)
                assert client.jobs.spec(job.id).priority == (given if given is not None else int(env or 5))
            finally:
                client.close()
    finally:
        r.flushdb()


def test_a_waiting_ingest_holds_no_worker_process(redis_server, assets, tmp_path):
    """One control process; job A holds the frame budget at Stage 1 (no Stage 1 worker); job B's
    ingest waits for room. If B's wait held the one process, A's cancel could never be finalized
    (and A's frames never freed for B). It is: A ends, then B gets the room and is ingested."""
    from .conftest import start_cluster

    url = redis_server.url.rsplit("/", 1)[0] + "/7"
    redis.Redis.from_url(url).flushdb()
    env = {"ZROACT_MODEL": str(assets["model"]), "ZROACT_FRAME_BUDGET_BYTES": "1",
           "ZROACT_INGEST_RETRY_S": "0.2"}
    cluster, client = start_cluster(url, env, tmp_path)
    try:
        cluster.remove_worker([w for w in cluster.workers if w.role == "stage1"][0])
        cluster.remove_worker([w for w in cluster.workers if w.role == "control"][0])
        cluster.wait_ready(client.app, workers=[cluster.add_worker("control", concurrency=1)])
        a = client.submit(assets["short_video"])
        deadline = time.monotonic() + 30
        while a.status().stage1_total == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        b = client.submit(assets["short_video"])
        time.sleep(1.5)  # B's ingest has tried and is waiting
        assert b.status().stage1_total == 0  # not ingested
        assert a.cancel()
        assert a.wait(timeout=20).status == "cancelled"  # finalized by the one control process
        deadline = time.monotonic() + 20
        while b.status().stage1_total == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert b.status().stage1_total == 4  # B got A's room and was ingested
        assert b.cancel()
    finally:
        cluster.stop()
        client.close()



def test_full_hd_frames_are_fitted_into_the_vlm_context(client, standin, tmp_path):
    """Three 1920x1080 keyframes cost ~8,100 tokens on Qwen2.5-VL, past the stand-in's 8,192-token
    context with the answer's room: Stage 2 shrinks them (aspect kept, 28-px units) so every slot
    gets a verdict, and the report says the size it sent."""
    from zroact_tasks.testing.sample_media import make_video

    video = make_video(tmp_path / "full_hd.mp4", frames=47, width=1920, height=1080)
    first = len(standin.requests)
    report = client.submit(video, prompt="Is it moving?").wait(timeout=180)
    assert report.status == "succeeded"
    assert [s.error for s in report.slots] == [None] * len(report.slots)
    assert all(s.verdict is not None for s in report.slots)
    sizes = {tuple(s.image_size) for s in report.slots}
    (w, h), = sizes
    assert w < 1920 and h < 1080 and w % 28 == 0 and h % 28 == 0 and abs(w / h - 16 / 9) < 0.1
    for request, answer in zip(standin.requests[first:], standin.responses[first:]):
        assert [img.shape for img in _images(request)] == [(h, w, 3)] * 3
        assert answer.status == 200
        prompt = answer.body["usage"]["prompt_tokens"]
        assert prompt + request["max_tokens"] <= standin.max_model_len, (prompt, request["max_tokens"])
