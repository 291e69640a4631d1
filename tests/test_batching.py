"""Cross-job dynamic batching of Stage 1: merged calls, right rows to the right task, no loss."""

from __future__ import annotations

import json
import signal
import threading
import time

import numpy as np
import pytest
import redis

from zroact_tasks.stage1.batcher import DynamicBatcher
from zroact_tasks.stage1.detector import OnnxDetector
from zroact_tasks.testing.simgpu import read_log
from zroact_tasks.testing.taskevents import EventRecorder

from .conftest import start_cluster
from .helpers import validate_report


def test_batcher_merges_concurrent_calls_and_returns_each_its_own_rows(assets):
    det = OnnxDetector(assets["model"])
    rng = np.random.default_rng(0)
    clips = [rng.normal(size=(1, 3, 16, 224, 224)).astype(np.float32) for _ in range(8)]
    clips[3][0, 0, 15, 50:90, 60:100] = 3.0  # a red square only in clip 3's keyframe
    expected = [det.infer(c) for c in clips]
    batcher = DynamicBatcher(det.infer, max_batch=8, timeout_s=2.0)
    results: dict[int, np.ndarray] = {}
    barrier = threading.Barrier(8)

    def call(i: int) -> None:
        barrier.wait()
        results[i] = batcher.infer(clips[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(batcher.calls) == 8 and len(batcher.calls) < 8  # merged
    for i in range(8):
        np.testing.assert_allclose(results[i], expected[i], rtol=1e-4, atol=1e-4)


def test_a_failing_batch_fails_every_caller_and_the_batcher_lives_on():
    def infer(x):
        if x.shape[0] == 2:
            raise RuntimeError("device lost")
        return x[:, :1]

    batcher = DynamicBatcher(infer, max_batch=2, timeout_s=1.0)
    errors = []

    def call():
        try:
            batcher.infer(np.zeros((1, 3), np.float32))
        except RuntimeError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == ["device lost", "device lost"]
    assert batcher.infer(np.ones((1, 3), np.float32)).shape == (1, 1)


def test_the_inference_thread_takes_the_most_urgent_clips_first():
    started = threading.Event()
    gate = threading.Event()
    order: list[float] = []

    def infer(x):
        order.append(float(x[0, 0]))
        if len(order) == 1:
            started.set()
            gate.wait(10)  # the first call holds the "GPU" while the others queue
        return x

    batcher = DynamicBatcher(infer, max_batch=1, timeout_s=0.0)
    first = threading.Thread(target=batcher.infer, args=(np.full((1, 1), -1.0, np.float32),))
    first.start()
    assert started.wait(10)
    threads = []
    for value, priority in ((1.0, 9), (2.0, 5), (3.0, 0), (4.0, 9), (5.0, 0)):
        t = threading.Thread(target=batcher.infer, args=(np.full((1, 1), value, np.float32),),
                             kwargs={"priority": priority})
        t.start()
        threads.append(t)
        time.sleep(0.02)  # arrival order
    gate.set()
    for t in [first, *threads]:
        t.join(10)
    assert order == [-1.0, 3.0, 5.0, 2.0, 1.0, 4.0]  # by priority, then arrival; one clip a call
    assert batcher.calls == [1] * 6


def test_the_inference_thread_keeps_delivery_order_among_prepared_clips():
    from zroact_tasks.stage1.batcher import arrival

    gate, started, order = threading.Event(), threading.Event(), []

    def infer(x):
        order.append(float(x[0, 0]))
        if len(order) == 1:
            started.set()
            gate.wait(10)
        return x

    batcher = DynamicBatcher(infer, max_batch=1, timeout_s=0.0)
    first = threading.Thread(target=batcher.infer, args=(np.full((1, 1), -1.0, np.float32),))
    first.start()
    assert started.wait(10)
    places = [arrival() for _ in range(3)]  # delivered 0, 1, 2 ...
    threads = []
    for value in (2.0, 0.0, 1.0):  # ... prepared 2, 0, 1
        t = threading.Thread(target=batcher.infer, args=(np.full((1, 1), value, np.float32),),
                             kwargs={"order": places[int(value)]})
        t.start()
        threads.append(t)
        time.sleep(0.02)
    gate.set()
    for t in [first, *threads]:
        t.join(10)
    assert order == [-1.0, 0.0, 1.0, 2.0]


def test_frame_cache_fetches_and_decodes_each_frame_once():
    import cv2

    from zroact_tasks.stage1.detect import FrameCache

    class Store:
        def __init__(self):
            self.asked: list[list[int]] = []

        def get_many(self, job_id, indices, kind="full"):
            self.asked.append(list(indices))
            return {i: cv2.imencode(".png", np.full((4, 4, 3), i, np.uint8))[1].tobytes()
                    for i in indices}

    store, cache = Store(), FrameCache(max_frames=20)
    a = cache.get_many(store, "j", list(range(0, 16)))
    b = cache.get_many(store, "j", list(range(10, 26)))
    assert store.asked == [list(range(16)), list(range(16, 26))]  # the 6 shared frames: cached
    assert int(b[12][0, 0, 0]) == 12 and b[12] is a[12]
    cache.get_many(store, "other", [0])
    assert store.asked[-1] == [0]  # per job
    assert len(cache._frames) == 20  # bounded: the least recently used went


def test_a_stage1_only_worker_runs_pipelined_threads():
    from types import SimpleNamespace

    from celery.concurrency.prefork import TaskPool as Prefork

    from zroact_tasks.config import Settings
    from zroact_tasks.stage1 import tasks

    assert tasks._pool_name(Prefork) == "prefork" and tasks._pool_name("threads") == "threads"
    assert tasks.pipeline_threads(Settings(), 1) == 4
    assert tasks.pipeline_threads(Settings(stage1_max_batch=8), 2) == 8

    def worker(queues, pool=Prefork, concurrency=1):
        app = SimpleNamespace(amqp=SimpleNamespace(queues=SimpleNamespace(
            consume_from={q: None for q in queues})))
        return SimpleNamespace(app=app, pool_cls=pool, concurrency=concurrency)

    control = worker(["control"])
    tasks._choose_pool(sender=control)
    assert control.pool_cls is Prefork and control.concurrency == 1  # other roles untouched
    try:
        stage1 = worker(["stage1"], concurrency=2)
        tasks._choose_pool(sender=stage1)
        assert (stage1.pool_cls, stage1.concurrency) == ("threads", 4)
    finally:
        tasks._pipelined = False


def _batching_env(assets, standin, tmp_path, timeout_ms: float) -> dict[str, str]:
    options = {"gpu_lock": str(tmp_path / "gpu.lock"), "per_clip_s": 0.02, "fixed_s": 0.1,
               "log_file": str(tmp_path / "calls.jsonl")}
    return {"ZROACT_MODEL": str(assets["model"]), "ZROACT_VLM_URL": standin.url,
            "ZROACT_DETECTOR": "zroact_tasks.testing.simgpu:SimulatedGPUDetector",
            "ZROACT_DETECTOR_OPTIONS": json.dumps(options), "ZROACT_STAGE1_MAX_BATCH": "8",
            "ZROACT_STAGE1_BATCH_TIMEOUT_MS": str(timeout_ms), "ZROACT_VISIBILITY_TIMEOUT_S": "10"}


# One video per job, each telling its rows apart: the square's colour is the class, its size and
# the frame size move the box. Same keyframe indices in every job, so rows handed to the clip of
# the same index in another job (a swap the batcher could make) show as a wrong class or box.
BATCH_VIDEOS = [  # colour, class id, width, height, side
    ("red", 0, 320, 240, 40), ("green", 1, 320, 240, 40), ("blue", 2, 320, 240, 64),
    ("red", 0, 256, 192, 24),
]


def test_clips_of_concurrent_jobs_share_calls(redis_server, standin, assets, tmp_path):
    from zroact_tasks.testing.sample_media import make_video, square_bbox

    videos = [make_video(tmp_path / f"{colour}-{w}x{h}-{side}.mp4", frames=47, width=w, height=h,
                         side=side, colour=colour)
              for colour, _, w, h, side in BATCH_VIDEOS]
    url = redis_server.url.rsplit("/", 1)[0] + "/12"
    redis.Redis.from_url(url).flushdb()
    cluster, client = start_cluster(url, _batching_env(assets, standin, tmp_path, 50), tmp_path / "logs")
    try:
        jobs = [client.submit(video) for video in videos]
        reports = [j.wait(timeout=120) for j in jobs]
    finally:
        cluster.stop()
        client.close()
    for report, (colour, class_id, w, h, side) in zip(reports, BATCH_VIDEOS):
        validate_report(report.model_dump(mode="json"))
        assert report.status == "succeeded"
        assert (report.video.width, report.video.height) == (w, h)
        assert [k.index for k in report.keyframes] == [9, 19, 29, 39]
        for kf in report.keyframes:  # each clip got its own rows back: the square of its frame
            top = kf.detections[0]
            assert top.class_id == class_id, (colour, kf.index, top)
            assert top.box == pytest.approx(square_bbox(kf.index, w, h, side), abs=3), (colour, kf.index)
    sizes = [e["n"] for e in read_log(tmp_path / "calls.jsonl")]
    assert sum(sizes) == 16 and max(sizes) > 1


def test_sigkill_with_a_half_filled_batch_loses_nothing(redis_server, standin, assets, tmp_path):
    url = redis_server.url.rsplit("/", 1)[0] + "/13"
    redis.Redis.from_url(url).flushdb()
    # A 30 s batch timeout: 4 clips wait in the buffer for 4 more that never come.
    cluster, client = start_cluster(url, _batching_env(assets, standin, tmp_path, 30_000),
                                    tmp_path / "logs")
    try:
        with EventRecorder(client.app) as recorder:
            job = client.submit(assets["short_video"])

            def buffered() -> int:
                return sum(1 for t in list(recorder.log.tasks.values())
                           if t.name == "zroact.stage1.detect_clips" and t.started)

            deadline = time.monotonic() + 60
            while buffered() < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert buffered() == 4
            stage1 = [w for w in cluster.workers if w.role == "stage1"][0]
            cluster.workers.remove(stage1)
            stage1.signal(signal.SIGKILL)
            stage1.proc.wait()
            replacement = cluster.add_worker(
                "stage1", env={"ZROACT_STAGE1_BATCH_TIMEOUT_MS": "50"})
            cluster.wait_ready(client.app, workers=[replacement])
            report = job.wait(timeout=90)
            time.sleep(0.3)
    finally:
        cluster.stop()
        client.close()
    validate_report(report.model_dump(mode="json"))
    assert report.status == "succeeded" and len(report.keyframes) == 4
    assert all(k.detections for k in report.keyframes)
    # Runs, not ids (a rerun keeps its id): each slot's chord body (one full, one partial) ran
    # once; each clip ran twice, buffered on the killed worker, then on the replacement, which
    # alone reported.
    bodies = recorder.log.starts("zroact.control.slot_ready", prefix=job.id)
    assert sorted(bodies) == [f"{job.id}:slot:0", f"{job.id}:slot:1"] and set(bodies.values()) == {1}
    clips = {i: t for i, t in recorder.log.tasks.items() if t.name == "zroact.stage1.detect_clips"}
    assert len(clips) == 4, clips
    for t in clips.values():
        assert t.start_hosts == [stage1.name, replacement.name] and t.succeeded == 1, t
    sizes = [e["n"] for e in read_log(tmp_path / "calls.jsonl")]
    assert sum(sizes) == 4  # only the replacement ran them: nothing ran before the kill
