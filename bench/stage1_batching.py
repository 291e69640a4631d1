"""Stage 1 batching on the CPU with a real-compute ONNX model: clips/s at batch 1, 2, 3, 4, 8.

    python -m bench.stage1_batching [--batches 1 2 3 4 8] [--repeat 7] [--threads 2] [--json OUT]

Model: :func:`zroact_tasks.testing.conv_model.make_conv_yowo_model` (random-weight 3D convs,
~2 GFLOP a clip, dynamic batch) on :class:`~zroact_tasks.stage1.detector.OnnxDetector`. Two
measurements per batch size B:

* ``infer``  -- ``detector.infer`` on a ready ``[B, 3, 16, 224, 224]`` tensor;
* ``stage1`` -- the whole Stage 1 task body, ``detect_keyframes``: one HMGET from a real
  (embedded) Redis frame store, PNG decode once per unique frame (the Stage 1 copies, stored at
  the model's input size), clip tensors, one inference call, postprocess. The store is filled by :func:`zroact_tasks.control.ingest.ingest_whole` itself
  from a generated video, so the frames are exactly what a job stores.

Each number is the median of ``--repeat`` timed calls after a warm-up call per batch size
(``min/clip``: the fastest call); the repeats are interleaved across batch sizes, so a change in
the machine's load during the run does not favour one batch size.
``OnnxDetector`` builds its session with onnxruntime's defaults (intra-op threads = all cores)
and has no thread setting, so the bench swaps in a session built from the same file with
``intra_op_num_threads = --threads`` (0 = onnxruntime's default) and reports it; ``--no-spin``
also turns off the intra-op threads' busy-wait between ops.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from zroact_tasks.config import Settings
from zroact_tasks.control.ingest import ingest_whole as ingest
from zroact_tasks.control.tasks import slot_params
from zroact_tasks.local import EmbeddedRedis
from zroact_tasks.media.store import FrameStore
from zroact_tasks.models import JobSpec
from zroact_tasks.stage1.detect import detect_keyframes
from zroact_tasks.stage1.detector import OnnxDetector
from zroact_tasks.testing.conv_model import make_conv_yowo_model
from zroact_tasks.testing.sample_media import make_video

WITHIN = 0.05
"""A batch size is "as good as the best" when its clips/s is within this fraction of the best."""


def make_detector(model: Path, threads: int, spin: bool = True) -> OnnxDetector:
    """``OnnxDetector(model)`` (its layout checks included), on a session with ``threads`` threads.

    ``spin=False`` stops idle intra-op threads from busy-waiting for the next op (onnxruntime
    spins by default, which takes a core from the pre/post-processing between calls).
    """
    import onnxruntime as ort

    det = OnnxDetector(model)
    if threads > 0 or not spin:
        options = ort.SessionOptions()
        options.intra_op_num_threads = max(threads, 0)
        options.inter_op_num_threads = 1  # sequential execution: one op at a time
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        det._session = ort.InferenceSession(str(model), sess_options=options,
                                             providers=det.providers)
    return det


def _timed_ms(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000.0


def job_spec(job_id: str, video: Path, settings: Settings) -> JobSpec:
    """A job on ``video`` with every per-job parameter at the settings' defaults."""
    return JobSpec(job_id=job_id, video=str(video), prompt="", keyframe_stride=settings.keyframe_stride,
                   sampling_rate=settings.sampling_rate, clip_length=settings.clip_length,
                   slot_size=settings.slot_size, score_threshold=settings.score_threshold,
                   nms_iou=settings.nms_iou, max_detections=settings.max_detections,
                   submitted_at=time.time())


def fill_store(store: FrameStore, video: Path, job_id: str, settings: Settings | None = None,
               input_size: tuple[int, int] = (224, 224)) -> tuple[list[int], dict]:
    """Store ``video``'s frames the way a job does (ingest itself); its keyframes and the
    Stage 1 params its tasks get."""
    settings = settings or Settings()
    spec = job_spec(job_id, video, settings)
    result = ingest(spec, settings, store, lambda slot, kfs: None, input_size)
    return result.keyframes, slot_params(spec, [result.video.width, result.video.height])


def measure(detector: OnnxDetector, store: FrameStore, job_id: str, keyframes: list[int],
            params: dict, batches: Sequence[int], repeat: int) -> list[dict]:
    """Median (and min) ms per call of ``infer`` and ``detect_keyframes`` at each batch size.

    The repeats are interleaved (round r times every batch size once) so that a change in the
    machine's load during the run hits every batch size alike instead of biasing the comparison.
    """
    rng = np.random.default_rng(0)
    shape = (3, detector.clip_length, detector.input_height, detector.input_width)
    calls: dict[int, dict[str, Callable[[], object]]] = {}
    sizes: dict[int, int] = {}
    for b in batches:
        clips = rng.standard_normal((b, *shape), dtype=np.float32)
        # Consecutive keyframes, as a slot's Stage 1 task gets them; cycle through the video.
        groups = [keyframes[i : i + b] for i in range(0, len(keyframes) - b + 1, b)] or [keyframes[:b]]
        cycle = itertools.cycle(groups)
        calls[b] = {
            "infer": lambda clips=clips: detector.infer(clips),
            "stage1": lambda cycle=cycle: detect_keyframes(detector, store, job_id, next(cycle), params),
        }
        sizes[b] = len(groups[0])
        for fn in calls[b].values():
            fn()  # warm-up: first-call allocations, arena growth for this shape
    times: dict[int, dict[str, list[float]]] = {b: {"infer": [], "stage1": []} for b in batches}
    for _ in range(repeat):
        for b in batches:
            for kind, fn in calls[b].items():
                times[b][kind].append(_timed_ms(fn))
    rows = []
    for b in batches:
        n, row = sizes[b], {"batch": sizes[b]}
        for kind in ("infer", "stage1"):
            ms = statistics.median(times[b][kind])
            row.update({f"{kind}_ms_per_call": ms, f"{kind}_ms_per_clip": ms / n,
                        f"{kind}_clips_per_s": 1000.0 * n / ms,
                        f"{kind}_min_ms_per_call": min(times[b][kind]),
                        f"{kind}_min_ms_per_clip": min(times[b][kind]) / n,
                        f"{kind}_ms_all": times[b][kind]})
        row["overhead_ms_per_clip"] = row["stage1_ms_per_clip"] - row["infer_ms_per_clip"]
        rows.append(row)
    slot_size = Settings().slot_size
    for row in rows:
        for k in ("infer", "stage1"):
            row[f"{k}_speedup"] = row[f"{k}_clips_per_s"] / rows[0][f"{k}_clips_per_s"]
        row["stage1_ms_per_slot"] = slot_ms(rows, row["batch"], slot_size)
        row["stage1_min_ms_per_slot"] = slot_ms(rows, row["batch"], slot_size, "stage1_min_ms_per_call")
    return rows


def slot_ms(rows: list[dict], batch: int, slot_size: int, key: str = "stage1_ms_per_call") -> float | None:
    """Stage 1 time of one slot run as ``stage1_batch = batch`` tasks do it (one after another)."""
    per_call = {r["batch"]: r[key] for r in rows}
    sizes = [min(batch, slot_size - i) for i in range(0, slot_size, batch)]
    return sum(per_call[n] for n in sizes) if all(n in per_call for n in sizes) else None


def recommend(rows: list[dict], slot_size: int, stat: str = "median") -> tuple[int, str]:
    """Smallest usable batch whose Stage 1 time per slot is within WITHIN of the best, and why.

    ``stat`` = "median" (the table's numbers) or "min" (the fastest call: the cost without
    interference from other work on the machine). Tasks are cut inside a slot
    (pipeline.send_slot): with batch 2 a slot of 3 runs as 2 + 1, and a batch above ``slot_size``
    never fills. Those rows show what batching across slots or jobs would gain, not a usable
    setting. Rows whose slot time is unknown (a needed size was not measured) fall back to their
    own clips/s.
    """
    slot_key, clip_key = (("stage1_ms_per_slot", "stage1_ms_per_clip") if stat == "median"
                          else ("stage1_min_ms_per_slot", "stage1_min_ms_per_clip"))

    def rate(r: dict) -> float:  # clips/s as a slot sees it
        ms = r.get(slot_key)
        return 1000.0 * slot_size / ms if ms else 1000.0 / r[clip_key]

    def own(r: dict) -> float:  # clips/s of the call itself
        return 1000.0 / r[clip_key]

    usable = [r for r in rows if r["batch"] <= slot_size] or rows
    best = max(usable, key=rate)
    pick = min((r for r in usable if rate(r) >= (1 - WITHIN) * rate(best)), key=lambda r: r["batch"])
    b = pick["batch"]
    shown = [best] + [r for r in (pick, rows[0]) if r is not best]
    shown = [r for i, r in enumerate(shown) if all(r is not q for q in shown[:i])]
    rates = "; ".join(f"batch {r['batch']}: {rate(r):.2f} clips/s" + (" (best)" if r is best else "")
                      for r in shown)
    reason = (f"by {stat} times, batch {b} is the smallest within {WITHIN:.0%} of the best Stage 1 "
              f"rate per slot ({rates}). A bigger batch than needed only adds latency: every "
              "keyframe of a task waits for the whole call.")
    overall = max(rows, key=own)
    if overall["batch"] > slot_size and own(overall) > (1 + WITHIN) * rate(best):
        gain = own(overall) / rate(best) - 1
        reason += (f" Batch {overall['batch']} would be {gain:+.0%} on top, but tasks are cut inside "
                   f"a slot of {slot_size} clips: only cross-task batching (ZROACT_STAGE1_MAX_BATCH, "
                   f"stage1/batcher.py) can fill it.")
    else:
        reason += (f" Batches above the slot size ({slot_size}) never fill and gain less than "
                   f"{WITHIN:.0%} anyway.")
    return b, reason


def format_table(rows: list[dict]) -> str:
    head = (f"{'batch':>5} | {'infer ms/call':>13} {'ms/clip':>8} {'clips/s':>8} {'speedup':>7} "
            f"{'min/clip':>8} | {'stage1 ms/call':>14} {'ms/clip':>8} {'clips/s':>8} {'speedup':>7} "
            f"{'min/clip':>8} | {'overhead ms/clip':>16} | {'ms/slot':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['batch']:>5} | {r['infer_ms_per_call']:>13.1f} {r['infer_ms_per_clip']:>8.1f} "
            f"{r['infer_clips_per_s']:>8.2f} {r['infer_speedup']:>6.2f}x "
            f"{r['infer_min_ms_per_clip']:>8.1f} | "
            f"{r['stage1_ms_per_call']:>14.1f} {r['stage1_ms_per_clip']:>8.1f} "
            f"{r['stage1_clips_per_s']:>8.2f} {r['stage1_speedup']:>6.2f}x "
            f"{r['stage1_min_ms_per_clip']:>8.1f} | "
            f"{r['overhead_ms_per_clip']:>16.1f} | "
            + (f"{r['stage1_ms_per_slot']:>7.0f}" if r["stage1_ms_per_slot"] is not None else f"{'-':>7}"))
    return "\n".join(lines)


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.stage1_batching", description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    parser.add_argument("--repeat", type=int, default=7, help="timed calls per measurement (median)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="onnxruntime intra_op_num_threads (0 = onnxruntime's default)")
    parser.add_argument("--no-spin", dest="spin", action="store_false",
                        help="session.intra_op.allow_spinning=0 (onnxruntime spins by default)")
    parser.add_argument("--frames", type=int, default=419, help="frames of the generated video")
    parser.add_argument("--video-size", type=_size, default=(320, 240), metavar="WxH")
    parser.add_argument("--width", type=int, default=16, help="conv model width (channels of the stem)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="zroact-s1bench-") as tmp, EmbeddedRedis() as server:
        import redis

        model = make_conv_yowo_model(Path(tmp) / "conv.onnx", width=args.width)
        vw, vh = args.video_size
        video = make_video(Path(tmp) / "video.mp4", frames=args.frames, width=vw, height=vh,
                           side=max(8, min(vw, vh) // 6))
        detector = make_detector(model, args.threads, args.spin)
        client = redis.Redis.from_url(server.url)
        store = FrameStore(client, ttl_s=3600)
        settings = Settings()
        keyframes, params = fill_store(store, video, "bench", settings,
                                       (detector.input_width, detector.input_height))
        rows = measure(detector, store, "bench", keyframes, params, args.batches, args.repeat)
        client.close()
    load_after = os.getloadavg()
    slot_size = Settings().slot_size
    batch, reason = recommend(rows, slot_size)
    batch_min, reason_min = recommend(rows, slot_size, "min")
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": load_after},
        "model": {"kind": "conv_yowo", "width": args.width, "input": [detector.clip_length,
                  detector.input_height, detector.input_width], "providers": detector.providers},
        "intra_op_num_threads": args.threads or "onnxruntime default (all cores)",
        "allow_spinning": args.spin,
        "video": {"frames": args.frames, "size": f"{vw}x{vh}", "keyframes": len(keyframes),
                  "stage1_frame_size": [detector.input_width, detector.input_height]},
        "repeat": args.repeat,
        "rows": rows,
        "recommended_batch": batch,
        "reason": reason,
        "recommended_batch_by_min": batch_min,
        "reason_by_min": reason_min,
    }
    print(f"Stage 1 batching: conv_yowo width {args.width} on {detector.providers[0]}, "
          f"intra_op_num_threads={result['intra_op_num_threads']}, spinning {'on' if args.spin else 'off'}, "
          f"{os.cpu_count()} CPUs, "
          f"video {vw}x{vh} ({len(keyframes)} keyframes, Stage 1 frames stored at "
          f"{detector.input_width}x{detector.input_height}), median of {args.repeat} interleaved calls")
    print(f"load average before {load_before[0]:.2f} / after {load_after[0]:.2f}")
    print(format_table(rows))
    print(f"recommended stage1_batch = {batch}: {reason}")
    if batch_min != batch:
        print(f"but by the fastest calls it would be {batch_min} ({reason_min}): the machine's load "
              f"decides between them; rerun on a quiet machine or with more --repeat")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
