"""Fairness: a short job's latency alone, and right behind a long one, window on and off.

    python -m bench.fairness [--scale 0.1] [--long-frames 18000] [--short-frames 300]

A 10-minute video (18,000 frames at 30 fps: 1,800 clips) is submitted first, a 10-second one
(300 frames: 30 clips) as soon as the long one is ingested, on one simulated GPU (163 ms a clip x scale) and one Stage 2
worker (3 in flight on one stand-in, 2.07 s x scale a request). Without a window the long job's
clips fill the Stage 1 queue first; with ``JOB_WINDOW_SLOTS`` each job has only that many slots
queued, so the short job's clips interleave with the long one's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from zroact_tasks.client import Client
from zroact_tasks.config import Settings
from zroact_tasks.local import EmbeddedRedis, LocalCluster
from zroact_tasks.testing.onnx_models import make_yowo_model
from zroact_tasks.testing.sample_media import make_video
from zroact_tasks.testing.vllm_standin import VLLMStandIn

from .zroact_runs import SEED_STAGE1_S, SEED_VLM_S, VLM_GROWTH


def scenario(window: int, *, long_video: Path | None, short: Path, model: Path, scale: float,
             tmp: Path) -> dict:
    options = {"gpu_lock": str(tmp / f"w{window}-{bool(long_video)}.lock"),
               "per_clip_s": SEED_STAGE1_S * scale}
    with VLLMStandIn(latency_s=SEED_VLM_S * scale, latency_growth=VLM_GROWTH) as vlm, \
            EmbeddedRedis() as server:
        env = {"ZROACT_MODEL": str(model), "ZROACT_VLM_URL": vlm.url,
               "ZROACT_DETECTOR": "zroact_tasks.testing.simgpu:SimulatedGPUDetector",
               "ZROACT_DETECTOR_OPTIONS": json.dumps(options),
               "ZROACT_JOB_WINDOW_SLOTS": str(window)}
        cluster = LocalCluster(server.url, env=env, log_dir=tmp / "logs", supervise=False)
        for role, n in (("control", 4), ("stage1", 2), ("stage2", 3)):
            cluster.add_worker(role, concurrency=n)
        client = Client(settings=Settings(redis_url=server.url))
        try:
            cluster.wait_ready(client.app)
            first = client.submit(long_video) if long_video else None
            if first is not None:  # the long job is under way: its window is in the queues
                while first.status().stage1_done < 10:
                    time.sleep(0.05)
            start = time.time()
            report = client.submit(short).wait(timeout=3600)
            short_latency = time.time() - start
            long_total = None
            if first is not None:
                long_total = first.wait(timeout=7200).timings["total"]
        finally:
            cluster.stop()
            client.close()
    return {"window": window, "behind_long": long_video is not None,
            "short_latency_s": short_latency, "short_status": report.status,
            "long_total_s": long_total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=0.1)
    parser.add_argument("--long-frames", type=int, default=18_000)
    parser.add_argument("--short-frames", type=int, default=300)
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="zroact-fairness-") as tmp:
        d = Path(tmp)
        long_video = make_video(d / "long.mp4", frames=args.long_frames, width=160, height=120, side=20)
        short = make_video(d / "short.mp4", frames=args.short_frames)
        model = make_yowo_model(d / "model.onnx")
        rows = [scenario(args.window, long_video=None, short=short, model=model, scale=args.scale, tmp=d),
                scenario(0, long_video=long_video, short=short, model=model, scale=args.scale, tmp=d),
                scenario(args.window, long_video=long_video, short=short, model=model,
                         scale=args.scale, tmp=d)]
    print(f"short job ({args.short_frames} frames) latency; long job {args.long_frames} frames "
          f"submitted first; scale {args.scale}")
    print(f"{'case':34} {'short latency s':>15} {'long total s':>12}")
    names = ["alone", "behind long, no window (0)", f"behind long, window {args.window} slots"]
    for name, r in zip(names, rows):
        long_total = f"{r['long_total_s']:.1f}" if r["long_total_s"] else "-"
        print(f"{name:34} {r['short_latency_s']:15.2f} {long_total:>12}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
