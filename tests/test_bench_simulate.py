"""The bench's zero-overhead simulation (hand-computed cases), its simulated GPU lock and the seed
pipeline (a smoke run)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing

import numpy as np
import pytest

from zroact_tasks.testing import simgpu
from bench.seed_pipeline import VARIANTS, run_seed
from bench.simulate import JobShape, SimResult, issue3_bounds, simulate, stage2_utilisation
from zroact_tasks.config import Settings
from zroact_tasks.testing.onnx_models import make_yowo_model
from zroact_tasks.testing.sample_media import make_video
from zroact_tasks.testing.vllm_standin import VLLMStandIn

SEED = {"per_clip_s": 0.163, "latency_s": 2.07, "growth": 0.10}


def approx(x: float) -> object:
    return pytest.approx(x, abs=1e-9)


# ------------------------------------------------------------------ the simulation


def test_seed_baseline_one_server_at_concurrency_one():
    # 41 keyframes -> 41 Stage 1 calls of 0.163 s on one GPU; slot j (keyframes 3j..3j+2) is
    # ready at (3j+3)*0.163 = 0.489*(j+1). With one server at concurrency 1 every request runs
    # alone (2.07 s, no growth), and each ends after the next slot is ready (2.559 > 0.978), so
    # the 13 requests run back to back from 0.489 s: makespan = 0.489 + 13*2.07 = 27.399.
    r = simulate([JobShape(41)], servers=[1], **SEED)
    assert r.makespan == approx(27.399)
    assert r.job_makespans == [approx(27.399)]
    assert (r.n_stage1_calls, r.n_stage2_requests) == (41, 13)
    assert r.stage1_busy_s == approx(41 * 0.163)
    assert r.stage2_busy_s == approx(13 * 2.07) and r.stage2_request_s == approx(13 * 2.07)
    assert stage2_utilisation(r, 1) == approx(13 * 2.07 / 27.399)


def test_three_in_flight_without_growth_runs_three_lanes():
    # growth 0: every request takes 2.07 s. Slots 0, 1, 2 start when ready (0.489, 0.978,
    # 1.467); slot j >= 3 starts when slot j-3 ends (its ready time 0.489*(j+1) is always
    # earlier, as 2.07 > 3*0.489). So lane i = j mod 3 runs back to back: lane 0 has slots
    # 0,3,6,9,12 -> 0.489 + 5*2.07 = 10.839; lanes 1, 2 have 4 slots -> 9.258, 9.747.
    r = simulate([JobShape(41)], servers=[3], per_clip_s=0.163, latency_s=2.07, growth=0.0)
    assert r.makespan == approx(10.839)
    assert r.stage2_request_s == approx(13 * 2.07)
    assert r.stage2_busy_s == approx(10.839 - 0.489)


def test_growth_makes_concurrent_requests_slower():
    # servers [2], growth 0.1: slot 0 starts alone at 0.489 (2.07 s, ends 2.559); slot 1 starts
    # at 0.978 next to it (2.277 s, ends 3.255). From then on pairs run at 2.277 s: slots 2k and
    # 2k+1 start at the ends of slots 2k-2 and 2k-1. Slot 12 starts at 2.559 + 5*2.277 = 13.944
    # with slot 11 in flight, so it takes 2.277 s: makespan 16.221.
    r = simulate([JobShape(41)], servers=[2], **SEED)
    assert r.makespan == approx(16.221)
    assert r.stage2_request_s == approx(2.07 + 12 * 2.277)


def test_two_servers_pick_the_emptier_one():
    # [1, 1]: every request runs alone (2.07 s) on server 0 or 1; slots alternate between them.
    # Server 0 runs slots 0,2,...,12 (7) from 0.489: 0.489 + 7*2.07 = 14.979.
    r = simulate([JobShape(41)], servers=[1, 1], **SEED)
    assert r.makespan == approx(14.979)
    assert r.stage2_request_s == approx(13 * 2.07)
    # Two slots on [3, 3]: slot 1 goes to the empty server 1 and runs alone (ends 0.978 + 2.07);
    # on a single [3] it would share server 0 with slot 0 and take 2.277 s (ends 3.255).
    two = simulate([JobShape(6)], servers=[3, 3], **SEED)
    one = simulate([JobShape(6)], servers=[3], **SEED)
    assert two.makespan == approx(0.978 + 2.07) and two.stage2_request_s == approx(2 * 2.07)
    assert one.makespan == approx(0.978 + 2.277)
    assert stage2_utilisation(two, 2) == approx(2 * 2.07 / (2 * 3.048))


def test_stage1_batching_and_the_trailing_partial_slot():
    # batch 4, fixed 0.05: calls [0..3] end 0.05 + 4*0.163 = 0.702, [4..7] end 1.404,
    # [8] ends 1.404 + 0.05 + 0.163 = 1.617. Slots ready at 0.702, 1.404 (keyframe 5 is in
    # the 2nd call), 1.617; requests of 1 s with no growth -> makespan 2.617.
    r = simulate([JobShape(9)], per_clip_s=0.163, fixed_s=0.05, stage1_batch=4, servers=[3],
                 latency_s=1.0)
    assert r.makespan == approx(2.617)
    assert r.n_stage1_calls == 3 and r.stage1_busy_s == approx(1.617)
    # 10 keyframes: the 10th is Stage 1 only, and the job ends with it (10*0.163 = 1.63 > slot
    # 2's end, 9*0.163 + 0.1 = 1.567).
    r = simulate([JobShape(10)], per_clip_s=0.163, servers=[3], latency_s=0.1)
    assert r.n_stage2_requests == 3 and r.makespan == approx(1.63)


def test_fifo_and_round_robin_across_two_jobs():
    # Two jobs of 3 keyframes, 1 s per clip, 1 s requests, two places. FIFO: job 0's clips run
    # 0-3 (its slot ends 4), job 1's 3-6 (ends 7). Round robin alternates the jobs' clips:
    # job 0 finishes its 3rd clip at 5 (slot ends 6), job 1 at 6 (ends 7).
    jobs = [JobShape(3), JobShape(3)]
    kw = {"per_clip_s": 1.0, "latency_s": 1.0, "servers": [2]}
    fifo = simulate(jobs, order="fifo", **kw)
    rr = simulate(jobs, order="round_robin", **kw)
    assert fifo.job_makespans == [approx(4.0), approx(7.0)] and fifo.makespan == approx(7.0)
    assert rr.job_makespans == [approx(6.0), approx(7.0)] and rr.makespan == approx(7.0)
    with pytest.raises(ValueError):
        simulate(jobs, order="lifo", **kw)


def test_later_submission_and_idle_gaps():
    # Job 1 arrives at 10, after job 0 ended at 4: its own makespan is 4 too, the overall 14.
    r = simulate([JobShape(3), JobShape(3, submit_at=10.0)], per_clip_s=1.0, latency_s=1.0,
                 servers=[1])
    assert r.job_makespans == [approx(4.0), approx(4.0)] and r.makespan == approx(14.0)
    assert r.stage1_busy_s == approx(6.0) and r.stage2_busy_s == approx(2.0)
    assert simulate([], per_clip_s=1.0, latency_s=1.0) == SimResult(makespan=0.0)


def test_costs_scale_the_makespan_linearly():
    for servers in ([1], [2], [3], [3, 3]):
        for jobs in ([JobShape(41)], [JobShape(41)] * 4):
            full = simulate(jobs, servers=servers, **SEED)
            quarter = simulate(jobs, servers=servers, scale=0.25, **SEED)
            assert quarter.makespan == pytest.approx(0.25 * full.makespan, rel=1e-9)
    bounds, quick = issue3_bounds(), issue3_bounds(0.25)
    assert bounds["seed_baseline"].makespan == approx(27.399)
    assert bounds["zroact_4jobs"].n_stage2_requests == 52
    for name, r in bounds.items():
        assert quick[name].makespan == pytest.approx(0.25 * r.makespan, rel=1e-9)


# ------------------------------------------------------------------ the simulated GPU


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_yowo_model(tmp_path_factory.mktemp("bench") / "model.onnx")


def _gpu_user(model: str, lock: str, log: str, calls: int, barrier) -> None:
    detector = simgpu.SimulatedGPUDetector(Settings(model=model), gpu_lock=lock, log_file=log,
                                           per_clip_s=0.1)
    clip = np.zeros((1, 3, detector.clip_length, detector.input_height, detector.input_width),
                    np.float32)
    barrier.wait(timeout=60)  # both processes loaded: their calls contend for the lock
    for _ in range(calls):
        assert detector.infer(clip).shape[0] == 1


def test_two_processes_on_one_simulated_gpu_never_overlap(model, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    lock, log = tmp_path / "gpu0.lock", tmp_path / "stage1.jsonl"
    procs = [ctx.Process(target=_gpu_user, args=(str(model), str(lock), str(log), 3, barrier))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
        assert p.exitcode == 0
    entries = simgpu.read_log(log)
    assert len(entries) == 6 and len({e["pid"] for e in entries}) == 2
    assert all(e["n"] == 1 and e["t_end"] - e["t_lock_acquired"] >= 0.1 for e in entries)
    for before, after in zip(entries, entries[1:]):
        assert before["t_end"] <= after["t_lock_acquired"]  # held by one process at a time
    assert entries[-1]["t_end"] - entries[0]["t_lock_acquired"] >= 0.6
    assert simgpu.busy_seconds(entries) >= 0.6
    assert all(json.loads(line) for line in log.read_text().splitlines())


def test_the_simulated_gpu_is_configured_through_detector_options(model, tmp_path):
    from zroact_tasks.errors import ModelError
    from zroact_tasks.stage1.detector import load_detector

    name = "zroact_tasks.testing.simgpu:SimulatedGPUDetector"
    with pytest.raises(ModelError, match="gpu_lock"):  # the lock (one per GPU) is required
        load_detector(Settings(model=model, detector=name))
    det = load_detector(Settings(model=model, detector=name, detector_options={
        "gpu_lock": str(tmp_path / "g.lock"), "per_clip_s": 0.01}))
    assert isinstance(det, simgpu.SimulatedGPUDetector) and det.cost(3) == pytest.approx(0.03)


# ------------------------------------------------------------------ the seed pipeline


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_seed_pipeline_smoke(variant, model, tmp_path, monkeypatch):
    detector = simgpu.SimulatedGPUDetector(Settings(model=model), gpu_lock=str(tmp_path / "gpu.lock"),
                                           per_clip_s=0.01)
    video = make_video(tmp_path / "short.mp4", frames=47)  # keyframes 9, 19, 29, 39 -> 1 slot
    with VLLMStandIn(latency_s=0.05) as vllm:
        r = asyncio.run(run_seed(video, detector, vllm.url, **VARIANTS[variant]))
        assert len(vllm.requests) == 1
        assert len(vllm.requests[0]["messages"][0]["content"]) == 4  # 3 images + the text
    assert r["n_keyframes"] == 4 and r["n_requests"] == 1 and r["n_errors"] == 0
    assert r["makespan_s"] > 0 and 0 < r["decode_s"] < r["first_stage2_start_s"]
    (start, end), = r["stage2_request_times"]
    assert end - start >= 0.05 and end <= r["makespan_s"]


def test_gpu_idle_counts_only_while_sent_clips_have_not_reached_the_gpu():
    from types import SimpleNamespace

    from bench.zroact_runs import gpu_idle_while_clips_wait

    calls = [{"t_lock_acquired": 1.0, "t_end": 2.0, "n": 1},
             {"t_lock_acquired": 3.0, "t_end": 4.0, "n": 1},
             {"t_lock_acquired": 6.0, "t_end": 6.5, "n": 2}]
    sent = [SimpleNamespace(sent=t) for t in (0.5, 0.6, 5.0, 5.5)]
    # waiting: 0.5-1.0 (2 clips), 2.0-3.0 (1), nothing 4.0-5.0 (no clip sent), 5.0-6.0 (1-2)
    assert gpu_idle_while_clips_wait(calls, sent, 0.0, 7.0) == pytest.approx(2.5)
    assert gpu_idle_while_clips_wait(calls, sent, 0.8, 5.5) == pytest.approx(0.2 + 1.0 + 0.5)
