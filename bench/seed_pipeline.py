"""The seed pipeline (``../shared/seeds/asyncio-pipeline-zroact-stage2.txt``), reimplemented over
the same simulated parts zroact runs on, so the two can be compared in one bench run.

The seed is one asyncio loop per video:

* **baseline** (``gather_stage1=False, vlm_concurrency=1``): Stage 1 batches awaited one after the
  other (``for kf_batch in keyframe_batches: await detect(...)``); a Stage 2 task is spawned with
  ``asyncio.create_task`` the moment a slot's keyframes all have results; VLM calls are guarded by
  ``asyncio.Semaphore(1)``.
* **optimized** (the article's options A+B; ``gather_stage1=True, vlm_concurrency=2``): all Stage 1
  batches dispatched at once with ``asyncio.gather``; ``Semaphore(2)``. Each gathered batch hands
  its results on as it finishes, so Stage 2 still starts per slot (the article's listing
  ``results = await asyncio.gather(*tasks)`` would hold every slot back until all of Stage 1 is
  done; this version is the stronger, streaming reading of it, as its log shows).

Parts, the same as zroact's:

* Stage 1 runs ``detector.infer`` (any zroact ``Detector``, e.g. ``zroact_tasks.testing.simgpu.SimulatedGPUDetector``)
  on real clips built with ``clip_frames`` + ``preprocess_clip``, then ``postprocess``. The seed's
  Stage 1 was an HTTP daemon; a thread executor keeps the event loop free the same way (concurrent
  calls meet at the detector, i.e. at the simulated GPU's lock).
* Stage 2 POSTs the body zroact's ``VLMClient.build_request`` builds (3 JPEG keyframes + the
  ``slot_text`` prompt with the slot's detections) with ``httpx.AsyncClient`` and parses the answer
  with ``parse_verdict``.

The video is decoded with OpenCV first (all frames held in memory, keyframes JPEG-encoded for
Stage 2). **The decode is inside the makespan** (zroact's makespan includes its ingest too) and
is also returned alone as ``decode_s``. Resolving the served model name (``GET /v1/models``) when
none is given happens before the clock starts: the seed's servers are already up.

Run standalone: ``python -m bench.seed_pipeline [--scale F] [--variant baseline|optimized|both]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np

from zroact_tasks.config import Settings
from zroact_tasks.errors import VLMError
from zroact_tasks.media.clips import clip_frames, keyframe_indices, split_slots
from zroact_tasks.media.video import encode_jpeg
from zroact_tasks.models import Detection
from zroact_tasks.stage1.yowo import model_frame, postprocess, preprocess_clip
from zroact_tasks.stage2.prompts import slot_text
from zroact_tasks.stage2.vlm import VLMClient, parse_verdict

DEFAULT_PROMPT = Settings.model_fields["prompt"].default
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {"gather_stage1": False, "vlm_concurrency": 1},
    "optimized": {"gather_stage1": True, "vlm_concurrency": 2},
}


def decode_video(video: Path, keyframes_of: Any, jpeg_quality: int) -> tuple[list[np.ndarray], float, dict[int, bytes]]:
    """All BGR frames, the fps, and JPEGs of the keyframes (``keyframes_of(n_frames)``)."""
    cap = cv2.VideoCapture(str(video))
    try:
        if not cap.isOpened():
            raise ValueError(f"OpenCV cannot open {video}")
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0) or 30.0
        frames = []
        while True:
            ok, frame = cap.read()
            if not ok or frame is None:
                break
            frames.append(frame)
    finally:
        cap.release()
    jpegs = {kf: encode_jpeg(frames[kf], jpeg_quality) for kf in keyframes_of(len(frames))}
    return frames, fps, jpegs


async def run_seed(video: Path, detector: Any, vlm_url: str, *, gather_stage1: bool,
                   vlm_concurrency: int, stride: int = 10, slot_size: int = 3,
                   stage1_batch: int = 1, prompt: str = DEFAULT_PROMPT,
                   sampling_rate: int = 1, jpeg_quality: int = 95, vlm_model: str | None = None,
                   max_tokens: int = 256, timeout_s: float = 300.0, score_threshold: float = 0.3,
                   nms_iou: float = 0.5, max_detections: int = 300,
                   executor_workers: int = 4) -> dict[str, Any]:
    """One video through the seed pipeline; times are seconds from the start (before decode)."""
    loop = asyncio.get_running_loop()
    vlm = VLMClient(vlm_url, model=vlm_model, timeout_s=timeout_s, max_retries=0,
                    backoff_max_s=1.0, max_tokens=max_tokens)
    executor = ThreadPoolExecutor(max_workers=executor_workers, thread_name_prefix="seed-stage1")
    http = httpx.AsyncClient(base_url=vlm.base_url, timeout=timeout_s)
    try:
        _ = vlm.model  # resolved before the clock starts (servers are up in the seed too)
        t0 = time.perf_counter()

        def now() -> float:
            return time.perf_counter() - t0

        frames, fps, jpegs = await loop.run_in_executor(
            executor, decode_video, Path(video), lambda n: keyframe_indices(n, stride), jpeg_quality)
        decode_s = now()
        keyframes = keyframe_indices(len(frames), stride)
        slots = [s for s in split_slots(keyframes, slot_size) if len(s) == slot_size]
        batches = [keyframes[i : i + stage1_batch] for i in range(0, len(keyframes), stage1_batch)]
        height, width = frames[0].shape[:2]
        length = detector.clip_length

        def detect(kf_batch: list[int]) -> dict[int, list[Detection]]:
            clips = np.stack([
                preprocess_clip([model_frame(frames[i], detector.input_width, detector.input_height)
                                 for i in clip_frames(kf, length, sampling_rate)],
                                detector.input_height, detector.input_width)
                for kf in kf_batch])
            output = detector.infer(clips)
            return {kf: postprocess(output[n], frame_size=(width, height),
                                    input_size=(detector.input_width, detector.input_height),
                                    score_threshold=score_threshold, nms_iou=nms_iou,
                                    max_detections=max_detections, labels=detector.labels)
                    for n, kf in enumerate(kf_batch)}

        semaphore = asyncio.Semaphore(vlm_concurrency)
        results: dict[int, list[Detection]] = {}
        spawned: set[int] = set()
        stage2_tasks: list[asyncio.Task] = []
        request_times: list[tuple[float, float]] = []
        errors: list[str] = []
        stage1_end = 0.0

        async def judge(kfs: list[int]) -> None:
            body = vlm.build_request([jpegs[kf] for kf in kfs],
                                     slot_text(prompt, kfs, fps, {kf: results[kf] for kf in kfs}))
            async with semaphore:
                start = now()
                try:
                    response = await http.post("/v1/chat/completions", json=body)
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return
                finally:
                    request_times.append((start, now()))
            try:
                if response.status_code != 200:
                    raise VLMError(f"HTTP {response.status_code}: {response.text[:200]}")
                parse_verdict(response.json(), max_tokens)
            except (VLMError, ValueError) as exc:
                errors.append(str(exc))

        def on_results(batch: dict[int, list[Detection]]) -> None:
            nonlocal stage1_end
            results.update(batch)
            stage1_end = now()
            for n, kfs in enumerate(slots):
                if n not in spawned and all(kf in results for kf in kfs):
                    spawned.add(n)
                    stage2_tasks.append(asyncio.create_task(judge(kfs)))

        stage1_start = now()
        if gather_stage1:
            async def one(kf_batch: list[int]) -> None:
                on_results(await loop.run_in_executor(executor, detect, kf_batch))

            await asyncio.gather(*(one(b) for b in batches))
        else:
            for kf_batch in batches:
                on_results(await loop.run_in_executor(executor, detect, kf_batch))
        await asyncio.gather(*stage2_tasks)
        makespan = now()
    finally:
        await http.aclose()
        vlm.close()
        executor.shutdown(wait=False)
    request_times.sort()
    return {
        "makespan_s": makespan,
        "decode_s": decode_s,
        "stage1_s": stage1_end - stage1_start,
        "stage1_end_s": stage1_end,
        "stage2_request_times": request_times,
        "first_stage2_start_s": request_times[0][0] if request_times else None,
        "n_requests": len(request_times),
        "n_errors": len(errors),
        "errors": errors[:5],
        "n_frames": len(frames),
        "n_keyframes": len(keyframes),
        "gather_stage1": gather_stage1,
        "vlm_concurrency": vlm_concurrency,
    }


def main(argv: list[str] | None = None) -> int:
    """Both seed variants on the sample video, simulated GPU + stand-in, next to their bounds."""
    from zroact_tasks.testing import simgpu
    from bench.simulate import JobShape, simulate
    from zroact_tasks.testing.onnx_models import make_yowo_model
    from zroact_tasks.testing.sample_media import make_video
    from zroact_tasks.testing.vllm_standin import VLLMStandIn

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--variant", choices=[*VARIANTS, "both"], default="both")
    parser.add_argument("--per-clip-s", type=float, default=0.163)
    parser.add_argument("--latency-s", type=float, default=2.07)
    parser.add_argument("--growth", type=float, default=0.10)
    parser.add_argument("--frames", type=int, default=419)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="zroact-seed-") as tmp:
        d = Path(tmp)
        video = make_video(d / "sample.mp4", frames=args.frames)
        model = make_yowo_model(d / "model.onnx")
        detector = simgpu.SimulatedGPUDetector(Settings(model=model), gpu_lock=str(d / "gpu0.lock"),
                                               per_clip_s=args.per_clip_s * args.scale)
        with VLLMStandIn(latency_s=args.latency_s * args.scale, latency_growth=args.growth) as vllm:
            for name in VARIANTS if args.variant == "both" else [args.variant]:
                kw = VARIANTS[name]
                r = asyncio.run(run_seed(video, detector, vllm.url, **kw))
                bound = simulate([JobShape(r["n_keyframes"])], per_clip_s=args.per_clip_s,
                                 latency_s=args.latency_s, growth=args.growth,
                                 servers=[kw["vlm_concurrency"]], scale=args.scale).makespan
                r.update(bound_s=bound, ratio_to_bound=r["makespan_s"] / bound)
                out[name] = r
                print(f"seed {name:9s} makespan {r['makespan_s']:7.3f} s  bound {bound:7.3f} s  "
                      f"ratio {r['ratio_to_bound']:.3f}  decode {r['decode_s']:.3f} s  stage1 "
                      f"{r['stage1_s']:.3f} s  first VLM at {r['first_stage2_start_s']:.3f} s  "
                      f"{r['n_requests']} requests, {r['n_errors']} errors", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
