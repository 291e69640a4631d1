"""A simulated Stage 1 GPU, plugged in through zroact's real detector interface (tests, bench).

Select it like any other runtime; its parameters travel as ``ZROACT_DETECTOR_OPTIONS`` (JSON)::

    ZROACT_DETECTOR=zroact_tasks.testing.simgpu:SimulatedGPUDetector
    ZROACT_DETECTOR_OPTIONS='{"gpu_lock": "/tmp/gpu0.lock", "per_clip_s": 0.163}'

Each ``infer(clips)`` call runs the real ONNX model (:class:`OnnxDetector` on the configured
``ZROACT_MODEL``) and then sleeps the rest of a simulated cost ``fixed_s + per_clip_s * n``
(``n`` = clips in the call), all while holding an inter-process file lock that stands for the
GPU: any number of processes (and threads) sharing one lock file never overlap, as kernels on
one GPU would not. The lock is not fair (flock), which a GPU is not either.

Options: ``gpu_lock`` (required; one lock file = one GPU), ``per_clip_s`` (0.163, the seed's
figure), ``fixed_s`` (0), ``lock_poll_s`` (0.001: ``filelock`` waits by polling a non-blocking
``flock``, and its own 50 ms default would add up to 50 ms of idle "GPU" at every hand-over),
``log_file`` (optional JSONL file; one line per call: ``{"t_lock_acquired", "t_end", "n", "t_called",
"infer_s", "pid"}``, ``time.time()`` seconds, so GPU utilisation can be measured).
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
from filelock import FileLock

from zroact_tasks.config import Settings
from zroact_tasks.stage1.detector import OnnxDetector

log = logging.getLogger(__name__)


class SimulatedGPUDetector:
    """A real :class:`OnnxDetector` whose calls cost ``fixed_s + per_clip_s * n`` on a locked GPU."""

    def __init__(self, settings: Settings, *, gpu_lock: str, per_clip_s: float = 0.163,
                 fixed_s: float = 0.0, lock_poll_s: float = 0.001, log_file: str | None = None) -> None:
        self.per_clip_s, self.fixed_s = float(per_clip_s), float(fixed_s)
        self.lock_path = gpu_lock
        self.log_path = log_file
        self._inner = OnnxDetector(settings.model, settings.labels)
        self.input_height = self._inner.input_height
        self.input_width = self._inner.input_width
        self.clip_length = self._inner.clip_length
        self.num_classes = self._inner.num_classes
        self.max_batch = self._inner.max_batch
        self.labels = self._inner.labels
        self.providers = self._inner.providers
        # One instance per process; thread_local keeps threads of one process contending too.
        self._lock = FileLock(gpu_lock, poll_interval=lock_poll_s)
        self.overruns = 0
        log.info("simulated GPU %s: %.3f s + %.3f s/clip", gpu_lock, self.fixed_s, self.per_clip_s)

    def cost(self, n: int) -> float:
        """Simulated seconds of one call with ``n`` clips."""
        return self.fixed_s + self.per_clip_s * n

    def infer(self, clips: np.ndarray) -> np.ndarray:
        n = int(clips.shape[0])
        cost = self.cost(n)
        t_called = time.time()
        with self._lock:
            t_acquired = time.time()
            start = time.perf_counter()
            output = self._inner.infer(clips)
            infer_s = time.perf_counter() - start
            remaining = cost - infer_s
            if remaining > 0:
                time.sleep(remaining)
            t_end = time.time()
        if infer_s > cost:
            self.overruns += 1
            if self.overruns == 1 or self.overruns % 100 == 0:
                log.warning("simulated GPU: real inference of %d clip(s) took %.3f s, more than the "
                            "simulated %.3f s (%d overrun(s) so far); the simulation is too fast "
                            "for this model/CPU", n, infer_s, cost, self.overruns)
        if self.log_path:
            self._record({"t_lock_acquired": t_acquired, "t_end": t_end, "n": n,
                          "t_called": t_called, "infer_s": infer_s, "pid": os.getpid()})
        return output

    def _record(self, entry: dict) -> None:
        # One write() on an O_APPEND descriptor: lines from several processes never interleave.
        line = (json.dumps(entry) + "\n").encode()
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def read_log(path: str | os.PathLike) -> list[dict]:
    """The calls recorded in a ``log_file``, in order of lock acquisition."""
    with open(path, encoding="utf-8") as f:
        entries = [json.loads(line) for line in f if line.strip()]
    return sorted(entries, key=lambda e: e["t_lock_acquired"])


def busy_seconds(entries: list[dict]) -> float:
    """Total time the simulated GPU was held (the union of the logged intervals)."""
    total, end = 0.0, float("-inf")
    for e in sorted(entries, key=lambda e: e["t_lock_acquired"]):
        start, stop = max(e["t_lock_acquired"], end), e["t_end"]
        if stop > start:
            total += stop - start
        end = max(end, stop)
    return total
