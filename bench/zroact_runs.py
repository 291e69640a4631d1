"""Run zroact itself under the simulated GPUs: a real Redis, real workers, vLLM stand-ins."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from zroact_tasks.client import Client
from zroact_tasks.config import Settings
from zroact_tasks.local import EmbeddedRedis, LocalCluster
from zroact_tasks.testing.vllm_standin import VLLMStandIn

from zroact_tasks.testing.taskevents import (
    EventRecorder,
    busy_fraction,
    dispatch_latencies,
    handoffs,
)

ROOT = Path(__file__).resolve().parent.parent
SEED_STAGE1_S = 0.163  # per clip, the seed's RTX A6000 measurement
SEED_VLM_S = 2.07  # per request with one in flight
VLM_GROWTH = 0.10  # +10 % latency per extra request in flight


@dataclass(frozen=True)
class Setup:
    """One zroact deployment: GPU-bound Stage 1 processes and Stage 2 workers (one VLM each)."""

    stage2_workers: int = 1
    stage2_concurrency: int = 3
    stage1_processes: int = 2
    stage1_batch: int = 1
    jobs: int = 1


def _env(model: Path, lock: Path, scale: float, stage1_log: Path, batch: int) -> dict[str, str]:
    options = {"gpu_lock": str(lock), "per_clip_s": SEED_STAGE1_S * scale, "log_file": str(stage1_log)}
    return {
        "ZROACT_MODEL": str(model),
        "ZROACT_DETECTOR": "zroact_tasks.testing.simgpu:SimulatedGPUDetector",
        "ZROACT_DETECTOR_OPTIONS": json.dumps(options),
        "ZROACT_STAGE1_BATCH": str(batch),
        "ZROACT_VLM_MAX_RETRIES": "0",
    }


def run_zroact(setup: Setup, *, video: Path, warmup_video: Path, model: Path, scale: float) -> dict:
    """Makespan of ``setup.jobs`` jobs submitted at once, plus latencies from task events."""
    tmp = Path(tempfile.mkdtemp(prefix="zroact-bench-"))
    standins = [VLLMStandIn(latency_s=SEED_VLM_S * scale, latency_growth=VLM_GROWTH).start()
                for _ in range(setup.stage2_workers)]
    env = _env(model, tmp / "gpu0.lock", scale, tmp / "stage1.jsonl", setup.stage1_batch)
    env["ZROACT_VLM_URL"] = standins[0].url  # the control worker decides Stage 2 runs
    with EmbeddedRedis() as server:
        cluster = LocalCluster(server.url, env=env, log_dir=tmp / "logs", supervise=False)
        concurrency = {}
        for role, n, extra in [("control", 4, {}), ("stage1", setup.stage1_processes, {})] + [
            ("stage2", setup.stage2_concurrency, {"ZROACT_VLM_URL": s.url}) for s in standins
        ]:
            worker = cluster.add_worker(role, concurrency=n, env=extra)
            concurrency[worker.name] = n
        client = Client(settings=Settings(redis_url=server.url))
        try:
            cluster.wait_ready(client.app)
            client.submit(warmup_video).wait(timeout=120)  # sessions loaded, connections open
            for s in standins:
                s.requests.clear()
            (tmp / "stage1.jsonl").unlink(missing_ok=True)
            with EventRecorder(client.app) as recorder:
                time.sleep(0.2)  # the receiver is bound before the first task is sent
                start = time.time()
                jobs = [client.submit(video) for _ in range(setup.jobs)]
                reports = [job.wait(timeout=3600) for job in jobs]
                end = time.time()
                time.sleep(0.3)  # the last events arrive
        finally:
            cluster.stop()
            client.close()
            for s in standins:
                s.stop()
    tasks = recorder.log.tasks
    judge_intervals: dict[str, list[tuple[float, float]]] = {}
    for t in tasks.values():
        if t.name.startswith("zroact.stage2") and t.started and t.ended:
            judge_intervals.setdefault(t.hostname, []).append((t.started, t.ended))
    util = [busy_fraction(v, start, end) for v in judge_intervals.values()]
    return {
        "makespan_s": end - start,
        "statuses": sorted({r.status for r in reports}),
        "requests": sum(len(s.requests) for s in standins),
        "dispatch_s": dispatch_latencies(list(tasks.values()), concurrency),
        "handoff_s": handoffs(tasks, [j.id for j in jobs], stride=10, slot_size=3),
        "stage2_utilisation": sum(util) / max(1, setup.stage2_workers),
        "stage1_log": (tmp / "stage1.jsonl").read_text() if (tmp / "stage1.jsonl").exists() else "",
        "logs": str(tmp / "logs"),
    }
