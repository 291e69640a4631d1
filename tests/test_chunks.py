"""Long footage: chunked ingest is frame-exact, frames are freed as slots end, the frames a job
holds do not grow with its length, and several control workers decode one video."""

from __future__ import annotations

import shutil
import subprocess
import threading

import cv2
import numpy as np
import pytest
import redis

from zroact_tasks import pipeline
from zroact_tasks.config import Settings
from zroact_tasks.control.ingest import ingest_whole, plan, stage1_frame
from zroact_tasks.media import clips, video
from zroact_tasks.media.store import FrameStore, frames_key
from zroact_tasks.testing.sample_media import make_video

from .conftest import start_cluster
from .helpers import skip_unless_ci
from .test_ingest import spec_for


# --- index arithmetic -----------------------------------------------------------------------
@pytest.mark.parametrize("stride,length,rate,size", [(10, 16, 1, 3), (4, 16, 2, 2), (30, 8, 1, 1),
                                                     (1, 16, 1, 5)])
def test_slots_using_is_every_slot_whose_clips_read_the_frame(stride, length, rate, size):
    keyframes = clips.keyframe_indices(400, stride)
    users: dict[int, set[int]] = {}
    for position, key in enumerate(keyframes):
        for frame in clips.clip_frames(key, length, rate):
            users.setdefault(frame, set()).add(position // size)
    for frame, slots in users.items():
        lo, hi = clips.slots_using(frame, size, stride, length, rate)
        assert lo <= min(slots) and max(slots) <= hi, (frame, slots, lo, hi)
        if rate == 1 and frame < 300:  # exact when every frame of the span is read (and exists)
            assert (lo, hi) == (min(slots), max(slots)), (frame, slots)


def test_a_chunk_decodes_exactly_the_frames_its_slots_read():
    for first_slot in (0, 1, 7):
        first, last = clips.chunk_frames(first_slot, 4, 3, 10, 16, 1)
        keys = [k for j in range(first_slot, first_slot + 4) for k in clips.slot_keyframes(j, 3, 10)]
        read = {f for k in keys for f in clips.clip_frames(k)}
        assert (first, last) == (min(read), max(read))


# --- seeking ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bframes(tmp_path_factory):
    """An H.264 file with B-frames (libx264 -bf 3, a GOP of 48), 600 frames that all differ."""
    if shutil.which("ffmpeg") is None:
        skip_unless_ci("Debian's ffmpeg is not installed (.ci/run installs it)")
    path = tmp_path_factory.mktemp("h264") / "bframes.mp4"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc=size=320x240:rate=30", "-t", "20", "-c:v", "libx264", "-bf", "3",
                    "-g", "48", "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def sequential(path) -> list[np.ndarray]:
    cap, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = cap.read()
        if not ok:
            return frames
        frames.append(frame)


def test_b_frame_stream_has_b_frames(bframes):
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v", "-show_entries",
                          "frame=pict_type", "-of", "csv=p=0", str(bframes)],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out.count("B") > 100, out[:20]  # else the test below would not test seeking past them


@pytest.mark.parametrize("first", [1, 17, 47, 48, 49, 100, 237, 311, 555, 590])
def test_seeking_is_frame_exact_on_b_frames(bframes, first):
    reference = sequential(bframes)
    got = list(video.decode_span(bframes, first, first + 20, seek=True, max_frames=10**6))
    assert [i for i, _ in got] == list(range(first, min(first + 21, len(reference))))
    for index, frame in got:
        assert np.array_equal(frame, reference[index]), index


def test_chunked_ingest_stores_what_a_sequential_decode_gives(bframes, redis_server):
    """Every stored frame, Stage 1 copy and keyframe, byte for byte as a sequential decode of the
    file would encode it (chunks start mid-GOP and seek)."""
    r = redis.Redis.from_url(redis_server.url)
    store, settings = FrameStore(r, ttl_s=600), Settings(ingest_chunk_slots=2)
    spec = spec_for(bframes, "chunks-exact")
    result = ingest_whole(spec, settings, store, lambda j, kfs: None)
    assert result.plan.seekable and result.frames == 600 and len(result.keyframes) == 60
    reference = sequential(bframes)
    stored = r.hgetall(frames_key(spec.job_id))
    assert len(stored) == 600 + 60
    for field, data in stored.items():
        name = field.decode()
        index = int(name.removeprefix("s1:"))
        frame = reference[index]
        expected = (stage1_frame(frame, (224, 224)) if name.startswith("s1:")
                    else video.encode_jpeg(frame, settings.frame_jpeg_quality))
        assert data == expected, name
    r.delete(frames_key(spec.job_id))


def test_a_file_without_a_frame_count_is_decoded_without_seeking(tmp_path, redis_server):
    path = tmp_path / "raw.mjpeg"
    frames = [make_frame(i) for i in range(95)]
    path.write_bytes(b"".join(video.encode_jpeg(f, 90) for f in frames))
    settings = Settings(ingest_chunk_slots=1)
    assert plan(spec_for(path), settings, (224, 224)).seekable is False
    got = list(video.decode_span(path, 40, 50, seek=False, max_frames=10**6))
    assert [i for i, _ in got] == list(range(40, 51))
    store = FrameStore(redis.Redis.from_url(redis_server.url), ttl_s=600)
    result = ingest_whole(spec_for(path, "chunks-raw"), settings, store, lambda j, kfs: None)
    assert (result.frames, len(result.keyframes), result.warnings) == (95, 9, [])
    store.delete("chunks-raw")


def make_frame(i: int) -> np.ndarray:
    frame = np.zeros((48, 64, 3), np.uint8)
    frame[:, i % 64] = 255
    return frame


# --- on a cluster ---------------------------------------------------------------------------
# {bytes of every frame, full-resolution keyframes (fields without the Stage 1 prefix)}
_HELD = """
local total, keyframes = 0, 0
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  total = total + redis.call('HSTRLEN', KEYS[1], field)
  if string.sub(field, 1, 3) ~= 's1:' then keyframes = keyframes + 1 end
end
return {total, keyframes}
"""


class PeakWatcher:
    """Samples the bytes a job's frame hash really holds (summed by Redis, apart from the
    code's own counters) and its full-resolution keyframes, every 20 ms."""

    def __init__(self, r: redis.Redis) -> None:
        self.r, self.held = r, r.register_script(_HELD)
        self.peak, self.peak_keyframes, self.job_id = 0, 0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            if self.job_id:
                total, keyframes = self.held(keys=[frames_key(self.job_id)])
                self.peak = max(self.peak, int(total))
                self.peak_keyframes = max(self.peak_keyframes, int(keyframes))

    def __enter__(self) -> PeakWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def run_long(url: str, env: dict, tmp_path, video_path, budget: int,
             watcher_out: list | None = None) -> tuple[object, int]:
    r = redis.Redis.from_url(url)
    r.flushdb()
    cluster, client = start_cluster(url, {**env, "ZROACT_FRAME_BUDGET_BYTES": str(budget)},
                                    tmp_path)
    try:
        with PeakWatcher(r) as watcher:
            job = client.submit(video_path)
            watcher.job_id = job.id
            report = job.wait(timeout=600)
        assert not r.exists(frames_key(job.id))  # the report deleted what was left
        if watcher_out is not None:
            watcher_out.append(watcher)
        return report, watcher.peak
    finally:
        cluster.stop()
        client.close()


def test_frames_held_do_not_grow_with_the_video(redis_server, standin, assets, tmp_path):
    """A 20-minute video holds at its peak no more than 1.2x the frames a 2-minute one does, and
    completes under a frame budget of 1.5x that 2-minute peak (small frames keep it fast).
    Stage 1 (10 ms a clip) is slower than ingest, so decoding always runs as far ahead as the
    lead lets it: the peak is the lead's, reached early by both, not a rare moment of the
    longer run."""
    short = make_video(tmp_path / "2min.mp4", frames=2 * 60 * 10, fps=10, width=96, height=72,
                       side=16)
    long = make_video(tmp_path / "20min.mp4", frames=20 * 60 * 10, fps=10, width=96, height=72,
                      side=16)
    url = redis_server.url.rsplit("/", 1)[0] + "/9"
    env = {"ZROACT_MODEL": str(assets["model"]), "ZROACT_VLM_URL": standin.url,
           "ZROACT_DETECTOR_OPTIONS": '{"size": [96, 72], "per_clip_s": 0.01}',  # 96x72 frames
           "ZROACT_DETECTOR": "zroact_tasks.testing.instant:InstantDetector"}
    report2, peak2 = run_long(url, env, tmp_path / "a", short, 2 * 1024**3)
    report20, peak20 = run_long(url, env, tmp_path / "b", long, int(1.5 * peak2))
    for report, keyframes in ((report2, 120), (report20, 1200)):
        assert report.status == "succeeded", (report.status, report.error)
        assert len(report.keyframes) == keyframes and all(s.verdict for s in report.slots)
    assert 0 < peak20 <= 1.2 * peak2, (peak2, peak20)
    sizes = plan(spec_for(long), Settings(), (96, 72))  # bytes of one stored frame
    whole = 12_000 * sizes.stage1_bytes + 1_200 * sizes.full_bytes  # if nothing were freed
    assert peak20 < whole / 10, (peak20, whole)
    print(f"peak frame bytes: 2 min {peak2} B, 20 min {peak20} B ({peak20 / peak2:.2f}x)")


def test_two_control_workers_decode_one_video_alike(cluster, client, assets, tmp_path):
    """Chunks of one seekable video spread over two control workers: the same detections as
    one worker's run."""
    path = make_video(tmp_path / "one-minute.mp4", frames=1800, fps=30)
    local, settings = cluster
    one = client.submit(path).wait(timeout=300)
    extra = local.add_worker("control")
    try:
        local.wait_ready(client.app, workers=[extra])
        job = client.submit(path)
        two = job.wait(timeout=300)
        chunks = int(client.jobs.meta(job.id)["chunk_next"])
        workers = {client.app.AsyncResult(pipeline.ingest_id(job.id, c)).worker
                   for c in range(chunks)}
    finally:
        local.remove_worker(extra)
    assert one.status == two.status == "succeeded"
    assert len(one.keyframes) == 180 and sum(bool(k.detections) for k in one.keyframes) > 150
    assert [k.model_dump() for k in one.keyframes] == [k.model_dump() for k in two.keyframes]
    assert len(workers - {None}) == 2, workers


def test_keyframes_waiting_for_a_slow_vlm_stay_bounded(redis_server, standin, assets, tmp_path):
    """Stage 1 (instant) outruns a VLM answering in 0.3 s: ingest waits for verdicts, so the
    full-resolution keyframes held stay within the lead's bound (twice INGEST_LEAD_CHUNKS chunks'
    worth of slots), not the video's 240."""
    video = make_video(tmp_path / "4min.mp4", frames=4 * 60 * 10, fps=10, width=96, height=72,
                       side=16)
    url = redis_server.url.rsplit("/", 1)[0] + "/9"
    env = {"ZROACT_MODEL": str(assets["model"]), "ZROACT_VLM_URL": standin.url,
           "ZROACT_DETECTOR_OPTIONS": '{"size": [96, 72]}',
           "ZROACT_DETECTOR": "zroact_tasks.testing.instant:InstantDetector"}
    settings, watchers = Settings(), []
    standin.latency_s = 0.3
    try:
        report, _ = run_long(url, env, tmp_path / "logs", video, 2 * 1024**3, watchers)
    finally:
        standin.latency_s = 0.0
    assert report.status == "succeeded", (report.status, report.error)
    assert len(report.slots) == 80 and all(s.verdict for s in report.slots)
    bound = 2 * settings.ingest_lead_chunks * settings.ingest_chunk_slots * 3  # 48 keyframes
    # More than the window's slots waited for Stage 2 (the backlog formed), and no more than
    # the bound (without it: most of the video's 240 keyframes).
    assert settings.job_window_slots * 3 < watchers[0].peak_keyframes <= bound, watchers[0].peak_keyframes
