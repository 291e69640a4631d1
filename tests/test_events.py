"""Results as they happen: each keyframe's and slot's result is an event the moment it is
recorded, readable while the job runs, resumable without a missed or repeated event."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import redis

from zroact_tasks import events
from zroact_tasks.jobstate import events_key


def test_events_arrive_while_the_job_runs_and_match_its_report(client, standin, assets):
    """With the VLM held, Stage 1's events arrive although no slot can end; once released,
    every keyframe and slot comes once, in order, as the report then holds it, then ``end``."""
    standin.hold()
    first = len(standin.requests)
    job = client.submit(assets["video"])  # 41 keyframes, 13 full slots and a partial one
    seen, early = [], []
    try:
        stream = job.events()
        for event in stream:
            seen.append(event)
            if event.kind == "keyframe" and len(early) < 5:
                early.append(event)
            if len(early) == 5:
                break
        assert job.report() is None  # the job is still running: these came before its end
        assert standin.wait_for_requests(first + 1, timeout=60)
    finally:
        standin.release()
    seen += list(job.events(since=seen[-1].id))  # resumed after a "disconnect"
    report = job.wait(timeout=120)
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))  # none missed, none repeated
    assert len({e.id for e in seen}) == len(seen) and all(e.missed == 0 for e in seen)
    kinds = [e.kind for e in seen]
    assert kinds.count("keyframe") == 41 and kinds.count("slot") == 14 and kinds[-1] == "end"
    assert seen[-1].status == report.status == "succeeded"
    by_index = {e.keyframe.index: e.keyframe for e in seen if e.kind == "keyframe"}
    assert [by_index[k.index] for k in report.keyframes] == report.keyframes
    by_slot = {e.slot.slot: e.slot for e in seen if e.kind == "slot"}
    assert [by_slot[s.slot] for s in report.slots] == report.slots  # verdicts as reported
    assert by_slot[13].keyframes == [399, 409] and by_slot[13].verdict is None  # Stage 1 only
    # A slot's event comes after its keyframes' events.
    position = {(e.kind, tuple(e.keyframes)): i for i, e in enumerate(seen)}
    for slot in report.slots:
        assert all(position[("keyframe", (k,))] < position[("slot", tuple(slot.keyframes))]
                   for k in slot.keyframes)


def test_a_reader_that_falls_behind_the_cap_is_told_what_it_missed(redis_server):
    """The stream is capped; a resumed reader learns how many events it can no longer get."""
    from zroact_tasks.jobstate import JobStore

    url = redis_server.url.rsplit("/", 1)[0] + "/12"
    store = JobStore(url, 600, events_max=100)
    job_id = "cap" + os.urandom(4).hex()
    store.record_keyframes(job_id, [{"keyframe": 9, "detections": []}])
    first = events.read(store.r, job_id)[0]
    store.record_keyframes(job_id, [{"keyframe": 9 + 10 * i, "detections": []} for i in range(1, 400)])
    length = store.r.xlen(events_key(job_id))
    assert 100 <= length < 400  # trimmed (approximately: whole stream nodes)
    assert events.seq_of(store.r, job_id, first.id) is None  # the reader's place is gone
    resumed = events.follow(store.r, job_id, first.id, last_seq=1, ended=lambda: True, poll_ms=10)
    head = next(resumed)
    assert head.missed == head.seq - 2 > 0 and head.seq == 400 - length + 1
    # A duplicate result says nothing; a result mending an error is an event.
    before = store.r.xlen(events_key(job_id))
    store.record_keyframes(job_id, [{"keyframe": 9, "detections": []}])
    store.record_keyframes(job_id, [{"keyframe": 5000, "error": "frames missing"}])
    store.record_keyframes(job_id, [{"keyframe": 5000, "error": "again"}])
    store.record_keyframes(job_id, [{"keyframe": 5000, "detections": []}])
    tail = [e for e in events.read(store.r, job_id, head.id) if e.keyframes == [5000]]
    assert [e.keyframe.error for e in tail] == ["frames missing", None]
    assert store.r.xlen(events_key(job_id)) - before <= 2
    store.r.delete(events_key(job_id), f"zroact:job:{job_id}", f"zroact:job:{job_id}:kf")


def test_submit_follow_prints_a_line_a_slot_and_json_lines_every_event(client, assets, tmp_path):
    env = {**os.environ, "ZROACT_REDIS_URL": client.settings.redis_url}
    plain = subprocess.run([sys.executable, "-m", "zroact_tasks.cli", "submit",
                            str(assets["short_video"]), "--follow"], capture_output=True,
                           text=True, timeout=120, env=env)
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.strip().splitlines()
    job_id = lines[0]
    slots = sorted(lines[1:3])  # as each ended: the Stage-1-only slot 1 may come first
    assert [line.split(":")[0] for line in slots] == ["slot 0 (frames 9, 19, 29)",
                                                      "slot 1 (frames 39)"]
    assert "confirmed" in slots[0] and slots[1].endswith("Stage 1 only")
    assert f"job {job_id}: succeeded" in lines[3]
    machine = subprocess.run([sys.executable, "-m", "zroact_tasks.cli", "submit",
                              str(assets["short_video"]), "--follow", "--json-lines"],
                             capture_output=True, text=True, timeout=120, env=env)
    assert machine.returncode == 0, machine.stderr
    parsed = [json.loads(line) for line in machine.stdout.splitlines()[1:] if line.startswith("{")]
    assert [e["kind"] for e in parsed].count("keyframe") == 4
    assert [e["seq"] for e in parsed] == list(range(1, 8)) and parsed[-1]["kind"] == "end"


def test_events_of_a_cancelled_job_end_with_its_state(client, standin, assets):
    standin.hold()
    try:
        job = client.submit(assets["video"])
        got: list = []
        reader = threading.Thread(target=lambda: got.extend(job.events()), daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.cancel()
    finally:
        standin.release()
    reader.join(60)
    assert not reader.is_alive() and got[-1].kind == "end" and got[-1].status == "cancelled"
    r = redis.Redis.from_url(client.settings.redis_url)
    assert r.ttl(events_key(job.id)) > 0  # expires with the job's records
