"""The inference thread of a Stage 1 process, and cross-task dynamic batching.

A pipelined Stage 1 worker (the default, stage1/tasks.py) runs a thread pool: each task thread
fetches, decodes and preprocesses its own clips, hands them to the one :class:`DynamicBatcher`
of the process -- its one inference thread, the only caller of the session -- and post-processes
and records the rows it gets back, off the inference path. The batcher runs a call as soon as
``max_batch`` clips wait or ``timeout_s`` after the oldest arrived, whichever comes first
(``max_batch`` 1: at once, one clip a call), the most urgent clips first (the message's
priority, then arrival), and hands every task its own rows back. Tasks stay one message each:
acked late, redelivered if the worker dies with clips still buffered, and each result goes to its
own chord.

celery-batches would buffer messages in the consumer instead, but it requires Celery < 5.7.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


_order = itertools.count()


def arrival() -> int:
    """A place in the inference thread's order, taken when a task starts (before preparing)."""
    return next(_order)


@dataclass(order=True)
class _Pending:
    priority: int
    seq: int
    clips: np.ndarray = field(compare=False)
    arrived: float = field(default_factory=time.monotonic, compare=False)
    result: Future = field(default_factory=Future, compare=False)


class DynamicBatcher:
    """Batches ``infer`` calls from many threads: at most ``max_batch`` clips, at most
    ``timeout_s`` of waiting for the oldest clip."""

    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], max_batch: int,
                 timeout_s: float) -> None:
        self._infer, self.max_batch, self.timeout_s = infer, max_batch, timeout_s
        self._queue: queue.PriorityQueue[_Pending] = queue.PriorityQueue()
        self.calls: list[int] = []  # clips per inference call, for tests and stats
        self._thread = threading.Thread(target=self._run, name="stage1-batcher", daemon=True)
        self._thread.start()

    def infer(self, clips: np.ndarray, priority: int = 0, order: int | None = None) -> np.ndarray:
        """Inference on ``clips`` ([n, 3, T, H, W]); blocks until its batch has run. Waiting
        clips go by ``priority`` (0 = most urgent), then by ``order`` (a task passes
        :func:`arrival`, taken when its message started, so clips prepared out of order still
        run in the order they were delivered: a slot's clips finish together), else arrival."""
        pending = _Pending(int(priority), next(_order) if order is None else order, clips)
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
                clips = batch[0].clips if len(batch) == 1 else np.concatenate([p.clips for p in batch])
                output = self._infer(clips)  # (one task's clips: no copy on the inference path)
            except BaseException as exc:  # every waiting task gets the error, the thread lives on
                log.exception("batched inference of %d requests failed", len(batch))
                for p in batch:
                    p.result.set_exception(exc)
                continue
            if len(self.calls) < 100_000:
                self.calls.append(len(output))
            start = 0
            for p in batch:
                p.result.set_result(output[start : start + len(p.clips)])
                start += len(p.clips)
