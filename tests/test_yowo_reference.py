"""zroact's Stage 1 against a reference of YOWOv3's own pipeline, written from its repository's
facts (Hope1337/YOWOv3, ``cus_datasets/ucf/transforms.py``, ``load_data.py``, ``utils/box.py``):

- preprocessing: frames as RGB PIL images, ``resize`` with Pillow's default filter, ``to_tensor``
  (0..1), ImageNet mean/std; clip = 16 frames ``key - i*rate``, oldest first, clamped at 0;
- postprocessing: every (box, class) above the threshold, at most 30000 by score, NMS with boxes
  offset by ``class * 7680`` on the unclipped boxes, at most 300 kept.

The reference takes the frames zroact's decoder produces; zroact's side is the production path:
ingest (resize, store in a real Redis), then Stage 1's read, decode and clip tensor.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import redis
from PIL import Image

from zroact_tasks.config import Settings
from zroact_tasks.control.ingest import ingest_whole
from zroact_tasks.media import clips, video
from zroact_tasks.media.store import FrameStore
from zroact_tasks.models import JobSpec
from zroact_tasks.stage1.yowo import IMAGENET_MEAN, IMAGENET_STD, postprocess, preprocess_clip
from zroact_tasks.testing.sample_media import make_video

INPUT = (224, 224)


def reference_clip(frames_rgb: list[Image.Image], keyframe: int, length: int = 16,
                   rate: int = 1) -> np.ndarray:
    """YOWOv3's input for one keyframe, ``[3, T, H, W]`` on the 0..1 scale (before mean/std)."""
    indices = [max(0, keyframe - i * rate) for i in reversed(range(length))]
    planes = [np.asarray(frames_rgb[i].resize(INPUT), np.float32) / 255.0 for i in indices]
    return np.stack(planes).transpose(3, 0, 1, 2)  # [T, H, W, 3] -> [3, T, H, W]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(a[0], b[:, 0]), np.maximum(a[1], b[:, 1])
    x2, y2 = np.minimum(a[2], b[:, 2]), np.minimum(a[3], b[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda r: (r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def reference_nms(output: np.ndarray, conf: float, iou: float) -> list[tuple]:
    """YOWOv3's ``non_max_suppression`` for one clip: (x1, y1, x2, y2, score, class) in input
    pixels, unclipped, best first."""
    boxes, scores = output[:4].T, output[4:].T
    i, j = np.nonzero(scores > conf)
    cx, cy, w, h = boxes[i].T
    x = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, scores[i, j], j], 1)
    x = x[np.argsort(-x[:, 4], kind="stable")[:30000]]
    shifted = x[:, :4] + x[:, 5:6] * 7680
    keep, alive = [], np.ones(len(x), bool)
    for n in range(len(x)):  # greedy NMS, highest score first
        if alive[n]:
            keep.append(n)
            alive[n + 1:] &= _iou(shifted[n], shifted[n + 1:]) <= iou
    return [tuple(r) for r in x[keep[:300]]]


@pytest.mark.parametrize("size", [(320, 240), (640, 272), (1280, 720), (1920, 1080)])
def test_stage1_input_equals_yowov3s(redis_server, tmp_path, size):
    width, height = size
    path = make_video(tmp_path / f"{width}.mp4", frames=30, width=width, height=height,
                      side=height // 4)
    spec = JobSpec(job_id=f"ref-{width}", video=str(path), prompt="p", keyframe_stride=10,
                   sampling_rate=1, clip_length=16, slot_size=3, score_threshold=0.3,
                   nms_iou=0.5, max_detections=300, submitted_at=time.time())
    store = FrameStore(redis.Redis.from_url(redis_server.url), ttl_s=600)
    try:
        whole = ingest_whole(spec, Settings(redis_url=redis_server.url), store,
                             lambda j, kfs: None, INPUT)
        decoded = [f for _, f in video.decode(path, 1000)]
        rgb = [Image.fromarray(np.ascontiguousarray(f[..., ::-1])) for f in decoded]
        assert whole.keyframes == [9, 19, 29]
        for kf in whole.keyframes:
            indices = clips.clip_frames(kf, 16, 1)
            stored = store.get_many(spec.job_id, indices, kind="stage1")
            ours = preprocess_clip([video.decode_image(stored[i]) for i in indices], *INPUT[::-1])
            ours_01 = ours * IMAGENET_STD[:, None, None, None] + IMAGENET_MEAN[:, None, None, None]
            theirs = reference_clip(rgb, kf)
            assert np.abs(ours_01 - theirs).max() <= 1e-5  # equal, up to float32 rounding
            normalised = (theirs - IMAGENET_MEAN[:, None, None, None]) / IMAGENET_STD[:, None, None, None]
            assert np.abs(ours - normalised).max() <= 1e-4
    finally:
        store.delete(spec.job_id)


@pytest.mark.parametrize("seed", range(4))
def test_postprocess_keeps_yowov3s_set(seed):
    """A random head (as a randomly initialised YOWOv3 gives): many overlapping boxes, some out
    of the frame, 24 classes. Same kept set, boxes within 0.05 px, scores within 1e-4."""
    rng = np.random.default_rng(seed)
    anchors, classes = 1029, 24
    out = np.empty((4 + classes, anchors), np.float32)
    out[0:2] = rng.uniform(-20, 244, (2, anchors))
    out[2:4] = rng.uniform(4, 120, (2, anchors))
    out[4:] = rng.beta(0.4, 2.0, (classes, anchors))
    frame = (1280, 720)
    ours = postprocess(out, frame_size=frame, input_size=INPUT, score_threshold=0.3,
                       nms_iou=0.5, max_detections=300, labels=None)
    theirs = reference_nms(out, 0.3, 0.5)
    assert len(theirs) == len(ours) and len(ours) > 50
    sx, sy = frame[0] / INPUT[0], frame[1] / INPUT[1]
    for d, (x1, y1, x2, y2, score, cls) in zip(ours, theirs):
        assert d.class_id == int(cls) and abs(d.score - score) <= 1e-4
        expected = (np.clip(x1 * sx, 0, frame[0]), np.clip(y1 * sy, 0, frame[1]),
                    np.clip(x2 * sx, 0, frame[0]), np.clip(y2 * sy, 0, frame[1]))
        assert np.abs(np.array(d.box) - np.array(expected)).max() <= 0.05
