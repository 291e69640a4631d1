"""Long footage: peak frame bytes against video length, and ingest throughput per control worker.

    python -m bench.long_video [--minutes 1 5 20] [--ingest-minutes 2] [--json out.json]

Part 1 runs one job per length (10 fps, 96x72, Stage 1 frames stored at that size) on a fresh
cluster (one control, one Stage 1 worker with the instant detector, the stand-in VLM answering at
once) and samples, every 20 ms, the bytes the job's frame hash really holds (summed by Redis).
It also sums ``MEMORY USAGE`` of every key left once the report is saved, per keyframe: what a
job keeps besides its report until the result TTL.

Part 2 ingests one 640x360 H.264 video (libx264 with B-frames, or mp4v without ffmpeg) with one
and with two control workers (one process each) and the instant detector, so decoding is the
ceiling: frames per second from submission to report.

Part 3 times single ingest steps of a 1080p H.264 video (libx264 ``-bf 3``, needs ffmpeg) in
this process: the first chunk, one in the middle and the last, so a step's cost is seen not to
grow with its position (a seek decodes from the GOP's keyframe, not from the start).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis

from zroact_tasks.client import Client
from zroact_tasks.config import Settings
from zroact_tasks.local import EmbeddedRedis, LocalCluster
from zroact_tasks.media.store import frames_key
from zroact_tasks.testing.onnx_models import make_yowo_model
from zroact_tasks.testing.sample_media import make_video
from zroact_tasks.testing.vllm_standin import VLLMStandIn

INSTANT = "zroact_tasks.testing.instant:InstantDetector"

_HELD = """
local total = 0
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  total = total + redis.call('HSTRLEN', KEYS[1], field)
end
return total
"""


def _kept_bytes(r: redis.Redis, job_id: str) -> int:
    """Bytes of every key of the job left after its report (records, task results)."""
    total = 0
    for key in r.scan_iter(f"*{job_id}*", count=1000):
        total += r.memory_usage(key) or 0
    return total


def run_job(video: Path, model: Path, tmp: Path, *, controls: int = 1,
            env: dict | None = None, watch_peak: bool = True) -> dict:
    with VLLMStandIn() as vlm, EmbeddedRedis() as server:
        base = {"ZROACT_MODEL": str(model), "ZROACT_VLM_URL": vlm.url, "ZROACT_DETECTOR": INSTANT,
                **(env or {})}
        cluster = LocalCluster(server.url, env=base, log_dir=tmp / "logs", supervise=False)
        for role, n in [("control", 1)] * controls + [("stage1", 1), ("stage2", 3)]:
            cluster.add_worker(role, concurrency=n)
        client = Client(settings=Settings(redis_url=server.url))
        r = redis.Redis.from_url(server.url)
        held, peak, stop = r.register_script(_HELD), [0], threading.Event()
        try:
            cluster.wait_ready(client.app)
            start = time.time()
            job = client.submit(video)

            def watch() -> None:
                while not stop.wait(0.02):
                    peak[0] = max(peak[0], int(held(keys=[frames_key(job.id)])))

            # The peak watcher's Lua sum blocks Redis every 20 ms: only where the peak is measured.
            watcher = threading.Thread(target=watch, daemon=True)
            if watch_peak:
                watcher.start()
            report = job.wait(timeout=3 * 3600)
            seconds = time.time() - start
            stop.set()
            if watch_peak:
                watcher.join(5)
            meta = client.jobs.meta(job.id)
            return {"status": report.status, "frames": report.video.frames,
                    "keyframes": len(report.keyframes), "seconds": seconds,
                    "peak_frame_bytes": peak[0] if watch_peak else None, "ingest_s": float(meta.get("ingest_s", 0)),
                    "chunks": int(meta.get("chunk_next", 1)),
                    "kept_bytes_per_keyframe": _kept_bytes(r, job.id) / max(1, len(report.keyframes))}
        finally:
            stop.set()
            cluster.stop()
            client.close()


def h264(path: Path, minutes: float) -> Path:
    if shutil.which("ffmpeg") is None:
        return make_video(path.with_suffix(".mp4"), frames=int(minutes * 60 * 30), fps=30,
                          width=640, height=360, side=48)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc=size=640x360:rate=30", "-t", str(minutes * 60), "-c:v", "libx264",
                    "-bf", "3", "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def time_steps(minutes: float) -> list[dict]:
    """Seconds of ingest steps at the start, middle and end of a 1080p H.264 video."""
    from zroact_tasks.control.ingest import ingest_chunk, plan  # noqa: PLC0415
    from zroact_tasks.media.store import FrameStore  # noqa: PLC0415
    from zroact_tasks.models import JobSpec  # noqa: PLC0415

    rows = []
    with tempfile.TemporaryDirectory() as name, EmbeddedRedis() as server:
        path = Path(name) / "1080p.mp4"
        subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i",
                        "testsrc=size=1920x1080:rate=30", "-t", str(minutes * 60), "-c:v",
                        "libx264", "-preset", "ultrafast", "-bf", "3", "-pix_fmt", "yuv420p",
                        str(path)], check=True)
        settings = Settings(redis_url=server.url)
        spec = JobSpec(job_id="steps", video=str(path), prompt="p", keyframe_stride=10,
                       sampling_rate=1, clip_length=16, slot_size=3, score_threshold=0.3,
                       nms_iou=0.5, max_detections=300, submitted_at=time.time())
        store = FrameStore(redis.Redis.from_url(server.url), ttl_s=3600)
        job_plan = plan(spec, settings, (224, 224))
        per_chunk = job_plan.chunk_slots * spec.slot_size * spec.keyframe_stride
        last = job_plan.declared_frames // per_chunk - 1
        for where, chunk in (("start", 0), ("middle", last // 2), ("end", last)):
            step = spec.model_copy(update={"job_id": f"steps-{chunk}"})
            result = ingest_chunk(step, job_plan, chunk, settings, store, lambda j, k: None)
            store.delete(step.job_id)
            first, end = (chunk * per_chunk - 15, (chunk + 1) * per_chunk - 1)
            rows.append({"where": where, "chunk": chunk, "frames": end - max(0, first) + 1,
                         "seconds": result.seconds})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="*", default=[1, 5, 20],
                        help="lengths part 1 runs (none: skip it)")
    parser.add_argument("--ingest-minutes", type=float, default=2.0)
    parser.add_argument("--step-minutes", type=float, default=5.0,
                        help="length of the 1080p video whose steps part 3 times (0: skip)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    out: dict = {"lengths": [], "ingest": []}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model = make_yowo_model(tmp / "model.onnx", num_classes=3, size=224, batch=None)
        small = {"ZROACT_DETECTOR_OPTIONS": '{"size": [96, 72]}'}  # frames stored at 96x72
        for minutes in args.minutes:
            video = make_video(tmp / f"{minutes:g}min.mp4", frames=int(minutes * 600), fps=10,
                               width=96, height=72, side=16)
            row = {"minutes": minutes, **run_job(video, model, tmp, env=small)}
            out["lengths"].append(row)
            print(json.dumps(row), flush=True)
        video = h264(tmp / "ingest.mp4", args.ingest_minutes)
        for controls in (1, 2):
            row = {"control_workers": controls,
                   **run_job(video, model, tmp, controls=controls, watch_peak=False)}
            row["frames_per_s"] = row["frames"] / row["seconds"]
            out["ingest"].append(row)
            print(json.dumps(row), flush=True)
    if out["lengths"]:
        print("\n| video (10 fps, 96x72) | keyframes | peak frame bytes | × 1-min peak | kept B/keyframe |")
        print("|---|---|---|---|---|")
        first = out["lengths"][0]["peak_frame_bytes"] or 1
        for row in out["lengths"]:
            print(f"| {row['minutes']:g} min | {row['keyframes']} | {row['peak_frame_bytes']:,} | "
                  f"{row['peak_frame_bytes'] / first:.2f} | {row['kept_bytes_per_keyframe']:.0f} |")
    print("\n| control workers | frames | seconds | frames/s | × one worker |")
    print("|---|---|---|---|---|")
    one = out["ingest"][0]["frames_per_s"]
    for row in out["ingest"]:
        print(f"| {row['control_workers']} | {row['frames']} | {row['seconds']:.1f} | "
              f"{row['frames_per_s']:.0f} | {row['frames_per_s'] / one:.2f} |")
    if args.step_minutes and shutil.which("ffmpeg"):
        out["steps"] = time_steps(args.step_minutes)
        print("\n| 1080p H.264 step | chunk | frames decoded | seconds |")
        print("|---|---|---|---|")
        for row in out["steps"]:
            print(f"| {row['where']} | {row['chunk']} | {row['frames']} | {row['seconds']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
