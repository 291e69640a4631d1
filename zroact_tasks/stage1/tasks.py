"""Stage 1 tasks (queue ``stage1``): thin; the work is in detect.py."""

from __future__ import annotations

import logging
import threading
import time

from celery.signals import worker_process_init

from .. import pipeline, resources
from ..app import app
from ..config import get_settings
from ..errors import ZroactError
from .batcher import DynamicBatcher
from .detect import detect_keyframes
from .detector import Detector, load_detector

log = logging.getLogger(__name__)


_lock = threading.Lock()
_detector: Detector | None = None
_batcher: DynamicBatcher | None = None


def detector() -> Detector:
    """One session per worker process, created in the child after the fork, never the parent
    (and once per process in the thread pool that batching mode uses)."""
    global _detector
    with _lock:
        if _detector is None:
            _detector = load_detector(get_settings())
        return _detector


def infer_function():
    """The detector's own inference, or the process's batcher when batching is on."""
    global _batcher
    settings = get_settings()
    if settings.stage1_max_batch <= 1:
        return detector().infer
    det = detector()
    with _lock:
        if _batcher is None:
            _batcher = DynamicBatcher(det.infer, settings.stage1_max_batch,
                                      settings.stage1_batch_timeout_ms / 1000.0)
        return _batcher.infer


@worker_process_init.connect
def _preload(**_: object) -> None:
    if get_settings().preload_detector:
        try:
            detector()
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
        results = detect_keyframes(detector(), resources.frames(), job_id, keyframes, params,
                                   infer_function())
    except ZroactError as exc:
        log.warning("job %s keyframes %s: %s", job_id, keyframes, exc)
        now = time.time()
        results = [{"keyframe": kf, "error": str(exc), "t0": now, "t1": now} for kf in keyframes]
    jobs.record_keyframes(job_id, results)
    return results
