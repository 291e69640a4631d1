"""Stage 1 on a batch of keyframes: frames from the store -> clip tensors -> detections.

Three steps, so a pipelined worker (stage1/tasks.py) keeps only inference on its inference thread:
:func:`prepare_clips` (fetch, decode, tensor) and :func:`finish_clips` (post-processing) run on
the task's own thread.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from ..errors import FrameSizeError, ModelError
from ..media.clips import clip_frames
from ..media.store import FrameStore
from ..media.video import decode_image
from .detector import Detector
from .yowo import postprocess, preprocess_clip


class FrameCache:
    """Decoded Stage 1 frames of recent clips, shared by the threads of one process.

    Clips of neighbouring keyframes overlap (16-frame clips every 10 frames share 6 frames), and
    a pipelined worker prepares them side by side: a frame is fetched and decoded once, not once
    a clip. Frames are immutable once stored, so an entry is never stale; the least recently used
    go first past ``max_frames`` (150 KB each at 224x224)."""

    def __init__(self, max_frames: int = 128) -> None:
        self.max_frames = max_frames
        self._frames: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get_many(self, store: FrameStore, job_id: str, indices: list[int]) -> dict[int, np.ndarray]:
        out: dict[int, np.ndarray] = {}
        with self._lock:
            for i in indices:
                frame = self._frames.get((job_id, i))
                if frame is not None:
                    self._frames.move_to_end((job_id, i))
                    out[i] = frame
            self.hits += len(out)
        missing = [i for i in indices if i not in out]
        if missing:
            stored = store.get_many(job_id, missing, kind="stage1")  # lossless, at the model's size
            decoded = {i: decode_image(data) for i, data in stored.items()}
            out.update(decoded)
            with self._lock:
                self.misses += len(decoded)
                for i, frame in decoded.items():
                    self._frames[(job_id, i)] = frame
                while len(self._frames) > self.max_frames:
                    self._frames.popitem(last=False)
        return out


def prepare_clips(detector: Detector, store: FrameStore, job_id: str, keyframes: list[int],
                  params: dict, cache: FrameCache | None = None) -> np.ndarray:
    """The ``[B, 3, T, H, W]`` tensor of these keyframes' clips. One HMGET fetches the frames of
    all clips (only those ``cache`` lacks); a frame shared by overlapping clips is decoded once."""
    length, rate = params["clip_length"], params["sampling_rate"]
    if length != detector.clip_length:
        raise ModelError("clip_length", f"job uses {length}-frame clips, the model takes "
                                        f"{detector.clip_length}")
    clip_indices = {kf: clip_frames(kf, length, rate) for kf in keyframes}
    needed = sorted({i for idx in clip_indices.values() for i in idx})
    if cache is not None:
        frames = cache.get_many(store, job_id, needed)
    else:
        stored = store.get_many(job_id, needed, kind="stage1")  # lossless, resized at ingest
        frames = {i: decode_image(data) for i, data in stored.items()}
    shape = next(iter(frames.values())).shape
    if shape[:2] != (detector.input_height, detector.input_width):
        raise FrameSizeError(job_id, f"frames were stored at {shape[1]}x{shape[0]} for another "
                                     f"model; this worker's takes {detector.input_width}x"
                                     f"{detector.input_height} (one model per Stage 1 queue)")
    if len(keyframes) == 1:  # no stack copy of the tensor
        clip = preprocess_clip([frames[i] for i in clip_indices[keyframes[0]]],
                               detector.input_height, detector.input_width)
        return clip[np.newaxis]
    return np.stack([
        preprocess_clip([frames[i] for i in clip_indices[kf]], detector.input_height,
                        detector.input_width)
        for kf in keyframes
    ])


def finish_clips(detector: Detector, keyframes: list[int], params: dict, output: np.ndarray,
                 started: float, ended: float) -> list[dict]:
    """Each keyframe's detections from its row of the model's output."""
    results = []
    width, height = params["frame_size"]  # the original video's, for mapping boxes back
    for n, kf in enumerate(keyframes):
        detections = postprocess(
            output[n], frame_size=(width, height),
            input_size=(detector.input_width, detector.input_height),
            score_threshold=params["score_threshold"], nms_iou=params["nms_iou"],
            max_detections=params["max_detections"], labels=detector.labels,
        )
        results.append({"keyframe": kf, "detections": [d.model_dump(mode="json") for d in detections],
                        "t0": started, "t1": ended})
    return results


def detect_keyframes(detector: Detector, store: FrameStore, job_id: str, keyframes: list[int],
                     params: dict, infer: Callable[[np.ndarray], np.ndarray] | None = None,
                     cache: FrameCache | None = None) -> list[dict]:
    """Detections for each keyframe's clip; every clip of the batch in one inference call
    (``infer``: the detector's own, or the process's inference thread's, which may merge it with
    other tasks' clips)."""
    started = time.time()
    batch = prepare_clips(detector, store, job_id, keyframes, params, cache)
    output = (infer or detector.infer)(batch)
    return finish_clips(detector, keyframes, params, output, started, time.time())
