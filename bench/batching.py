"""Cross-job dynamic batching of Stage 1, on vs off: 8 short jobs submitted at once.

    python -m bench.batching [--jobs 8] [--frames 119] [--fixed-s 0.015] [--per-clip-s 0.001]
                             [--max-batch 16] [--modes prefork off on]

One simulated GPU (a real small ONNX model, then the rest of ``fixed + per_clip x n`` slept under
a file lock). The default costs are a current GPU's (issue 18: the YOWOv3 architecture in PyTorch
on an H200, 15-21 ms a call at batch 1 whatever the backbone, 1.0-3.1 ms a clip at batch 16):
15 ms a call + 1 ms a clip. ``--fixed-s 0.100 --per-clip-s 0.063 --max-batch 8`` is the older
model (the seed's 163 ms a clip). Stage 2 is off so the numbers are Stage 1's own: clips/s over
the whole run, each clip's latency (its task sent -> its result), p50/p95, and the simulated
GPU's busy share (its own log). Modes: ``prefork`` = ``STAGE1_PIPELINE_DEPTH=0 -c 2`` (two
processes, one clip each, as before the pipelined worker), ``off`` = the pipelined worker, one
clip a call, ``on`` = the pipelined worker batching up to ``--max-batch`` clips.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from zroact_tasks.client import Client
from zroact_tasks.config import Settings
from zroact_tasks.local import EmbeddedRedis, LocalCluster
from zroact_tasks.testing.onnx_models import make_yowo_model
from zroact_tasks.testing.sample_media import make_video
from zroact_tasks.testing.simgpu import read_log
from zroact_tasks.testing.taskevents import EventRecorder


def run(mode: str, *, video: Path, model: Path, jobs: int, fixed_s: float, per_clip_s: float,
        max_batch: int, timeout_ms: float, tmp: Path, stage1_workers: int = 1) -> dict:
    calls = tmp / f"{mode}-calls.jsonl"
    options = {"gpu_lock": str(tmp / f"{mode}.lock"), "per_clip_s": per_clip_s,
               "fixed_s": fixed_s, "log_file": str(calls)}
    env = {"ZROACT_MODEL": str(model), "ZROACT_DETECTOR_OPTIONS": json.dumps(options),
           "ZROACT_DETECTOR": "zroact_tasks.testing.simgpu:SimulatedGPUDetector"}
    if mode == "prefork":
        env["ZROACT_STAGE1_PIPELINE_DEPTH"] = "0"
    if mode == "on":
        env |= {"ZROACT_STAGE1_MAX_BATCH": str(max_batch),
                "ZROACT_STAGE1_BATCH_TIMEOUT_MS": str(timeout_ms)}
    with EmbeddedRedis() as server:
        cluster = LocalCluster(server.url, env=env, log_dir=tmp / f"{mode}-logs", supervise=False)
        cluster.add_worker("control")
        for _ in range(1 if mode == "prefork" else stage1_workers):  # all on the one GPU
            cluster.add_worker("stage1", concurrency=2 if mode == "prefork" else None)
        client = Client(settings=Settings(redis_url=server.url))
        try:
            cluster.wait_ready(client.app)
            client.submit(video).wait(timeout=300)  # warm: model loaded, connections open
            calls.unlink(missing_ok=True)
            with EventRecorder(client.app) as recorder:
                time.sleep(0.2)
                start = time.time()
                handles = [client.submit(video) for _ in range(jobs)]
                reports = [h.wait(timeout=900) for h in handles]
                end = time.time()
                time.sleep(0.3)
        finally:
            cluster.stop()
            client.close()
    clips = [t for t in recorder.log.tasks.values()
             if t.name == "zroact.stage1.detect_clips" and t.sent and t.ended]
    latency = np.array([t.ended - t.sent for t in clips])
    entries = read_log(calls)
    sizes = [e["n"] for e in entries]
    busy = sum(e["t_end"] - e["t_lock_acquired"] for e in entries)
    return {
        "mode": mode if mode == "prefork" or stage1_workers == 1 else f"{mode} x{stage1_workers}",
        "jobs": jobs, "clips": len(clips), "makespan_s": end - start,
        "clips_per_s": len(clips) / (end - start),
        "latency_p50_s": float(np.percentile(latency, 50)),
        "latency_p95_s": float(np.percentile(latency, 95)),
        "calls": len(sizes), "mean_batch": float(np.mean(sizes)) if sizes else 0.0,
        "gpu_busy_share": busy / (end - start),
        "statuses": sorted({r.status for r in reports}),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--frames", type=int, default=119, help="frames per job's video (stride 10)")
    parser.add_argument("--fixed-s", type=float, default=0.015)
    parser.add_argument("--per-clip-s", type=float, default=0.001)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--modes", nargs="+", default=["prefork", "off", "on"],
                        choices=["prefork", "off", "on"])
    parser.add_argument("--timeout-ms", type=float, default=10.0)
    parser.add_argument("--stage1-workers", type=int, default=1,
                        help="pipelined Stage 1 workers sharing the GPU (off/on modes)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="zroact-batching-") as tmp:
        d = Path(tmp)
        video = make_video(d / "short.mp4", frames=args.frames)
        model = make_yowo_model(d / "model.onnx")
        rows = [run(mode, video=video, model=model, jobs=args.jobs, fixed_s=args.fixed_s,
                    per_clip_s=args.per_clip_s, max_batch=args.max_batch,
                    timeout_ms=args.timeout_ms, tmp=d, stage1_workers=args.stage1_workers)
                for mode in args.modes]
    print(f"{args.jobs} jobs x {args.frames // 10} clips; simulated call = {args.fixed_s:.3f} s + "
          f"{args.per_clip_s:.3f} s x clips; batching: max {args.max_batch}, timeout {args.timeout_ms:g} ms")
    print(f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'batching':9} {'clips/s':>8} {'makespan_s':>10} {'p50 clip s':>10} {'p95 clip s':>10} "
          f"{'calls':>6} {'mean batch':>10} {'GPU busy':>8}")
    for r in rows:
        print(f"{r['mode']:9} {r['clips_per_s']:8.2f} {r['makespan_s']:10.2f} {r['latency_p50_s']:10.3f} "
              f"{r['latency_p95_s']:10.3f} {r['calls']:6d} {r['mean_batch']:10.2f} "
              f"{r['gpu_busy_share']:8.0%}")
    by = {r["mode"].split(" ")[0]: r for r in rows}
    if "off" in by and "on" in by:
        off, on = by["off"], by["on"]
        print(f"throughput x{on['clips_per_s'] / off['clips_per_s']:.2f}, "
              f"p95 latency x{on['latency_p95_s'] / off['latency_p95_s']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
