"""Two promises of the README, checked on a private Redis: ``Job.wait()`` rides pub/sub (no
polling), and the bookkeeping between the stages is queued at priority level 0."""

from __future__ import annotations

import base64
import json

import pytest
import redis

from zroact_tasks import pipeline
from zroact_tasks.client import Client
from zroact_tasks.config import Settings
from zroact_tasks.errors import JobTimeoutError
from zroact_tasks.local import EmbeddedRedis


@pytest.fixture
def private_redis():
    with EmbeddedRedis() as server:
        yield server


def _calls(r: redis.Redis, command: str) -> int:
    return int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))


def test_wait_subscribes_once_and_does_not_poll(private_redis, assets):
    client = Client(settings=Settings(redis_url=private_redis.url))
    try:
        job = client.submit(assets["short_video"])  # no worker: it cannot end
        r = redis.Redis.from_url(private_redis.url)
        before = {c: _calls(r, c) for c in ("get", "mget", "subscribe", "hget")}
        with pytest.raises(JobTimeoutError):
            job.wait(timeout=3.0)
        after = {c: _calls(r, c) for c in before}
        # A polling backend reads the result every 0.5 s (6+ reads in 3 s); pub/sub subscribes
        # once and reads the stored result once before it blocks.
        assert after["subscribe"] - before["subscribe"] >= 1
        reads = sum(after[c] - before[c] for c in ("get", "mget", "hget"))
        assert reads <= 3, (before, after)
    finally:
        client.close()


def test_bookkeeping_is_queued_at_level_zero_whatever_the_jobs_priority(private_redis):
    client = Client(settings=Settings(redis_url=private_redis.url))
    app = client.app
    r = redis.Redis.from_url(private_redis.url)
    try:
        params = {"clip_length": 16, "sampling_rate": 1, "score_threshold": 0.3, "nms_iou": 0.5,
                  "max_detections": 300, "frame_size": [320, 240], "stride": 10}
        pipeline.send_slot(app, "jobp", 0, [9, 19, 29], params=params, judge=True, batch=3,
                           priority=7)
        pipeline.send_finalize(app, "jobp")
        lists = {k.decode(): [json.loads(m) for m in r.lrange(k, 0, -1)]
                 for k in r.scan_iter("*") if r.type(k) == b"list"}
        # Stage 1 waits at the job's level (7 -> kombu's 6-8 list) ...
        (stage1,) = [m for name, ms in lists.items() if name.startswith("stage1") for m in ms]
        assert stage1["properties"]["priority"] == 7
        # ... its chord body (slot_ready) and error callback will be sent at level 0 ...
        _, _, embed = json.loads(base64.b64decode(stage1["body"]))  # args, kwargs, embed
        body = embed["chord"]
        assert body["options"]["priority"] == pipeline.BOOKKEEPING_PRIORITY == 0
        assert body["options"]["link_error"][0]["options"]["priority"] == 0
        # ... and finalize is on the control queue's level-0 list (the plain queue name).
        assert [m["headers"]["task"] for m in lists.get("control", [])] == [pipeline.FINALIZE]
        assert lists["control"][0]["properties"]["priority"] == 0
    finally:
        client.close()
