"""Ingest on real Redis: what gets stored and sent, and every kind of bad video."""

from __future__ import annotations

import os
import time

import cv2
import numpy as np
import pytest
import redis

from zroact_tasks.config import Settings
from zroact_tasks.control.ingest import ingest_whole as ingest
from zroact_tasks.errors import (
    MediaRootError,
    VideoDecodeError,
    VideoLimitError,
    VideoNotFoundError,
    VideoTooShortError,
)
from zroact_tasks.media import clips
from zroact_tasks.media.store import FrameStore, frames_key
from zroact_tasks.media.video import decode_image
from zroact_tasks.models import JobSpec
from zroact_tasks.testing.sample_media import make_bad_videos


def spec_for(video, job_id="job") -> JobSpec:
    return JobSpec(job_id=job_id, video=str(video), prompt="p", keyframe_stride=10, sampling_rate=1,
                   clip_length=16, slot_size=3, score_threshold=0.3, nms_iou=0.5,
                   max_detections=300, submitted_at=time.time())


@pytest.fixture
def store(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield FrameStore(client, ttl_s=600)
    for key in client.scan_iter("zroact:job:ingest-*"):
        client.delete(key)


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return make_bad_videos(tmp_path_factory.mktemp("bad"))


def run(video, store, settings=None, job_id="ingest-t"):
    sent = []
    result = ingest(spec_for(video, job_id), settings or Settings(), store,
                    lambda j, kfs: sent.append((j, kfs)))
    return result, sent


def test_slots_leave_with_their_frames_stored(assets, store, redis_server):
    r = redis.Redis.from_url(redis_server.url)
    seen_stored = []
    spec = spec_for(assets["video"], "ingest-ok")

    def send(j, kfs):  # each slot is sent only once every frame of its clips is in the store
        fields = {f.decode() for f in r.hkeys(frames_key(spec.job_id))}
        seen_stored.append(all({f"s1:{i}" for i in clips.clip_frames(k)} <= fields
                               and str(k) in fields for k in kfs))

    result = ingest(spec, Settings(), store, send)
    assert len(seen_stored) == 14 and all(seen_stored)
    assert result.keyframes == clips.keyframe_indices(419, 10)
    assert result.slots[0] == [9, 19, 29] and result.slots[-1] == [399, 409]
    stored = {f.decode() for f in r.hkeys(frames_key(spec.job_id))}
    # Stage 1 copies of every frame a clip uses; full-resolution copies of the keyframes only.
    assert stored == ({f"s1:{f}" for f in range(419) if clips.is_needed(f, 10)}
                      | {str(k) for k in result.keyframes})
    small = decode_image(r.hget(frames_key(spec.job_id), "s1:9"))  # raw + zstd: lossless
    full = cv2.imdecode(np.frombuffer(r.hget(frames_key(spec.job_id), "9"), np.uint8), 1)  # JPEG
    assert small.shape == (224, 224, 3) and full.shape == (240, 320, 3)
    assert 0 < r.ttl(frames_key(spec.job_id)) <= 600
    assert result.warnings == []


def test_partial_decode_runs_on_what_decoded_with_a_warning(bad, store):
    result, sent = run(bad["partial"], store)
    assert result.warnings == [f"decoded {result.frames} of 100 frames"]
    assert 10 <= result.frames < 100
    assert len(result.keyframes) == result.frames // 10


@pytest.mark.parametrize("kind,error,reason", [
    ("empty", VideoDecodeError, "the file is empty"),
    ("text", VideoDecodeError, "OpenCV cannot open it"),
    ("truncated", VideoDecodeError, "OpenCV cannot open it"),
    ("no_frames", VideoDecodeError, "no frame could be decoded"),
    ("short", VideoTooShortError, "5 frames is shorter than one keyframe stride (10)"),
])
def test_bad_videos_raise_named_errors_and_send_nothing(bad, store, kind, error, reason):
    sent = []
    with pytest.raises(error) as err:
        ingest(spec_for(bad[kind], "ingest-bad"), Settings(), store, lambda j, k: sent.append(j))
    assert str(bad[kind]) in str(err.value) and reason in str(err.value)
    assert sent == []


def test_missing_path_and_directory(tmp_path, store):
    with pytest.raises(VideoNotFoundError, match="no such file"):
        run(tmp_path / "absent.mp4", store)
    with pytest.raises(VideoNotFoundError, match="not a regular file"):
        run(tmp_path, store)


@pytest.mark.parametrize("limit,match", [
    ({"max_pixels": 320 * 240 - 1}, "320x240 is over MAX_PIXELS"),
    ({"max_frames": 400}, "419 frames is over MAX_FRAMES 400"),
    ({"max_duration_s": 10}, "is over MAX_DURATION_S 10"),
])
def test_limits(assets, store, limit, match):
    with pytest.raises(VideoLimitError, match=match):
        run(assets["video"], store, Settings(**limit))


def test_media_root_rejects_escapes(assets, tmp_path, store):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    inside = root / "sub" / "v.mp4"
    inside.write_bytes(assets["short_video"].read_bytes())
    os.symlink(assets["short_video"], root / "link.mp4")  # points outside the root
    settings = Settings(media_root=root)
    assert run("sub/v.mp4", store, settings)[0].frames == 47
    assert run(inside, store, settings)[0].frames == 47
    for path in ("../outside.mp4", "sub/../../outside.mp4", "link.mp4", str(assets["short_video"])):
        with pytest.raises(MediaRootError, match="resolves outside MEDIA_ROOT"):
            run(path, store, settings)


def test_stage1_copies_are_lossless_and_a_corrupt_one_is_a_decode_error():
    from zroact_tasks.errors import VideoDecodeError
    from zroact_tasks.media.video import encode_lossless

    frame = np.random.default_rng(7).integers(0, 256, (224, 224, 3), np.uint8)
    data = encode_lossless(frame)
    assert np.array_equal(decode_image(data), frame)  # bit-exact, shape from the header
    with pytest.raises(VideoDecodeError, match="does not decompress"):
        decode_image(data[:8] + b"not zstd at all")
