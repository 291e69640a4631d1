"""A Stage 1 detector that kills its own process on every call (tests of poison tasks)."""

from __future__ import annotations

import os
import signal

import numpy as np

from ..config import Settings


class CrashingDetector:
    """Stands for a runtime that segfaults on some input: ``infer`` SIGKILLs its process."""

    input_height = input_width = 224
    clip_length = 16
    num_classes = 3
    max_batch = None
    labels = None

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def infer(self, clips: np.ndarray) -> np.ndarray:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")
