"""Stage 1 tasks (queue ``stage1``): thin; the work is in detect.py.

A Stage 1 worker is pipelined by default (``STAGE1_PIPELINE_DEPTH`` > 0): one process per GPU,
one session, a thread pool of ``depth`` task threads, so ``depth`` messages are reserved at once
(prefetch multiplier 1 x threads), and one inference thread (batcher.DynamicBatcher), the only
caller of the session. While clip n is inferred, the threads of clips n+1.. fetch, decode and
build their tensors, and the thread of clip n-1 post-processes and records its result: the GPU
does not wait for the CPU. Each clip is still its own message, acked late: a worker killed with
clips prefetched, prepared or inferred gives every one of them back (visibility timeout), and
each result is recorded once (records are idempotent: a rerun replaces a result with itself).
``STAGE1_PIPELINE_DEPTH=0`` keeps the prefork pool of ``zroact worker stage1 -c N`` (one clip per
process at a time).
"""

from __future__ import annotations

import logging
import threading
import time

from celery.signals import worker_init, worker_process_init

from .. import pipeline, resources
from ..app import app
from ..config import get_settings
from ..errors import ZroactError
from .batcher import DynamicBatcher, arrival
from .detect import FrameCache, detect_keyframes
from .detector import Detector, load_detector

log = logging.getLogger(__name__)


_lock = threading.Lock()
_detector: Detector | None = None
_batcher: DynamicBatcher | None = None
_cache = FrameCache()
_pipelined = False
"""Set in a Stage 1 worker that runs the pipelined thread pool (``_choose_pool``)."""


def detector() -> Detector:
    """One session per worker process, created in the child after the fork, never the parent
    (and once per process in the thread pool of a pipelined worker)."""
    global _detector
    with _lock:
        if _detector is None:
            _detector = load_detector(get_settings())
        return _detector


def infer_function():
    """The detector's own inference (a prefork child: one clip at a time), or the process's
    inference thread (a pipelined worker, or batching on)."""
    global _batcher
    settings = get_settings()
    if settings.stage1_max_batch <= 1 and not _pipelined:
        return detector().infer
    det = detector()
    with _lock:
        if _batcher is None:
            _batcher = DynamicBatcher(det.infer, settings.stage1_max_batch,
                                      settings.stage1_batch_timeout_ms / 1000.0)
        return _batcher.infer


def pipeline_threads(settings, concurrency: int | None) -> int:
    """Task threads of a pipelined Stage 1 worker: the depth, at least the biggest batch (so a
    batch can fill) and at least ``-c``."""
    return max(settings.stage1_pipeline_depth, settings.stage1_max_batch, concurrency or 1)


def _pool_name(pool_cls: object) -> str:
    """``prefork``, ``threads``, ... of a pool given as an alias or as its class (the CLI's)."""
    if isinstance(pool_cls, str):
        return {"processes": "prefork", "thread": "threads"}.get(pool_cls, pool_cls)
    module = getattr(pool_cls, "__module__", "")
    return {"celery.concurrency.prefork": "prefork",
            "celery.concurrency.thread": "threads"}.get(module, module)


@worker_init.connect
def _choose_pool(sender=None, **_: object) -> None:
    """A worker consuming only ``stage1`` runs pipelined: threads, one session, one inference
    thread (before the pool exists: Celery reads ``pool_cls`` right after this signal)."""
    global _pipelined
    if sender is None or not hasattr(sender, "pool_cls"):
        return
    queues = set(sender.app.amqp.queues.consume_from or {})
    settings = get_settings()
    if queues != {"stage1"} or settings.stage1_pipeline_depth < 1:
        return
    if _pool_name(sender.pool_cls) in ("prefork", "threads"):  # not solo, eventlet, ...
        threads = pipeline_threads(settings, sender.concurrency)
        sender.pool_cls, sender.concurrency = "threads", threads
        _pipelined = True
        log.info("stage1 pipelined: one process, %d task threads (messages reserved at once), "
                 "one inference thread, batches of up to %d", threads, settings.stage1_max_batch)
        if settings.preload_detector:
            _preload()


@worker_process_init.connect
def _preload(**_: object) -> None:
    if get_settings().preload_detector:
        try:
            detector()
            if _pipelined:
                infer_function()  # the inference thread runs before the first clip arrives
        except ZroactError as exc:  # tasks will report it per clip; the child must not die
            log.error("stage1 model not loaded: %s", exc)


@app.task(name=pipeline.DETECT, bind=True)
def detect_clips(self, job_id: str, keyframes: list[int], params: dict) -> list[dict]:
    """Run Stage 1 on these keyframes' clips; domain errors come back as values per keyframe."""
    jobs = resources.jobs()
    if jobs.cancel_requested(job_id):
        return [{"keyframe": kf, "error": "cancelled"} for kf in keyframes]
    try:
        jobs.check_delivery(self.delivery_key, get_settings().max_task_deliveries)
        infer = infer_function()
        if _pipelined or get_settings().stage1_max_batch > 1:
            priority = (self.request.delivery_info or {}).get("priority") or 0
            batched, order = infer, arrival()

            def infer(clips, _p=priority, _o=order):  # the most urgent, then the first delivered
                return batched(clips, priority=_p, order=_o)
        results = detect_keyframes(detector(), resources.frames(), job_id, keyframes, params,
                                   infer, cache=_cache if _pipelined else None)
    except ZroactError as exc:
        log.warning("job %s keyframes %s: %s", job_id, keyframes, exc)
        now = time.time()
        results = [{"keyframe": kf, "error": str(exc), "t0": now, "t1": now} for kf in keyframes]
    jobs.record_keyframes(job_id, results)
    return results
