"""Can the pipeline feed a fast GPU? Stage 1 throughput with an instant detector, 720p video.

    python -m bench.stage1_feed [--frames 1200] [--size 1280x720] [--json OUT]

The instant detector (``testing/instant.py``) returns a fixed output of the model's shape without
running anything, so what a run measures is everything around inference: ingest (video decode,
the 224x224 PNG copies, keyframe JPEGs, frame writes), the Stage 1 worker (message, frames read,
PNG decode, clip tensor, post-processing, recording, Celery's result and chord bookkeeping) and the
control steps between slots. Stage 2 is off (no VLM). One control worker (4 processes, the
default) and one Stage 1 worker, on this machine's cores.

Rows:

* ``end to end``: one job, ingest and Stage 1 running together: clips/s of Stage 1 from its first
  task's start to its last task's end.
* ``stage 1 alone``: the same job ingested first with no Stage 1 worker up
  (``JOB_WINDOW_SLOTS=0``, ``INGEST_LEAD_CHUNKS=1000``: every clip queued), then one Stage 1
  worker drains the queue: what a
  Stage 1 process can prepare and record per second when it never waits for ingest.

each for the pipelined Stage 1 worker (the default) and the prefork one of
``STAGE1_PIPELINE_DEPTH=0`` (``-c 1``, one clip at a time, as before). The reference is the frame
path's decode alone (``bench/frame_path.py`` step a: ``media.video.decode`` in one process, frames
dropped as they come): its frames/s / stride = the clips/s decode alone allows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from zroact_tasks.client import Client
from zroact_tasks.config import Settings
from zroact_tasks.local import EmbeddedRedis, LocalCluster
from zroact_tasks.media.video import decode
from zroact_tasks.testing.onnx_models import make_yowo_model
from zroact_tasks.testing.sample_media import make_video
from zroact_tasks.testing.taskevents import EventRecorder

from .zroact_runs import cpu_between, process_cpu_s

INSTANT = "zroact_tasks.testing.instant:InstantDetector"
STRIDE = 10


def decode_rate(video: Path) -> float:
    """Frames/s of ``media.video.decode`` alone (frame_path step a): the median frame's time."""
    times, it = [], decode(video, 10**9)
    while True:
        t = time.perf_counter()
        item = next(it, None)
        if item is None:
            break
        times.append(time.perf_counter() - t)
    return 1.0 / statistics.median(times)


def run(video: Path, model: Path, tmp: Path, *, mode: str, depth: int, n_clips: int) -> dict:
    env = {"ZROACT_MODEL": str(model), "ZROACT_DETECTOR": INSTANT,
           "ZROACT_DETECTOR_OPTIONS": json.dumps({"size": 224}),
           "ZROACT_STAGE1_PIPELINE_DEPTH": str(depth)}
    if mode == "alone":  # every clip queued, decoding not paced by Stage 1
        env |= {"ZROACT_JOB_WINDOW_SLOTS": "0", "ZROACT_INGEST_LEAD_CHUNKS": "1000"}
    with EmbeddedRedis() as server:
        cluster = LocalCluster(server.url, env=env,
                               log_dir=tmp / f"logs-{mode}-{depth}", supervise=False)
        cluster.add_worker("control")
        stage1 = cluster.add_worker("stage1")
        client = Client(settings=Settings(redis_url=server.url))
        try:
            cluster.wait_ready(client.app)
            client.submit(video).wait(timeout=600)  # warm: model published, connections open
            if mode == "alone":
                cluster.remove_worker(stage1)
            with EventRecorder(client.app) as recorder:
                time.sleep(0.2)
                job = client.submit(video)
                if mode == "alone":
                    deadline = time.monotonic() + 300
                    while time.monotonic() < deadline and sum(
                            1 for t in list(recorder.log.tasks.values())
                            if t.id.startswith(job.id) and t.name == "zroact.stage1.detect_clips"
                            and t.sent) < n_clips:
                        time.sleep(0.05)
                    if time.monotonic() >= deadline:
                        raise RuntimeError("the job was not fully queued for Stage 1")
                    stage1 = cluster.add_worker("stage1")
                    cluster.wait_ready(client.app, workers=[stage1])
                groups = [w.proc.pid for w in cluster.workers] + [server.proc.pid]
                names = {w.proc.pid: w.role for w in cluster.workers} | {server.proc.pid: "redis"}
                cpu0 = process_cpu_s(groups)
                report = job.wait(timeout=900)
                cpu1 = process_cpu_s(groups)
                time.sleep(0.3)
        finally:
            cluster.stop()
            client.close()
    clips = [t for t in recorder.log.tasks.values() if t.id.startswith(job.id)
             and t.name == "zroact.stage1.detect_clips" and t.started and t.ended]
    first, last = min(t.started for t in clips), max(t.ended for t in clips)
    cpu = cpu_between(cpu0, cpu1, names)
    return {"mode": mode, "depth": depth, "status": report.status, "clips": len(clips),
            "stage1_s": last - first, "clips_per_s": len(clips) / (last - first),
            "cpu_ms_per_clip": {k: 1000 * v / len(clips) for k, v in cpu.items()}}


def _size(text: str) -> tuple[int, int]:
    w, h = text.lower().split("x")
    return int(w), int(h)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stage1_feed",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=1200)
    parser.add_argument("--size", type=_size, default=(1280, 720))
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    w, h = args.size
    with tempfile.TemporaryDirectory(prefix="zroact-feed-") as tmp:
        d = Path(tmp)
        video = make_video(d / f"v{w}x{h}.mp4", frames=args.frames, width=w, height=h,
                           side=max(8, min(w, h) // 6))
        model = make_yowo_model(d / "model.onnx")
        fps = decode_rate(video)
        n_clips = args.frames // STRIDE
        rows = [run(video, model, d, mode=mode, depth=depth, n_clips=n_clips)
                for depth in args.depths for mode in ("end to end", "alone")]
    allowed = fps / STRIDE
    print(f"{w}x{h}, {args.frames} frames, {n_clips} clips; {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.2f}; decode alone {fps:.0f} frames/s = {allowed:.1f} clips/s")
    print(f"{'stage1 worker':24} {'run':12} {'clips/s':>8} {'share of decode':>15}  CPU ms/clip by role")
    for r in rows:
        r["share_of_decode"] = r["clips_per_s"] / allowed
        worker = f"pipelined, depth {r['depth']}" if r["depth"] else "prefork -c 1"
        cpu = " ".join(f"{k} {v:.1f}" for k, v in sorted(r["cpu_ms_per_clip"].items()))
        print(f"{worker:24} {r['mode']:12} {r['clips_per_s']:8.1f} {r['share_of_decode']:15.2f}  {cpu}")
    if args.json:
        args.json.write_text(json.dumps({"decode_fps": fps, "allowed_clips_per_s": allowed,
                                         "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
