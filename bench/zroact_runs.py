"""Run zroact itself under the simulated GPUs: a real Redis, real workers, vLLM stand-ins."""

from __future__ import annotations

import json
import os
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
_TICK = os.sysconf("SC_CLK_TCK")


def process_cpu_s(pids: list[int]) -> dict[int, tuple[int, float]]:
    """(process group, CPU seconds (user + system) so far) of each live process in these
    process groups (a worker's parent and its pool children), from /proc."""
    groups = set(pids)
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, pgrp = int(entry), int(fields[2])
        if pid in groups or pgrp in groups:
            out[pid] = (pid if pid in groups else pgrp, (int(fields[11]) + int(fields[12])) / _TICK)
    return out


def cpu_between(before: dict, after: dict, names: dict[int, str] | None = None) -> dict[str, float]:
    """CPU seconds spent between two samples per group name (a process born in between counts
    from 0; one that died in between is lost: pool children live for the whole run)."""
    out: dict[str, float] = {}
    for pid, (group, t) in after.items():
        name = (names or {}).get(group, str(group))
        out[name] = out.get(name, 0.0) + t - before.get(pid, (group, 0.0))[1]
    return out


def gpu_idle_while_clips_wait(gpu_calls: list[dict], stage1_tasks: list, start: float,
                              end: float) -> float:
    """Seconds in [start, end] when the simulated GPU (its own log) was idle while some clip
    sent to Stage 1 had not started on it yet: clips sent so far (task-sent events) minus clips
    of the calls that have taken the GPU so far > 0. That is the GPU waiting for the CPU (the
    clip queued, reserved or being prepared), not for ingest or for Stage 2."""
    events = sorted([(t.sent, 0, 1) for t in stage1_tasks if t.sent] +
                    [(c["t_lock_acquired"], 1, -c["n"]) for c in gpu_calls])
    busy = sorted((c["t_lock_acquired"], c["t_end"]) for c in gpu_calls)
    idle, waiting, cursor, k = 0.0, 0, start, 0
    busy_until = float("-inf")

    def idle_between(a: float, b: float) -> float:
        nonlocal k, busy_until
        total, t = 0.0, a
        while t < b:
            while k < len(busy) and busy[k][1] <= t:
                busy_until = max(busy_until, busy[k][1])
                k += 1
            if k < len(busy) and busy[k][0] <= t:  # inside a busy interval
                t = min(b, busy[k][1])
                continue
            nxt = busy[k][0] if k < len(busy) else b
            total += min(b, nxt) - t
            t = min(b, nxt)
        return total

    for when, _, delta in events:
        when = min(max(when, start), end)
        if waiting > 0 and when > cursor:
            idle += idle_between(cursor, when)
        cursor = max(cursor, when)
        waiting += delta
    if waiting > 0 and end > cursor:
        idle += idle_between(cursor, end)
    return idle


def gpu_idle_while_waiting(gpu_calls: list[dict], stage1_tasks: list, start: float,
                           end: float) -> float:
    """Seconds in [start, end] when the simulated GPU (its own log: lock held) was idle while
    some Stage 1 task was waiting for it or being prepared: sent and not yet finished."""
    busy = sorted((c["t_lock_acquired"], c["t_end"]) for c in gpu_calls)
    waiting = sorted((t.sent, t.ended) for t in stage1_tasks if t.sent and t.ended)
    # Union of waiting intervals minus union of busy intervals, clipped to [start, end].
    def union(iv):
        out = []
        for a, b in iv:
            a, b = max(a, start), min(b, end)
            if b <= a:
                continue
            if out and a <= out[-1][1]:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        return out
    busy_u, idle = union(busy), 0.0
    for a, b in union(waiting):
        covered = sum(max(0.0, min(b, y) - max(a, x)) for x, y in busy_u)
        idle += (b - a) - covered
    return idle
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
    stage1_threads: bool = False
    """The Stage 1 worker runs as its default (a pipelined thread pool, one session) instead
    of ``stage1_processes`` prefork processes."""


def stage1_slots(env: dict[str, str], concurrency: int | None) -> int:
    """Tasks a Stage 1 worker runs at once: its task threads when pipelined (the default; see
    zroact_tasks/stage1/tasks.py), else ``-c`` prefork processes."""
    s = Settings(**{k[len("ZROACT_"):].lower(): v for k, v in env.items()
                    if k in ("ZROACT_STAGE1_PIPELINE_DEPTH", "ZROACT_STAGE1_MAX_BATCH")})
    if getattr(s, "stage1_pipeline_depth", 0) < 1:  # (older code: no pipelined worker)
        return s.stage1_max_batch if s.stage1_max_batch > 1 else (concurrency or 1)
    return max(s.stage1_pipeline_depth, s.stage1_max_batch, concurrency or 1)


def handoff_parts(tasks: dict, job_ids: list[str], stride: int = 10, slot_size: int = 3
                  ) -> dict[str, list[float]]:
    """Where a slot's handoff goes: its last Stage 1 end -> the chord body (slot_ready) sent
    (the join, in the Stage 1 worker) -> started on a control process (waiting for one) ->
    the Stage 2 task sent (the body's own work)."""
    parts: dict[str, list[float]] = {"join": [], "wait_control": [], "body": []}
    for job in job_ids:
        ends: dict[int, float] = {}
        for tid, t in tasks.items():
            if tid.startswith(f"{job}:s1:") and t.ended is not None:
                slot = ((int(tid.rsplit(":", 1)[1]) + 1) // stride - 1) // slot_size
                ends[slot] = max(ends.get(slot, 0.0), t.ended)
        for slot, last in ends.items():
            body, judge = tasks.get(f"{job}:slot:{slot}"), tasks.get(f"{job}:s2:{slot}")
            if body is None or judge is None or None in (body.sent, body.started, judge.sent):
                continue
            parts["join"].append(body.sent - last)
            parts["wait_control"].append(body.started - body.sent)
            parts["body"].append(judge.sent - body.started)
    return parts


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
            if role == "stage1" and setup.stage1_threads:
                n = None
            worker = cluster.add_worker(role, concurrency=n, env=extra)
            concurrency[worker.name] = n or 1
            if role == "stage1":  # its pool's real size: pipelined, the task threads
                concurrency[worker.name] = stage1_slots(env, n)
        client = Client(settings=Settings(redis_url=server.url))
        try:
            cluster.wait_ready(client.app)
            client.submit(warmup_video).wait(timeout=120)  # sessions loaded, connections open
            for s in standins:
                s.requests.clear()
            (tmp / "stage1.jsonl").unlink(missing_ok=True)
            groups = [w.proc.pid for w in cluster.workers] + [server.proc.pid]
            names = {w.proc.pid: w.role for w in cluster.workers} | {server.proc.pid: "redis"}
            with EventRecorder(client.app) as recorder:
                time.sleep(0.2)  # the receiver is bound before the first task is sent
                cpu0, own0 = process_cpu_s(groups), os.times()
                start = time.time()
                jobs = [client.submit(video) for _ in range(setup.jobs)]
                reports = [job.wait(timeout=3600) for job in jobs]
                end = time.time()
                cpu1, own1 = process_cpu_s(groups), os.times()
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
    log_path = tmp / "stage1.jsonl"
    gpu_calls = [json.loads(x) for x in log_path.read_text().splitlines() if x.strip()] \
        if log_path.exists() else []
    stage1_tasks = [t for t in tasks.values() if t.name == "zroact.stage1.detect_clips"]
    cpu_roles = cpu_between(cpu0, cpu1, names)
    cpu_workers = sum(cpu_roles.values())
    # The client process: the bench's own threads (event receiver, the VLM stand-ins).
    cpu_bench = (own1.user - own0.user) + (own1.system - own0.system)
    model_cpu = sum(c.get("infer_s", 0.0) for c in gpu_calls)  # the real ONNX model (wall)
    return {
        "makespan_s": end - start,
        "statuses": sorted({r.status for r in reports}),
        "requests": sum(len(s.requests) for s in standins),
        "dispatch_s": dispatch_latencies(list(tasks.values()), concurrency),
        "handoff_s": handoffs(tasks, [j.id for j in jobs], stride=10, slot_size=3),
        "handoff_parts_s": handoff_parts(tasks, [j.id for j in jobs]),
        "stage2_utilisation": sum(util) / max(1, setup.stage2_workers),
        "gpu_busy_s": sum(c["t_end"] - c["t_lock_acquired"] for c in gpu_calls),
        "gpu_calls": len(gpu_calls),
        "gpu_idle_waiting_s": gpu_idle_while_waiting(gpu_calls, stage1_tasks, start, end),
        "gpu_idle_clips_wait_s": gpu_idle_while_clips_wait(gpu_calls, stage1_tasks, start, end),
        "cpu_workers_s": cpu_workers, "cpu_bench_s": cpu_bench, "model_infer_s": model_cpu,
        "cpu_by_role_s": cpu_roles,
        "stage1_log": (tmp / "stage1.jsonl").read_text() if (tmp / "stage1.jsonl").exists() else "",
        "logs": str(tmp / "logs"),
    }
