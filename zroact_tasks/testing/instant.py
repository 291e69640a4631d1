"""An instant Stage 1 detector (benchmarks of ingest): a fixed output of the model's shape.

``ZROACT_DETECTOR=zroact_tasks.testing.instant:InstantDetector`` with
``ZROACT_DETECTOR_OPTIONS='{"size": 224, "classes": 3, "anchors": 1029}'`` (``size``: a square's
side or ``[width, height]``: the input size Stage 1 workers publish, so the size frames are
stored at; ``per_clip_s``: a sleep per clip, for a Stage 1 slower than ingest without running
a model). Clips are still read
from the frame store and preprocessed by the real Stage 1 task; only inference is skipped, so
what limits a run is ingest, not the model.
"""

from __future__ import annotations

import time

import numpy as np

from zroact_tasks.config import Settings


class InstantDetector:
    def __init__(self, settings: Settings, *, size: int | list[int] = 224, classes: int = 3,
                 anchors: int = 1029, per_clip_s: float = 0.0) -> None:
        self.input_width, self.input_height = (size, size) if isinstance(size, int) else size
        self.clip_length = settings.clip_length
        self.num_classes = classes
        self.max_batch = None
        self.labels = None
        self.providers = ["none"]
        self._one = np.zeros((1, 4 + classes, anchors), np.float32)  # every score 0: no boxes
        self.per_clip_s = float(per_clip_s)

    def infer(self, clips: np.ndarray) -> np.ndarray:
        if self.per_clip_s:
            time.sleep(self.per_clip_s * clips.shape[0])
        return np.repeat(self._one, clips.shape[0], axis=0)
