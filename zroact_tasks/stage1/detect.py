"""Stage 1 on a batch of keyframes: frames from the store -> clip tensors -> detections."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ..errors import FrameSizeError, ModelError
from ..media.clips import clip_frames
from ..media.store import FrameStore
from ..media.video import decode_image
from .detector import Detector
from .yowo import postprocess, preprocess_clip


def detect_keyframes(detector: Detector, store: FrameStore, job_id: str, keyframes: list[int],
                     params: dict, infer: Callable[[np.ndarray], np.ndarray] | None = None
                     ) -> list[dict]:
    """Detections for each keyframe's clip; every clip of the batch in one inference call
    (``infer``: the detector's own, or a DynamicBatcher's that also holds other tasks' clips).

    One HMGET fetches the frames of all clips; a frame shared by overlapping clips is decoded once.
    """
    started = time.time()
    length, rate = params["clip_length"], params["sampling_rate"]
    if length != detector.clip_length:
        raise ModelError("clip_length", f"job uses {length}-frame clips, the model takes "
                                        f"{detector.clip_length}")
    clip_indices = {kf: clip_frames(kf, length, rate) for kf in keyframes}
    needed = sorted({i for idx in clip_indices.values() for i in idx})
    stored = store.get_many(job_id, needed, kind="stage1")  # PNG, resized at ingest (yowo.model_frame)
    frames = {i: decode_image(data) for i, data in stored.items()}
    shape = next(iter(frames.values())).shape
    if shape[:2] != (detector.input_height, detector.input_width):
        raise FrameSizeError(job_id, f"frames were stored at {shape[1]}x{shape[0]} for another "
                                     f"model; this worker's takes {detector.input_width}x"
                                     f"{detector.input_height} (one model per Stage 1 queue)")
    batch = np.stack([
        preprocess_clip([frames[i] for i in clip_indices[kf]], detector.input_height,
                        detector.input_width)
        for kf in keyframes
    ])
    output = (infer or detector.infer)(batch)
    ended = time.time()
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
