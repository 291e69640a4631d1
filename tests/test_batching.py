"""Cross-job dynamic batching of Stage 1: merged calls, right rows to the right task, no loss."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter

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


def _batching_env(assets, standin, tmp_path, timeout_ms: float) -> dict[str, str]:
    options = {"gpu_lock": str(tmp_path / "gpu.lock"), "per_clip_s": 0.02, "fixed_s": 0.1,
               "log_file": str(tmp_path / "calls.jsonl")}
    return {"ZROACT_MODEL": str(assets["model"]), "ZROACT_VLM_URL": standin.url,
            "ZROACT_DETECTOR": "zroact_tasks.testing.simgpu:SimulatedGPUDetector",
            "ZROACT_DETECTOR_OPTIONS": json.dumps(options), "ZROACT_STAGE1_MAX_BATCH": "8",
            "ZROACT_STAGE1_BATCH_TIMEOUT_MS": str(timeout_ms), "ZROACT_VISIBILITY_TIMEOUT_S": "10"}


def test_clips_of_concurrent_jobs_share_calls(redis_server, standin, assets, tmp_path):
    url = redis_server.url.rsplit("/", 1)[0] + "/12"
    redis.Redis.from_url(url).flushdb()
    cluster, client = start_cluster(url, _batching_env(assets, standin, tmp_path, 50), tmp_path / "logs")
    try:
        jobs = [client.submit(assets["short_video"]) for _ in range(4)]
        reports = [j.wait(timeout=120) for j in jobs]
    finally:
        cluster.stop()
        client.close()
    for report in reports:
        validate_report(report.model_dump(mode="json"))
        assert report.status == "succeeded"
        for kf in report.keyframes:  # each clip got its own rows back: the square of its frame
            from zroact_tasks.testing.sample_media import square_bbox

            assert kf.detections[0].box == pytest.approx(square_bbox(kf.index, 320, 240, 40), abs=3)
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
    bodies = Counter(t.id for t in recorder.log.tasks.values() if t.name == "zroact.control.slot_ready")
    assert sorted(bodies.values()) == [1, 1]  # each slot's chord body (one full, one partial) ran once
    sizes = [e["n"] for e in read_log(tmp_path / "calls.jsonl")]
    assert sum(sizes) == 4  # only the replacement ran them: nothing ran before the kill
