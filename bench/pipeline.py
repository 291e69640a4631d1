"""The speed benchmark: the seed asyncio pipeline vs zroact, side by side, on simulated GPUs.

    python -m bench.pipeline [--scale 1.0] [--json OUT]

Workload = the seed's: a 419-frame video at 30 fps, stride 10 -> 41 clips, slots of 3 -> 13 VLM
requests. Stage 1 costs 163 ms a clip on one simulated GPU (a real small ONNX model runs, then the
rest is slept under a file lock shared by every process on that GPU); Stage 2 is the vLLM
stand-in's latency model, 2.07 s with one request in flight and +10 % per extra one. ``--scale``
multiplies every simulated cost. ``bound_s`` is the makespan of a zero-overhead event simulation
of the same costs and parallelism (bench/simulate.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
from pathlib import Path

from zroact_tasks.config import Settings
from zroact_tasks.testing.onnx_models import make_yowo_model
from zroact_tasks.testing.sample_media import make_video
from zroact_tasks.testing.simgpu import SimulatedGPUDetector
from zroact_tasks.testing.taskevents import percentiles_ms
from zroact_tasks.testing.vllm_standin import VLLMStandIn

from .seed_pipeline import run_seed
from .simulate import JobShape, simulate, stage2_utilisation
from .zroact_runs import SEED_STAGE1_S, SEED_VLM_S, VLM_GROWTH, Setup, run_zroact

KEYFRAMES = 41

ZROACT_VARIANTS = {
    "3 zroact 1xS2(c3)": Setup(stage2_workers=1, jobs=1),
    "4 zroact 2xS2(c3), 2 VLMs": Setup(stage2_workers=2, jobs=1),
    "5 zroact 4 jobs, 1xS2(c3)": Setup(stage2_workers=1, jobs=4),
    "6 zroact 4 jobs, 2xS2(c3), 2 VLMs": Setup(stage2_workers=2, jobs=4),
}


def bound(scale: float, servers: list[int], jobs: int = 1):
    shapes = [JobShape(KEYFRAMES) for _ in range(jobs)]
    runs = [simulate(shapes, per_clip_s=SEED_STAGE1_S, latency_s=SEED_VLM_S, growth=VLM_GROWTH,
                     servers=servers, order=order, scale=scale) for order in ("fifo", "round_robin")]
    return min(runs, key=lambda r: r.makespan)  # the most favourable order: the strictest bound


def run_seed_variants(video: Path, model: Path, scale: float, tmp: Path) -> dict[str, dict]:
    detector = SimulatedGPUDetector(Settings(model=model), gpu_lock=str(tmp / "seed-gpu.lock"),
                                    per_clip_s=SEED_STAGE1_S * scale)
    out = {}
    for name, gather, concurrency in (("1 seed baseline", False, 1), ("2 seed optimized", True, 2)):
        with VLLMStandIn(latency_s=SEED_VLM_S * scale, latency_growth=VLM_GROWTH) as vllm:
            r = asyncio.run(run_seed(video, detector, vllm.url, gather_stage1=gather,
                                     vlm_concurrency=concurrency))
        b = bound(scale, [concurrency])
        busy = sum(e - s for s, e in r["stage2_request_times"])  # one request at a time or two
        out[name] = {"makespan_s": r["makespan_s"], "bound_s": b.makespan,
                     "stage2_utilisation": min(1.0, busy / concurrency / r["makespan_s"]),
                     "bound_stage2_utilisation": stage2_utilisation(b, 1),
                     "requests": r["n_requests"], "errors": r["n_errors"]}
    return out


def run_zroact_variants(video: Path, warmup: Path, model: Path, scale: float) -> dict[str, dict]:
    out = {}
    for name, setup in ZROACT_VARIANTS.items():
        r = run_zroact(setup, video=video, warmup_video=warmup, model=model, scale=scale)
        b = bound(scale, [setup.stage2_concurrency] * setup.stage2_workers, setup.jobs)
        d50, d99 = percentiles_ms(r["dispatch_s"])
        h50, h99 = percentiles_ms(r["handoff_s"])
        out[name] = {"makespan_s": r["makespan_s"], "bound_s": b.makespan,
                     "stage2_utilisation": r["stage2_utilisation"],
                     "bound_stage2_utilisation": stage2_utilisation(b, setup.stage2_workers),
                     "bound_stage1_busy_fraction": b.stage1_busy_s / b.makespan,
                     "requests": r["requests"], "statuses": r["statuses"],
                     "dispatch_p50_ms": d50, "dispatch_p99_ms": d99,
                     "handoff_p50_ms": h50, "handoff_p99_ms": h99, "logs": r["logs"],
                     "gpu_busy_share": r["gpu_busy_s"] / r["makespan_s"],
                     "gpu_idle_waiting_share": r["gpu_idle_waiting_s"] / r["makespan_s"],
                     "gpu_idle_clips_wait_share": r["gpu_idle_clips_wait_s"] / r["makespan_s"],
                     "gpu_calls": r["gpu_calls"],
                     "handoff_parts_p50_p99_ms": {k: percentiles_ms(v) for k, v in
                                                  r["handoff_parts_s"].items()},
                     "cpu_ms_per_clip_by_role": {k: 1000 * v / (KEYFRAMES * setup.jobs) for k, v in
                                                 {**r["cpu_by_role_s"], "bench": r["cpu_bench_s"]}.items()},
                     # CPU of every process (workers, Redis, the bench's client and stand-ins)
                     # per clip of the reference job; "excl. model": minus the real ONNX model
                     # that the simulated GPU runs on the CPU (GPU work on a real machine).
                     "cpu_ms_per_clip": 1000 * (r["cpu_workers_s"] + r["cpu_bench_s"])
                                        / (KEYFRAMES * setup.jobs),
                     "cpu_ms_per_clip_excl_model": 1000 * (r["cpu_workers_s"] + r["cpu_bench_s"]
                                                           - r["model_infer_s"])
                                                   / (KEYFRAMES * setup.jobs)}
    return out


def summarise(variants: dict[str, dict], scale: float) -> dict:
    for v in variants.values():
        v["ratio_to_bound"] = v["makespan_s"] / v["bound_s"]
    seed_opt = variants["2 seed optimized"]["makespan_s"]
    v3, v4 = variants["3 zroact 1xS2(c3)"], variants["4 zroact 2xS2(c3), 2 VLMs"]
    v5, v6 = variants["5 zroact 4 jobs, 1xS2(c3)"], variants["6 zroact 4 jobs, 2xS2(c3), 2 VLMs"]
    zroact = [v for k, v in variants.items() if "zroact" in k]
    dispatch = [v["dispatch_p50_ms"] for v in zroact]
    return {
        "scale": scale,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "variants": variants,
        "speedup_vs_seed_optimized": {"3": seed_opt / v3["makespan_s"], "4": seed_opt / v4["makespan_s"]},
        "dispatch_p50_ms": max(dispatch),
        "dispatch_p99_ms": max(v["dispatch_p99_ms"] for v in zroact),
        "handoff_p50_ms": max(v["handoff_p50_ms"] for v in zroact),
        "handoff_p99_ms": max(v["handoff_p99_ms"] for v in zroact),
        # 1 -> 2 Stage 2 workers (each with its own VLM): one job, and four jobs.
        "scaling_efficiency_2_workers": v3["makespan_s"] / v4["makespan_s"] / 2,
        "scaling_efficiency_2_workers_bound": v3["bound_s"] / v4["bound_s"] / 2,
        "scaling_efficiency_2_workers_4_jobs": v5["makespan_s"] / v6["makespan_s"] / 2,
        "scaling_efficiency_2_workers_4_jobs_bound": v5["bound_s"] / v6["bound_s"] / 2,
    }


def table(result: dict) -> str:
    head = (f"{'variant':36} {'makespan_s':>10} {'bound_s':>8} {'ratio':>6} {'S2 util':>7} "
            f"{'disp p50/p99 ms':>16} {'handoff p50/p99 ms':>19} {'GPU idle|wait':>13} "
            f"{'bound busy':>10} {'CPU ms/clip':>11}")
    lines = [head, "-" * len(head)]
    for name, v in result["variants"].items():
        disp = f"{v['dispatch_p50_ms']:.1f}/{v['dispatch_p99_ms']:.1f}" if "dispatch_p50_ms" in v else "-"
        hand = f"{v['handoff_p50_ms']:.1f}/{v['handoff_p99_ms']:.1f}" if "handoff_p50_ms" in v else "-"
        idle = f"{v['gpu_idle_waiting_share']:.1%}" if "gpu_idle_waiting_share" in v else "-"
        busy = f"{v['bound_stage1_busy_fraction']:.0%}" if "bound_stage1_busy_fraction" in v else "-"
        cpu = (f"{v['cpu_ms_per_clip']:.0f}/{v['cpu_ms_per_clip_excl_model']:.0f}"
               if "cpu_ms_per_clip" in v else "-")
        lines.append(f"{name:36} {v['makespan_s']:10.2f} {v['bound_s']:8.2f} "
                     f"{v['ratio_to_bound']:6.3f} {v['stage2_utilisation']:7.2f} {disp:>16} {hand:>19}"
                     f" {idle:>13} {busy:>10} {cpu:>11}")
    s = result["speedup_vs_seed_optimized"]
    lines += [
        "",
        f"scale {result['scale']}; {result['machine']}",
        f"speedup vs seed optimized: variant 3 {s['3']:.2f}x, variant 4 {s['4']:.2f}x",
        f"scaling 1->2 Stage 2 workers: 1 job {result['scaling_efficiency_2_workers']:.2f} "
        f"(bound {result['scaling_efficiency_2_workers_bound']:.2f}: Stage 1 binds, GPU busy "
        f"{result['variants']['4 zroact 2xS2(c3), 2 VLMs']['bound_stage1_busy_fraction']:.0%} of "
        f"the bound); 4 jobs {result['scaling_efficiency_2_workers_4_jobs']:.2f} "
        f"(bound {result['scaling_efficiency_2_workers_4_jobs_bound']:.2f})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every simulated cost")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--only", choices=["seed", "zroact"], help="run one side only (debugging)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="zroact-bench-") as tmp:
        d = Path(tmp)
        video = make_video(d / "seed.mp4", frames=419, fps=30.0)
        warmup = make_video(d / "warmup.mp4", frames=47)
        model = make_yowo_model(d / "model.onnx")
        variants = {}
        if args.only != "zroact":
            variants.update(run_seed_variants(video, model, args.scale, d))
        if args.only != "seed":
            variants.update(run_zroact_variants(video, warmup, model, args.scale))
    if args.only:
        for v in variants.values():
            v["ratio_to_bound"] = v["makespan_s"] / v["bound_s"]
        print(json.dumps(variants, indent=2))
        return 0
    result = summarise(variants, args.scale)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
