"""Each step of a job run twice has one effect; a job whose messages are lost is repaired.

The first half drives the Redis records directly (a real redis-server); the second runs real
clusters whose messages are deleted from Redis on purpose, as a Redis that lost its last second
of writes would.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis

from zroact_tasks import pipeline
from zroact_tasks.jobstate import JOBS_ENDED, RESENDS, JobStore
from zroact_tasks.media.store import RESERVED, USED, FrameStore
from zroact_tasks.models import JobSpec
from zroact_tasks.redisconn import connect

from .conftest import start_cluster
from .helpers import validate_report


def test_task_ids_are_read_from_queued_and_unacked_messages():
    from zroact_tasks.control.reconcile import _task_id

    message = {"headers": {"id": "j1:s1:9"}, "body": "..."}
    assert _task_id(json.dumps(message)) == "j1:s1:9"  # a queue's list holds the message
    assert _task_id(json.dumps([message, "stage1", "stage1"])) == "j1:s1:9"  # ``unacked``
    assert _task_id(b"not json") is None and _task_id(json.dumps([])) is None


def _db(redis_server, n: int) -> str:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{n}"
    redis.Redis.from_url(url).flushdb()
    return url


def _spec(job_id: str = "j1") -> JobSpec:
    return JobSpec(job_id=job_id, video="/v.mp4", prompt="p", keyframe_stride=10,
                   sampling_rate=1, clip_length=16, slot_size=3, score_threshold=0.3,
                   nms_iou=0.5, max_detections=300, submitted_at=time.time(), priority=5)


@pytest.fixture
def store_db(redis_server):
    url = _db(redis_server, 11)
    jobs = JobStore(url, ttl_s=600)
    frames = FrameStore(connect(url), ttl_s=600)
    return url, jobs, frames


# --- one effect per step, whatever the number of runs -----------------------------------------
def test_frames_stored_twice_are_counted_once_and_none_after_the_job_ended(store_db):
    url, jobs, frames = store_db
    r = redis.Redis.from_url(url)
    jobs.create(_spec(), 60, 60)
    assert frames.put_many("j1", {0: b"abcd", 1: b"ef"}) == 6
    assert frames.put_many("j1", {0: b"abcd", 1: b"ef", 2: b"g"}) == 1  # a re-run chunk
    assert frames.used_bytes() == 7 and frames.held_bytes("j1") == 7
    frames.delete("j1")  # the job ended (finalize)
    assert frames.put_many("j1", {3: b"late"}) == -1  # a chunk still decoding stores nothing
    assert not r.exists("zroact:job:j1:frames") and frames.used_bytes() == 0


def test_frames_are_freed_once_every_slot_that_reads_them_ended(store_db):
    _, jobs, frames = store_db
    jobs.create(_spec(), 60, 60)
    frames.put_many("j1", {5: b"aa", 6: b"bbb"}, "stage1")
    frames.put_many("j1", {9: b"cccc"})
    shared = {5: (0, 1), 6: (0, 0)}  # frame 5 is read by slots 0 and 1, frame 6 by slot 0
    assert frames.free("j1", ended_slot=0, stage1=shared) == 3  # frame 6 only
    assert frames.free("j1", ended_slot=0, stage1=shared) == 0  # a second release: nothing
    assert frames.free("j1", ended_slot=1, stage1={5: (0, 1)}) == 2
    assert frames.free("j1", full=[9]) == 4
    assert frames.used_bytes() == 0 == frames.held_bytes("j1")


def test_budget_recount_drops_stale_admissions_and_drift(store_db):
    url, jobs, frames = store_db
    r = redis.Redis.from_url(url)
    jobs.create(_spec("live"), 60, 60)
    frames.put_many("live", {0: b"12345"})
    assert frames.admit("live", 100, 10**6, priority=5, submitted_at=1.0)
    assert frames.admit("gone", 50, 10**6, priority=5, submitted_at=2.0)
    r.incrby(USED, 999)  # drift: e.g. a reply lost after an INCRBY that was applied
    before, now, dropped = frames.reconcile(jobs.unfinished())
    assert (before, now, dropped) == (1004, 5, 1)
    assert r.hkeys(RESERVED) == [b"live"]


def test_admission_goes_in_line_and_a_job_counts_what_it_really_holds(store_db):
    _, jobs, frames = store_db
    assert frames.admit("a", 100, 250, priority=5, submitted_at=1.0)
    assert frames.admit("a", 100, 250, priority=5, submitted_at=1.0)  # a redelivered chunk 0
    frames.put_many("a", {0: b"x" * 180})  # holds more than its footprint: 180 counts
    assert not frames.admit("late", 100, 250, priority=9, submitted_at=2.0)
    assert not frames.admit("urgent", 100, 250, priority=0, submitted_at=3.0)
    assert frames.waiting() == ["urgent", "late"]  # priority first, then submission
    assert frames.wake(250) == []  # still no room
    frames.free("a", full=[0])
    assert frames.wake(250) == ["urgent"]  # 100 + 100 fit, a third would not
    frames.delete("a")
    assert frames.wake(250) == ["late"] and frames.waiting() == []


def test_chunks_are_sent_once_each_within_the_lead(store_db):
    _, jobs, _ = store_db
    jobs.create(_spec(), 60, 60)
    assert jobs.next_chunks("j1", 4, 2) == [1]  # chunk 0 is in flight (sent by submit)
    assert jobs.next_chunks("j1", 4, 2) == []  # two in flight: the lead is full
    assert jobs.chunk_done("j1", 0, 12, None) == (1, -1, 2)
    for slot in range(4):
        jobs.pump_slots("j1", 4, offer={"slot": slot, "keyframes": [slot]})
    assert jobs.next_chunks("j1", 4, 2) == []  # 1 chunk decoding + 4 slots queued
    jobs.pump_slots("j1", 4, release={"slot": 0, "keyframes": [0]})
    assert jobs.next_chunks("j1", 4, 2) == []  # 1 decoding + 3 queued: 4 more would be 11 > 8
    for slot in (1, 2, 3):
        jobs.pump_slots("j1", 4, release={"slot": slot, "keyframes": [slot]})
    assert jobs.next_chunks("j1", 4, 2) == [2]  # 1 decoding + 1 more: 8 slots, the lead
    assert jobs.chunk_done("j1", 2, 3, 245) == (2, 2, 3)  # chunk 2 found the end
    assert jobs.chunk_done("j1", 1, 12, None) == (3, 2, 3)
    assert jobs.next_chunks("j1", 4, 2) == []  # nothing past the end


def test_slots_offered_by_a_chunk_still_decoding_count_once(store_db):
    """A chunk offers each slot once its frames are stored: 2 of chunk 0's 4 slots offered and
    queued, 2 still decoding, make 4 of the lead's 8, so chunk 1 goes (counted twice: 10 > 8)."""
    _, jobs, _ = store_db
    jobs.create(_spec(), 60, 60)
    for slot in (0, 1):
        jobs.pump_slots("j1", 4, offer={"slot": slot, "keyframes": [slot]})
    assert jobs.next_chunks("j1", 4, 2) == [1]


def test_a_chunk_past_the_declared_end_waits_for_the_chunks_before_it(store_db):
    _, jobs, _ = store_db
    jobs.create(_spec(), 60, 60)
    assert jobs.next_chunks("j1", 4, 2, hint=1) == []  # chunk 0 may find the end: wait
    jobs.chunk_done("j1", 0, 12, None)  # it did not (the declared frame count was short)
    assert jobs.next_chunks("j1", 4, 2, hint=1) == [1]  # then one more, and so on
    assert jobs.next_chunks("j1", 4, 2, hint=1) == []


def test_a_held_message_whose_work_is_recorded_is_no_sign_of_work(store_db):
    """After a Redis restart a finished task's message can stay held (its ack lost) until the
    visibility timeout: the reconciler does not wait on it, but does on one not yet recorded."""
    from zroact_tasks.control.reconcile import Reconciler

    _, jobs, _ = store_db
    jobs.create(_spec(), 60, 60)
    jobs.record_keyframes("j1", [{"keyframe": 9, "detections": []}])
    jobs.record_group("j1", 0, {"verdict": None, "error": "x"}, [9, 19, 29])
    jobs.chunk_done("j1", 0, 12, None)
    done = {"j1:s1:9", "j1:s2:0", "j1:slot:0", "j1:ingest"}
    assert Reconciler.recorded(jobs, "j1", done)
    for pending in ("j1:s1:19", "j1:s2:1", "j1:ingest:1", "j1:finalize"):
        assert not Reconciler.recorded(jobs, "j1", done | {pending}), pending


def test_a_slot_offered_twice_enters_the_window_once(store_db):
    _, jobs, _ = store_db
    jobs.create(_spec(), 60, 60)
    item = {"slot": 0, "keyframes": [9, 19, 29]}
    assert jobs.pump_slots("j1", 1, offer=item) == [item]
    assert jobs.pump_slots("j1", 1, offer=item) == []  # the same slot from a second ingest
    assert jobs.pump_slots("j1", 1, release=item) == []  # nothing else was pending
    assert jobs.pending_and_inflight("j1") == ([], [])


def test_a_verdict_replaces_an_error_but_not_the_reverse(store_db):
    _, jobs, _ = store_db
    jobs.create(_spec(), 60, 60)
    jobs.update("j1", groups_total=2)
    assert jobs.record_group("j1", 0, {"error": "slot failed: something"}) == 1
    assert jobs.record_group("j1", 0, {"stage2": True, "verdict": {"action": "a"}}) == 1
    assert jobs.record_group("j1", 0, {"error": "late error"}) == 0
    assert jobs.record_group("j1", 0, {"stage2": True, "verdict": {"action": "b"}}) == 0
    assert jobs.groups("j1")[0]["verdict"] == {"action": "a"}
    assert jobs.record_group("j1", 1, {"error": "x"}) == 2  # closes the barrier, once
    assert jobs.record_group("j1", 1, {"stage2": True, "verdict": {"action": "c"}}) == 0
    assert jobs.groups("j1")[1] == {"error": "x"}  # the report is being built: frozen


def test_a_report_saved_twice_counts_the_job_once(store_db):
    url, jobs, _ = store_db
    jobs.create(_spec(), 60, 60)
    assert jobs.save_report("j1", '{"first": 1}', "succeeded")
    assert not jobs.save_report("j1", '{"second": 2}', "failed")
    assert jobs.report_json("j1") == '{"first": 1}'
    assert redis.Redis.from_url(url, decode_responses=True).hgetall(JOBS_ENDED) == {"succeeded": "1"}
    assert jobs.meta("j1")["state"] == "succeeded"


# --- re-sends racing the original, on a real cluster ----------------------------------------
@pytest.fixture
def quick_repair_cluster(redis_server, standin, assets, tmp_path):
    url = _db(redis_server, 12)
    env = {"ZROACT_MODEL": str(assets["model"]), "ZROACT_VLM_URL": standin.url,
           "ZROACT_REPAIR_QUIET_S": "2", "ZROACT_RECONCILE_INTERVAL_S": "0.5"}
    cluster, client = start_cluster(url, env, tmp_path / "logs")
    yield url, cluster, client
    cluster.stop()
    client.close()


def _requests_by_first_frame(standin, first: int) -> dict[int, int]:
    counts: dict[int, int] = {}
    for request in standin.requests[first:]:
        text = request["messages"][0]["content"][3]["text"]
        frame = int(text.split("frame ", 1)[1].split()[0].strip(",:;()"))
        counts[frame] = counts.get(frame, 0) + 1
    return counts


def test_ingest_and_a_slot_sent_twice_while_in_flight_make_one_report(quick_repair_cluster,
                                                                       standin, assets):
    url, _, client = quick_repair_cluster
    first = len(standin.requests)
    job = client.submit(assets["video"])
    spec = client.jobs.spec(job.id)
    # A second ingest of the same job while the first runs (a reconciler's re-send).
    client.app.send_task(pipeline.INGEST, args=(spec.model_dump(mode="json"),),
                         task_id=pipeline.ingest_id(job.id))
    deadline = time.monotonic() + 30
    while not client.jobs.r.sismember(f"zroact:job:{job.id}:offered", "0"):
        assert time.monotonic() < deadline, "slot 0 never offered"
        time.sleep(0.02)
    # Slot 0's chord and finalize-worthy steps again, while the originals are in flight.
    pipeline.send_slot(client.app, job.id, 0, [9, 19, 29], params={
        "clip_length": 16, "sampling_rate": 1, "score_threshold": 0.3, "nms_iou": 0.5,
        "max_detections": 300, "frame_size": json.loads(client.jobs.meta(job.id)["frame_size"])},
        judge=True, batch=1, priority=5)
    report = job.wait(timeout=120)
    validate_report(report.model_dump(mode="json"))
    assert report.status == "succeeded", [(s.slot, s.error) for s in report.slots if s.error] + [
        (k.index, k.error) for k in report.keyframes if k.error]
    assert [s.slot for s in report.slots] == list(range(13))
    assert all(s.verdict is not None for s in report.slots)
    counts = _requests_by_first_frame(standin, first)
    # Every slot asked once, slot 0 at most twice (its chord ran twice; one verdict kept).
    assert set(counts) == {s.keyframes[0] for s in report.slots}
    assert all(n == 1 for f, n in counts.items() if f != 9) and counts[9] in (1, 2)
    r = redis.Redis.from_url(url, decode_responses=True)
    assert r.hgetall(JOBS_ENDED) == {"succeeded": "1"}
    pipeline.send_finalize(client.app, job.id)  # finalize again, after the end
    time.sleep(1.0)
    assert r.hgetall(JOBS_ENDED) == {"succeeded": "1"}
    assert int(r.get(USED) or 0) == 0 and not r.exists(f"zroact:job:{job.id}:frames")


def test_a_job_whose_ingest_message_was_lost_is_repaired(quick_repair_cluster, assets):
    url, _, client = quick_repair_cluster
    r = redis.Redis.from_url(url, decode_responses=True)
    # The job's record was written, its ingest message lost (as Client.submit does, minus
    # the publish).
    spec = _spec(uuid.uuid4().hex).model_copy(update={"video": str(assets["short_video"])})
    client.jobs.create(spec, 3600)
    job = client.job(spec.job_id)
    report = job.wait(timeout=60)
    assert report.status == "succeeded"
    assert int(r.hget(RESENDS, "ingest") or 0) >= 1


def test_lost_ingest_chunks_are_sent_again_and_decoded_into_the_report_once(
        quick_repair_cluster, standin, assets, tmp_path):
    """Chunks of a one-minute video handed out by the pacing but never sent (as if their
    messages were lost): the reconciler re-sends them; every keyframe and slot is in the report
    once, each slot asked of the VLM once."""
    from zroact_tasks.testing.sample_media import make_video

    url, _, client = quick_repair_cluster
    r = redis.Redis.from_url(url, decode_responses=True)
    first = len(standin.requests)
    job = client.submit(make_video(tmp_path / "minute.mp4", frames=1800, fps=30))
    stolen: list[int] = []
    deadline = time.monotonic() + 60
    while len(stolen) < 2 and "chunks_end" not in client.jobs.meta(job.id):
        assert time.monotonic() < deadline, "no chunk to take"
        # Taken with a lead above the workers' (2): handed out, never sent, whatever the race.
        stolen += client.jobs.next_chunks(job.id, 4, 3)
        time.sleep(0.01)
    report = job.wait(timeout=180)
    assert stolen and report.status == "succeeded", (stolen, report.status, report.error)
    assert [k.index for k in report.keyframes] == [10 * i + 9 for i in range(180)]
    assert [s.slot for s in report.slots] == list(range(60))
    assert all(s.verdict is not None for s in report.slots)
    counts = _requests_by_first_frame(standin, first)
    assert sorted(counts) == [s.keyframes[0] for s in report.slots]
    assert set(counts.values()) == {1}, counts  # no slot of a re-sent chunk judged twice
    assert int(r.hget(RESENDS, "ingest") or 0) >= len(stolen)


def test_a_job_whose_stage2_messages_were_lost_is_repaired(quick_repair_cluster, standin, assets):
    url, cluster, client = quick_repair_cluster
    stage2 = [w for w in cluster.workers if w.role == "stage2"][0]
    cluster.remove_worker(stage2)  # Stage 2 requests wait in their queue
    r = redis.Redis.from_url(url, decode_responses=True)
    job = client.submit(assets["short_video"])  # 47 frames: 4 keyframes, one full slot
    lists = lambda: [k for k in r.scan_iter("stage2*") if r.type(k) == "list"]  # noqa: E731
    deadline = time.monotonic() + 60
    while not lists() and time.monotonic() < deadline:  # one list per priority level
        time.sleep(0.05)
    assert sum(r.llen(k) for k in lists()) == 1
    r.delete(*lists())  # the message is lost, as with a Redis that died before its fsync
    fresh = cluster.add_worker("stage2")
    cluster.wait_ready(client.app, workers=[fresh])
    report = job.wait(timeout=60)
    assert report.status == "succeeded" and report.slots[0].verdict is not None
    assert int(r.hget(RESENDS, "stage2") or 0) == 1


def test_the_slot_error_path_records_only_a_real_failure(store_db, monkeypatch):
    """Seen after a Redis restart: the chord's error path ran for a slot whose body had
    succeeded, and recorded the body's result as the error."""
    from zroact_tasks import resources
    from zroact_tasks.app import make_app
    from zroact_tasks.config import Settings
    from zroact_tasks.control import tasks as control_tasks

    url, jobs, frames = store_db
    settings = Settings(redis_url=url)
    app = make_app(settings)
    monkeypatch.setattr(control_tasks, "app", app)
    monkeypatch.setattr(control_tasks, "get_settings", lambda: settings)
    monkeypatch.setattr(resources, "jobs", lambda: jobs)
    spec = _spec()
    jobs.create(spec, 60)
    jobs.update("j1", groups_total=3, frame_size="[320, 240]", stage2="true")
    keyframes = [9, 19, 29]
    body = pipeline.slot_ready_id("j1", 0)
    app.backend.store_result(body, {"slot": 0, "stage2": True}, "SUCCESS")
    for kf in keyframes:
        app.backend.store_result(pipeline.detect_id("j1", kf), [{"keyframe": kf}], "SUCCESS")
    control_tasks.slot_failed.run(body, "j1", 0, keyframes)
    assert jobs.group_record("j1", 0) is None  # nothing failed: nothing recorded

    # Slot 1: a header task really failed (Celery never turns a stored SUCCESS into a FAILURE).
    later = [39, 49, 59]
    body = pipeline.slot_ready_id("j1", 1)
    app.backend.mark_as_failure(pipeline.detect_id("j1", 49), ValueError("boom"))
    control_tasks.slot_failed.run(body, "j1", 1, later)
    assert jobs.group_record("j1", 1) == {"error": "slot failed: ValueError: boom"}
    # The slot's verdict, arriving after the error, wins.
    jobs.record_group("j1", 1, {"stage2": True, "verdict": {"action": "none"}})
    assert "verdict" in jobs.group_record("j1", 1)

    # Slot 2: the header succeeded but the join failed on Redis (seen with Redis SIGKILLed on a
    # loaded machine): not the slot's failure, nothing recorded (the reconciler sends it again).
    from celery.exceptions import ChordError

    third = [69, 79, 89]
    for kf in third:
        app.backend.store_result(pipeline.detect_id("j1", kf), [{"keyframe": kf}], "SUCCESS")
    body = pipeline.slot_ready_id("j1", 2)
    app.backend.mark_as_failure(body, ChordError("Join error: network:ConnectionError"))
    control_tasks.slot_failed.run(body, "j1", 2, third)
    assert jobs.group_record("j1", 2) is None
    # ...while a body that itself raised is the slot's failure.
    app.backend.mark_as_failure(body, RuntimeError("body broke"))
    control_tasks.slot_failed.run(body, "j1", 2, third)
    assert jobs.group_record("j1", 2) == {"error": "slot failed: RuntimeError: body broke"}
    app.close()


def test_a_redis_command_rides_out_a_restart(tmp_path):
    """The clients' retries (redisconn.py) outlast a restart; a shorter bound gives up."""
    import threading

    from zroact_tasks.local import EmbeddedRedis

    server = EmbeddedRedis(appendonly=True, workdir=tmp_path).start()
    try:
        patient = connect(server.url, retry_s=15)
        hasty = connect(server.url, retry_s=0.3)
        patient.set("k", "v")
        server.stop()  # graceful: the AOF keeps "k"

        back = []

        def restart():
            time.sleep(2.0)
            server.start()
            back.append(time.monotonic())

        threading.Thread(target=restart, daemon=True).start()
        with pytest.raises(redis.ConnectionError):
            hasty.get("k")
        asked = time.monotonic()
        assert patient.get("k") == b"v"
        assert back and asked < back[0]  # asked while Redis was down, answered once it was back
    finally:
        server.stop()
