"""The zero-overhead bound: a discrete-event simulation of the two stages (pure Python, no I/O).

Given the same costs and the same parallelism as a real run, :func:`simulate` returns the makespan
if every task started the instant its inputs and a slot were free. A real pipeline can only be
slower; ``measured / bound`` is its overhead.

Modelled:

* Stage 1: one task per keyframe, all ready at their job's ``submit_at``. ``gpus`` simulated
  GPUs each run one call at a time; a call of ``n`` clips takes ``fixed_s + per_clip_s * n``,
  ``n = min(stage1_batch, clips of that job not started yet)`` -- a call never mixes jobs, as a
  zroact Stage 1 task does not. Which job a free GPU serves next: ``order="fifo"`` = the first
  job by (submit_at, job index) that has clips left (keyframe order within a job);
  ``order="round_robin"`` = the next submitted job after the one served last, cyclically.
  Simultaneously free GPUs pick in index order.
* Stage 2: slot ``j`` of a job (keyframe positions ``3j..3j+2``; only full slots, a trailing
  partial slot runs Stage 1 only) is ready when its keyframes' Stage 1 calls have finished.
  Ready slots wait in one FIFO queue (by ready time, then in the order they became ready). A slot
  starts as soon as some server has a free place (``servers[i]`` = its max in flight), on the
  server with the fewest in flight (ties: lowest index); its duration is fixed at start:
  ``latency_s * (1 + growth * (k - 1))`` with ``k`` = in flight on that server including
  itself -- the vLLM stand-in's latency model. At one instant, completions are processed before
  new starts.

Not modelled: video decode, frame storage, JPEG work, preprocessing, network and broker latency,
task dispatch, CPU contention, result collection -- everything a real run adds on top.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

ORDERS = ("fifo", "round_robin")


@dataclass(frozen=True)
class JobShape:
    """One job: ``n_keyframes`` Stage 1 clips, slots of ``slot_size``, submitted at ``submit_at``."""

    n_keyframes: int
    slot_size: int = 3
    submit_at: float = 0.0


@dataclass(frozen=True)
class SimResult:
    makespan: float
    """Last completion minus the earliest ``submit_at``."""
    job_makespans: list[float] = field(default_factory=list)
    """Per job: its last completion minus its own ``submit_at``."""
    stage1_busy_s: float = 0.0
    """Sum over GPUs of the time a call was running."""
    stage2_busy_s: float = 0.0
    """Sum over servers of the time with at least one request in flight."""
    stage2_request_s: float = 0.0
    """Sum of request durations."""
    n_stage1_calls: int = 0
    n_stage2_requests: int = 0


def simulate(jobs: list[JobShape], *, per_clip_s: float, latency_s: float, growth: float = 0.0,
             fixed_s: float = 0.0, gpus: int = 1, stage1_batch: int = 1,
             servers: list[int] | tuple[int, ...] = (3,), order: str = "fifo",
             scale: float = 1.0) -> SimResult:
    """The zero-overhead makespan of ``jobs``; ``scale`` multiplies every cost (not submit times)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    if gpus < 1 or stage1_batch < 1 or not servers or min(servers) < 1:
        raise ValueError("need gpus >= 1, stage1_batch >= 1 and servers with max in flight >= 1")
    per_clip, fixed, latency = per_clip_s * scale, fixed_s * scale, latency_s * scale
    by_submit = sorted(range(len(jobs)), key=lambda j: (jobs[j].submit_at, j))
    pending = [deque(range(job.n_keyframes)) for job in jobs]
    n_full = [job.n_keyframes // job.slot_size for job in jobs]
    missing = [[job.slot_size] * n for job, n in zip(jobs, n_full)]  # Stage 1 results still due
    job_end = [job.submit_at for job in jobs]
    submitted: list[int] = []  # job indices in (submit_at, index) order
    ready2: deque[tuple[int, int]] = deque()
    gpu_free = [True] * gpus
    in_flight = [0] * len(servers)
    busy_since = [0.0] * len(servers)
    busy1 = busy2 = request_s = 0.0
    calls = requests = 0
    last_rr = -1  # position in `submitted` of the job served last (round robin)
    events: list[tuple[float, int, str, tuple]] = []
    seq = 0

    def push(t: float, kind: str, data: tuple) -> None:
        nonlocal seq
        heapq.heappush(events, (t, seq, kind, data))
        seq += 1

    def next_job() -> int | None:
        nonlocal last_rr
        live = [k for k, j in enumerate(submitted) if pending[j]]
        if not live:
            return None
        if order == "fifo":
            return submitted[live[0]]
        k = next((k for k in live if k > last_rr), live[0])
        last_rr = k
        return submitted[k]

    for j in by_submit:
        push(jobs[j].submit_at, "submit", (j,))
    while events:
        now = events[0][0]
        while events and events[0][0] <= now + 1e-12:
            _, _, kind, data = heapq.heappop(events)
            if kind == "submit":
                submitted.append(data[0])
            elif kind == "stage1":
                gpu, j, positions = data
                gpu_free[gpu] = True
                job_end[j] = max(job_end[j], now)
                for pos in positions:
                    slot = pos // jobs[j].slot_size
                    if slot < n_full[j]:
                        missing[j][slot] -= 1
                        if missing[j][slot] == 0:
                            ready2.append((j, slot))
            else:  # stage2
                server, j = data
                in_flight[server] -= 1
                if in_flight[server] == 0:
                    busy2 += now - busy_since[server]
                job_end[j] = max(job_end[j], now)
        for gpu in range(gpus):
            if not gpu_free[gpu] or (j := next_job()) is None:
                continue
            positions = tuple(pending[j].popleft() for _ in range(min(stage1_batch, len(pending[j]))))
            cost = fixed + per_clip * len(positions)
            gpu_free[gpu], busy1, calls = False, busy1 + cost, calls + 1
            push(now + cost, "stage1", (gpu, j, positions))
        while ready2:
            free = [s for s in range(len(servers)) if in_flight[s] < servers[s]]
            if not free:
                break
            server = min(free, key=lambda s: (in_flight[s], s))
            j, _slot = ready2.popleft()
            if in_flight[server] == 0:
                busy_since[server] = now
            in_flight[server] += 1
            duration = latency * (1 + growth * (in_flight[server] - 1))
            request_s, requests = request_s + duration, requests + 1
            push(now + duration, "stage2", (server, j))
    start = min((job.submit_at for job in jobs), default=0.0)
    return SimResult(
        makespan=max(job_end, default=start) - start,
        job_makespans=[end - job.submit_at for end, job in zip(job_end, jobs)],
        stage1_busy_s=busy1, stage2_busy_s=busy2, stage2_request_s=request_s,
        n_stage1_calls=calls, n_stage2_requests=requests,
    )


def stage2_utilisation(result: SimResult, n_servers: int) -> float:
    """Fraction of server-time with at least one request in flight, over the makespan."""
    if result.makespan <= 0 or n_servers < 1:
        return 0.0
    return result.stage2_busy_s / (n_servers * result.makespan)


# The seed article's workload and costs (issue 3): 419 frames, stride 10 -> 41 keyframes.
SEED_KEYFRAMES = 41
SEED_PER_CLIP_S = 0.163
SEED_LATENCY_S = 2.07
SEED_GROWTH = 0.10


def issue3_bounds(scale: float = 1.0, *, n_keyframes: int = SEED_KEYFRAMES,
                  per_clip_s: float = SEED_PER_CLIP_S, latency_s: float = SEED_LATENCY_S,
                  growth: float = SEED_GROWTH, stage1_batch: int = 1) -> dict[str, SimResult]:
    """The bound of each variant of issue 3 (one simulated Stage 1 GPU in all of them)."""
    one, four = [JobShape(n_keyframes)], [JobShape(n_keyframes)] * 4
    shapes = {"seed_baseline": (one, [1]), "seed_optimized": (one, [2]), "zroact_1x3": (one, [3]),
              "zroact_2x3": (one, [3, 3]), "zroact_4jobs": (four, [3])}
    return {name: simulate(js, per_clip_s=per_clip_s, latency_s=latency_s, growth=growth,
                           servers=srv, stage1_batch=stage1_batch, scale=scale)
            for name, (js, srv) in shapes.items()}
