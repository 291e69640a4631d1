"""The frame path, step by step, in frames/s: decode -> store -> clip tensor -> JPEG for Stage 2.

    python -m bench.frame_path [--frames 419] [--size 320x240 1280x720 1920x1080] [--json OUT]

For each frame size a video is generated (OpenCV ``mp4v``) and every step is timed with the
package's own functions against a real (embedded) Redis, single process, OpenCV's default threads.
The package's path (a model of input 224x224): ingest stores a 224x224 copy of every
frame a clip uses (Stage 1 reads only these) and a full-size JPEG of every keyframe (Stage 2):

  a  video decode          ``media.video.decode``                               every video frame
  b  Stage 1 copy          ``ingest.stage1_frame``: Pillow bicubic resize + raw zstd (lossless) every stored frame
  b' keyframe JPEG         ``encode_jpeg`` q95 of the full frame                  every keyframe
  c  store writes          ``FrameStore.put_many`` as ``ingest`` itself issues them (both kinds)
  i  ingest end to end     ``control.ingest.ingest_whole`` (a + b + b' + c, and the bookkeeping),
                           b and b' on ``INGEST_ENCODE_THREADS`` (2) threads beside the decoder
  i1 ingest, 1 thread      the same with ``INGEST_ENCODE_THREADS=1`` (b, b' on the decoding thread)
  d  store read            ``FrameStore.get_many`` of one clip's 16 Stage 1 frames (one HMGET)
  e  frame decode          ``decode_image`` of a stored Stage 1 frame (raw zstd)
  f  clip tensor           ``preprocess_clip`` (frames/s = 16 x clips/s)
  g  Stage 2 JPEGs         ``stage2.vlm.image_part`` (base64) of a slot's 3 stored keyframes

"need" is the rate each step must sustain for Stage 1 to keep a GPU busy at the seed's measured
0.163 s a clip (41 clips in 6.7 s = 6.1 clips/s): a-c and i see each video frame once (stride 10
-> 61 frames/s), b' and g one frame per clip (6.1 frames/s), d-f 16 frames per clip (98
frames/s, before the dedupe of overlapping clips inside one task). a-c run in the ingest process
and d-f in the Stage 1 process, so "d+e+f" is their combined rate (harmonic sum).

"full size" rows repeat the path for a model whose input is the video's own size (Stage 1 copies
stored lossless at the original size; Stage 1 then resizes for itself, as it would without the
224 copies), and "reduced" an alternative needing no second copy: decoding the full-size frame at
1/k scale (for a raw frame a full decode, then an area resize; k = the largest of 1, 2, 4, 8 keeping
both sides >= 224) before the clip tensor.

Each rate is frames/s from the median call's wall time (robust to a stall of a busy machine) and,
in "cpu", frames per CPU-second of this process over the same calls (OpenCV's threads included,
redis-server's work not).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import redis

from zroact_tasks.config import Settings
from zroact_tasks.control.ingest import ingest_whole as ingest, stage1_frame
from zroact_tasks.local import EmbeddedRedis
from zroact_tasks.media import clips as clipmath
from zroact_tasks.media.store import FrameStore
from zroact_tasks.media.video import decode, decode_image, encode_jpeg, encode_lossless
from zroact_tasks.stage1.yowo import model_frame, preprocess_clip
from zroact_tasks.stage2.vlm import image_part
from zroact_tasks.testing.sample_media import make_video

from .stage1_batching import job_spec
from .zroact_runs import SEED_STAGE1_S

MODEL_SIZE = 224
"""Input side of the Stage 1 model (YOWOv3 224x224)."""

REDUCTIONS = (1, 2, 4, 8)

# (key, label, what "need" counts); None = not a rate
STEPS = [
    ("decode", "a video decode", "video"),
    ("s1_encode", "b Stage 1 copy: resize+encode", "video"),
    ("kf_encode", "b' keyframe JPEG encode q95", "keyframe"),
    ("write", "c store writes (as ingest)", "video"),
    ("ingest", "i ingest end to end", "video"),
    ("ingest_1t", "i with 1 encode thread", "video"),
    ("read", "d store read (16/HMGET)", "clip"),
    ("jpeg_decode", "e frame decode (lossless)", "clip"),
    ("preprocess", "f clip tensor", "clip"),
    ("stage2_b64", "g Stage 2 base64 (3/slot)", "keyframe"),
]
SINGLE = [s for s in STEPS if not s[0].startswith("ingest")]
"""The steps "slowest" chooses from (i is a + b + b' + c)."""
COMBINED = [("stage1_cpu", "d+e+f (Stage 1 process)", "clip")]
FULL_STEPS = [
    ("full_encode", "full size: encode q95", "video"),
    ("full_write", "full size: store writes", "video"),
    ("full_ingest", "full size: ingest end to end", "video"),
    ("full_read", "full size: store read", "clip"),
    ("full_jpeg_decode", "full size: frame decode", "clip"),
    ("full_preprocess", "full size: clip tensor", "clip"),
    ("full_stage1_cpu", "full size: d+e+f", "clip"),
    ("reduced_decode", "reduced: decode, then 1/k", "clip"),
    ("reduced_preprocess", "reduced: clip tensor from 1/k", "clip"),
    ("reduced_stage1_cpu", "reduced: d+e+f", "clip"),
]
SIZES = [
    ("s1_bytes", "bytes per Stage 1 frame"),
    ("kf_bytes", "bytes per keyframe JPEG"),
    ("bytes_per_video_frame", "stored bytes per video frame"),
    ("full_bytes_per_video_frame", "full size: stored bytes/frame"),
    ("reduction", "reduced: k"),
]


def needed_rates(clips_per_s: float, stride: int, clip_length: int) -> dict[str, float]:
    """Frames/s each kind of step must sustain for ``clips_per_s`` Stage 1 clips a second."""
    return {"video": clips_per_s * stride, "clip": clips_per_s * clip_length,
            "keyframe": clips_per_s}  # one keyframe per clip; a slot of 3 clips sends 3 frames


def reduction(width: int, height: int, side: int = MODEL_SIZE) -> int:
    """The largest decode reduction k (1, 2, 4, 8) keeping both sides >= ``side``."""
    return max(k for k in REDUCTIONS if k == 1 or (width // k >= side and height // k >= side))


class Timer:
    """Per-call wall times and frames (median of frames/s over calls) and the process's CPU time."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, int]] = []
        self.cpu = 0.0

    def time(self, fn: Callable[[], object], frames: int = 1) -> object:
        c, t = time.process_time(), time.perf_counter()
        value = fn()
        self.add(time.perf_counter() - t, time.process_time() - c, frames)
        return value

    def add(self, wall: float, cpu: float, frames: int) -> None:
        self.calls.append((wall, frames))
        self.cpu += cpu

    def rates(self) -> tuple[float, float]:
        """(median over calls of frames/s, frames per CPU-second)."""
        frames = sum(f for _, f in self.calls)
        return (statistics.median(f / max(w, 1e-9) for w, f in self.calls if f),
                frames / max(self.cpu, 1e-9))


def _throughput(fn: Callable[[object], object], items: Sequence[object], frames_per_call: int = 1,
                *, min_calls: int = 20, min_s: float = 0.3, max_s: float = 10.0) -> tuple[float, float]:
    """Timer rates of ``fn`` over ``items`` (cycled): at least one pass, ``min_calls`` calls and
    ``min_s`` seconds (so the median outlasts a stall of the machine), at most ``max_s``."""
    fn(items[0])  # warm-up
    timer, started, n = Timer(), time.perf_counter(), 0
    while True:
        item = items[n % len(items)]
        timer.time(lambda item=item: fn(item), frames_per_call)
        n += 1
        elapsed = time.perf_counter() - started
        if (n >= max(len(items), min_calls) and elapsed >= min_s) or elapsed >= max_s:
            return timer.rates()


def _harmonic(*rates: float) -> float:
    """Rate of steps done one after another on the same frames."""
    return 1.0 / sum(1.0 / r for r in rates)


class TimingStore(FrameStore):
    """A FrameStore timing the writes ingest makes, one record per buffer flush.

    ``ingest``'s buffer flushes its Stage 1 frames then its keyframes; a flush is counted in video
    frames (its Stage 1 frames), its time is both writes.
    """

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        super().__init__(client, ttl_s)
        self.timer = Timer()

    def put_many(self, job_id: str, frames: dict[int, bytes], kind: str = "full") -> int:
        c, t = time.process_time(), time.perf_counter()
        added = super().put_many(job_id, frames, kind)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        if kind == "stage1" or not self.timer.calls:
            self.timer.add(wall, cpu, len(frames) if kind == "stage1" else 0)
        else:
            last_wall, last_frames = self.timer.calls[-1]
            self.timer.calls[-1] = (last_wall + wall, last_frames)
            self.timer.cpu += cpu
        return added


def _ingest(store: TimingStore, video: Path, job_id: str, settings: Settings,
            input_size: tuple[int, int]) -> dict:
    """Run the real ingest for a model of ``input_size``; its store-write rates, end-to-end rates
    and what it stored."""
    store.timer = Timer()
    cpu = time.process_time()
    result = ingest(job_spec(job_id, video, settings), settings, store, lambda slot, kfs: None,
                    input_size)
    cpu = time.process_time() - cpu
    n = result.video.frames
    return {"write": store.timer.rates(), "ingest": (n / result.seconds, n / cpu),
            "keyframes": result.keyframes, "frames": n}


def measure_size(width: int, height: int, frames: int, tmp: Path, client: redis.Redis,
                 settings: Settings) -> dict:
    video = make_video(tmp / f"video_{width}x{height}.mp4", frames=frames, width=width, height=height,
                       side=max(8, min(width, height) // 6))
    quality, stride = settings.frame_jpeg_quality, settings.keyframe_stride
    length, rate_, slot_size = settings.clip_length, settings.sampling_rate, settings.slot_size
    size = MODEL_SIZE
    job, full_job = f"bench-{width}x{height}", f"bench-{width}x{height}-full"
    out: dict = {"size": f"{width}x{height}", "frames": frames, "stage1_frame_size": size}
    cpu: dict[str, float] = {}

    def put(key: str, rates: tuple[float, float]) -> None:
        out[key], cpu[key] = rates

    # a: decode alone (frames dropped as they come: a 1080p video does not fit in memory twice).
    timer, frames_iter = Timer(), decode(video, 10**9)
    while timer.time(lambda: next(frames_iter, None)) is not None:
        pass
    timer.calls.pop()  # the call that found the end
    put("decode", timer.rates())

    # b, b', full-size encode: each timed alone on a second decode pass.
    s1_enc, kf_enc, full_enc = Timer(), Timer(), Timer()
    for index, frame in decode(video, 10**9):
        if clipmath.is_needed(index, stride, length, rate_):
            s1_enc.time(lambda f=frame: stage1_frame(f, (size, size)))
            full_enc.time(lambda f=frame: encode_lossless(f))
        if clipmath.is_keyframe(index, stride):
            kf_enc.time(lambda f=frame: encode_jpeg(f, quality))
    put("s1_encode", s1_enc.rates())
    put("kf_encode", kf_enc.rates())
    put("full_encode", full_enc.rates())

    # c, i: the real ingest, 224 copies (the package's default) and full-size Stage 1 frames.
    store = TimingStore(client, ttl_s=3600)
    ours = _ingest(store, video, job, settings, (size, size))
    theirs = _ingest(store, video, full_job, settings, (width, height))
    # The same ingest with its resize and encodes on the decoding thread (as before
    # INGEST_ENCODE_THREADS), side by side in this run.
    one_thread = settings.model_copy(update={"ingest_encode_threads": 1})
    put("ingest_1t", _ingest(store, video, job + "-1t", one_thread, (size, size))["ingest"])
    put("write", ours["write"])
    put("ingest", ours["ingest"])
    put("full_write", theirs["write"])
    put("full_ingest", theirs["ingest"])

    keyframes, n = ours["keyframes"], ours["frames"]
    needed = [i for i in range(n) if clipmath.is_needed(i, stride, length, rate_)]
    s1 = store.get_many(job, needed, kind="stage1")
    full = store.get_many(full_job, needed, kind="stage1")
    kf = store.get_many(job, keyframes, kind="full")
    out["s1_bytes"] = statistics.mean(map(len, s1.values()))
    out["kf_bytes"] = statistics.mean(map(len, kf.values()))
    out["bytes_per_video_frame"] = (sum(map(len, s1.values())) + sum(map(len, kf.values()))) / n
    out["full_bytes_per_video_frame"] = (sum(map(len, full.values())) + sum(map(len, kf.values()))) / n

    # d: one HMGET per clip, every keyframe's clip.
    clip_idx = [clipmath.clip_frames(k, length, rate_) for k in keyframes]
    put("read", _throughput(lambda idx: store.get_many(job, idx, kind="stage1"), clip_idx, length))
    put("full_read", _throughput(lambda idx: store.get_many(full_job, idx, kind="stage1"), clip_idx,
                                 length))

    # e: decode of stored Stage 1 frames; and the full-size ones at 1/k.
    k = out["reduction"] = reduction(width, height)

    def reduced(data: bytes, k: int = k) -> np.ndarray:  # raw frames: a full decode, then 1/k
        frame = decode_image(data)
        return frame if k == 1 else cv2.resize(frame, None, fx=1 / k, fy=1 / k,
                                               interpolation=cv2.INTER_AREA)

    put("jpeg_decode", _throughput(decode_image, list(s1.values())))
    put("full_jpeg_decode", _throughput(decode_image, list(full.values())))
    put("reduced_decode", _throughput(reduced, list(full.values())))

    # f: clip tensors from decoded frames (a window of them: sliding 16-frame clips).
    window = needed[: length + 3 * 4]
    starts = list(range(0, len(window) - length + 1, 4)) or [0]
    def resized_clip(frames: list[np.ndarray]) -> np.ndarray:  # Stage 1 resizing for itself
        return preprocess_clip([model_frame(f, MODEL_SIZE, MODEL_SIZE) for f in frames],
                               MODEL_SIZE, MODEL_SIZE)

    for key, decoded, fn in (("preprocess", [decode_image(s1[i]) for i in window],
                              lambda d: preprocess_clip(d, MODEL_SIZE, MODEL_SIZE)),
                             ("full_preprocess", [decode_image(full[i]) for i in window], resized_clip),
                             ("reduced_preprocess", [reduced(full[i]) for i in window], resized_clip)):
        put(key, _throughput(lambda s, d=decoded, fn=fn: fn(d[s : s + length]), starts, length))

    # g: a slot's 3 stored keyframe JPEGs, base64'd into the request as the VLM client does.
    slots = [s for s in clipmath.split_slots(keyframes, slot_size) if len(s) == slot_size] or [keyframes]
    put("stage2_b64", _throughput(lambda s: [image_part(kf[i]) for i in s], slots, len(slots[0])))

    for d in (out, cpu):
        d["stage1_cpu"] = _harmonic(d["read"], d["jpeg_decode"], d["preprocess"])
        d["full_stage1_cpu"] = _harmonic(d["full_read"], d["full_jpeg_decode"], d["full_preprocess"])
        d["reduced_stage1_cpu"] = _harmonic(d["full_read"], d["reduced_decode"], d["reduced_preprocess"])
    out["cpu"] = cpu
    store.delete(job)
    store.delete(full_job)
    video.unlink()
    return out


def slowest(rates: dict, need: dict[str, float], steps=SINGLE) -> tuple[str, float]:
    """The step with the least headroom (measured / needed) and that headroom."""
    key, _, kind = min(steps, key=lambda s: rates[s[0]] / need[s[2]])
    return key, rates[key] / need[kind]


def format_table(results: list[dict], need: dict[str, float]) -> str:
    col = 30
    head = (f"{'step':<32} {'need f/s':>8} | "
            + " | ".join(f"{r['size'] + ' f/s (x need)  cpu':>{col}}" for r in results))
    lines = [head, "-" * len(head)]

    def rate_row(key: str, label: str, kind: str) -> None:
        cells = [f"{r[key]:>10.0f} ({r[key] / need[kind]:>6.1f}x) {r['cpu'][key]:>7.0f}" for r in results]
        lines.append(f"{label:<32} {need[kind]:>8.1f} | " + " | ".join(f"{c:>{col}}" for c in cells))

    for group in (STEPS, COMBINED, FULL_STEPS):
        for key, label, kind in group:
            rate_row(key, label, kind)
        lines.append("")
    for key, label in SIZES:
        lines.append(f"{label:<32} {'':>8} | " + " | ".join(f"{r[key]:>{col}.0f}" for r in results))
    return "\n".join(lines)


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.frame_path", description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=419)
    parser.add_argument("--size", type=_size, nargs="+", default=[(320, 240), (1280, 720), (1920, 1080)],
                        metavar="WxH")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    settings = Settings()
    target = 1.0 / SEED_STAGE1_S
    need = needed_rates(target, settings.keyframe_stride, settings.clip_length)
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="zroact-framebench-") as tmp, EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        for width, height in args.size:
            results.append(measure_size(width, height, args.frames, Path(tmp), client, settings))
        client.close()
    load_after = os.getloadavg()
    for r in results:
        r["slowest"], r["slowest_headroom"] = slowest(r, need)
        r["slowest_cpu"], r["slowest_cpu_headroom"] = slowest(r["cpu"], need)
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpus": os.cpu_count(), "opencv_threads": cv2.getNumThreads(),
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "target_clips_per_s": target, "need_frames_per_s": need,
        "jpeg_quality": settings.frame_jpeg_quality, "results": results,
    }
    print(f"Frame path: {args.frames} frames a video, JPEG q{settings.frame_jpeg_quality}, Stage 1 "
          f"frames stored at {MODEL_SIZE}, {os.cpu_count()} CPUs, OpenCV "
          f"threads {cv2.getNumThreads()}; need = rate for {target:.2f} clips/s "
          f"(one GPU at {SEED_STAGE1_S * 1000:.0f} ms a clip)")
    print("f/s = frames/s from the median call's wall time; cpu = frames per CPU-second of this "
          "process (robust to a busy machine; redis-server's share not counted)")
    print(f"load average before {load_before[0]:.2f} / after {load_after[0]:.2f}")
    print(format_table(results, need))
    label = {k: lab for k, lab, _ in STEPS + COMBINED + FULL_STEPS}
    for r in results:
        x = {key: r[key] / need[kind] for key, _, kind in STEPS + COMBINED + FULL_STEPS}
        print(f"{r['size']}: slowest single step {label[r['slowest']]} at {r['slowest_headroom']:.1f}x need "
              f"(by CPU time: {label[r['slowest_cpu']]} at {r['slowest_cpu_headroom']:.1f}x); "
              f"Stage 1 d+e+f {x['stage1_cpu']:.1f}x need, with full-size frames "
              f"{x['full_stage1_cpu']:.1f}x, decoding those at 1/{r['reduction']} "
              f"{x['reduced_stage1_cpu']:.1f}x; ingest {x['ingest']:.1f}x need "
              f"(full size {x['full_ingest']:.1f}x)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
