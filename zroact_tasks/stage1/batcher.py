"""Cross-task dynamic batching for Stage 1: clips of concurrent tasks share one inference call.

A Stage 1 worker in batching mode runs a thread pool (``-P threads -c STAGE1_MAX_BATCH``, so its
prefetch window is as large as the biggest batch). Each task thread preprocesses its own clips and
hands them to the one :class:`DynamicBatcher` of the process, which runs an inference call as soon
as ``max_batch`` clips wait or ``timeout_s`` after the oldest arrived, whichever comes first, and
hands every task its own rows back. Tasks stay one message each: acked late, redelivered if the
worker dies with clips still buffered, and each result goes to its own chord.

celery-batches would buffer messages in the consumer instead, but it requires Celery < 5.7.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    clips: np.ndarray
    arrived: float = field(default_factory=time.monotonic)
    result: Future = field(default_factory=Future)


class DynamicBatcher:
    """Batches ``infer`` calls from many threads: at most ``max_batch`` clips, at most
    ``timeout_s`` of waiting for the oldest clip."""

    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], max_batch: int,
                 timeout_s: float) -> None:
        self._infer, self.max_batch, self.timeout_s = infer, max_batch, timeout_s
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self.calls: list[int] = []  # clips per inference call, for tests and stats
        self._thread = threading.Thread(target=self._run, name="stage1-batcher", daemon=True)
        self._thread.start()

    def infer(self, clips: np.ndarray) -> np.ndarray:
        """Inference on ``clips`` ([n, 3, T, H, W]); blocks until its batch has run."""
        pending = _Pending(clips)
        self._queue.put(pending)
        return pending.result.result()

    def _collect(self) -> list[_Pending]:
        batch = [self._queue.get()]
        size = len(batch[0].clips)
        deadline = batch[0].arrived + self.timeout_s
        while size < self.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            batch.append(item)
            size += len(item.clips)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._collect()
            try:
                output = self._infer(np.concatenate([p.clips for p in batch]))
            except BaseException as exc:  # every waiting task gets the error, the thread lives on
                log.exception("batched inference of %d requests failed", len(batch))
                for p in batch:
                    p.result.set_exception(exc)
                continue
            self.calls.append(len(output))
            start = 0
            for p in batch:
                p.result.set_result(output[start : start + len(p.clips)])
                start += len(p.clips)
