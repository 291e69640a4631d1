"""Live sources as jobs: a camera served in real time, read until stopped; only allowed sources;
files never reach a network."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time

import pytest
import redis

from zroact_tasks.config import Settings
from zroact_tasks.errors import StreamNotAllowedError, VideoDecodeError
from zroact_tasks.media import streams, video
from zroact_tasks.media.store import USED
from zroact_tasks.testing.mjpeg_server import MjpegCamera
from zroact_tasks.testing.vllm_standin import VLLMStandIn

from .conftest import start_cluster

LATENCY_BOUND_S = 5.0
SOURCES = ["http://127.0.0.1:", "rtsp://127.0.0.1:"]
BACKLOG = 4
"""STREAM_BACKLOG_SLOTS of the live cluster: a VLM answering in 0.5 s never lets 4 slots pile up."""
KEEP = 20
"""STREAM_KEEP_SLOTS of the live cluster: the rolling window a 60 s stream (~60 slots) overflows."""


def test_only_allowed_sources_and_credentials_never_shown():
    allowed = ["rtsp://cams.local/", "http://127.0.0.1:8080/live/"]
    assert streams.check_allowed("rtsp://cams.local/door", allowed) == "rtsp://cams.local/door"
    for url in ("rtsp://cams.local.evil/door", "http://127.0.0.1:8080/other", "file:///etc/passwd"):
        with pytest.raises(StreamNotAllowedError):
            streams.check_allowed(url, allowed)
    with pytest.raises(StreamNotAllowedError, match="allowed: none"):
        streams.check_allowed("rtsp://user:secret@cams.local/door", [])
    with pytest.raises(StreamNotAllowedError) as info:
        streams.check_allowed("rtsp://user:secret@cams.local/door", ["rtsp://other/"])
    assert "secret" not in str(info.value) and "***@cams.local" in str(info.value)
    assert not streams.is_stream("uploads/x.mp4") and streams.is_stream("HTTPS://x/y.m3u8")


def test_a_source_outside_the_allowlist_is_exit_3_with_one_line(client):
    res = subprocess.run([sys.executable, "-m", "zroact_tasks.cli", "submit",
                          "rtsp://127.0.0.1:8554/cam", "--redis-url", client.settings.redis_url],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "ZROACT_STREAM_SOURCES": "rtsp://cams.local/"})
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 3 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "not under an allowed ZROACT_STREAM_SOURCES prefix" in lines[0]


def test_an_uploaded_playlist_that_names_a_url_makes_no_request(tmp_path):
    """A playlist on disk (an upload) naming an HTTP segment: the file is opened with FFmpeg's
    protocols limited to ``file``, so the URL is never fetched; the job's check fails instead."""
    fetched: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            fetched.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        playlist = tmp_path / "upload.m3u8"
        playlist.write_text("#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n"
                            f"http://127.0.0.1:{server.server_address[1]}/seg0.ts\n#EXT-X-ENDLIST\n")
        s = Settings()
        with pytest.raises(VideoDecodeError):
            video.probe(playlist, max_pixels=s.max_pixels, max_frames=s.max_frames,
                        max_duration_s=s.max_duration_s)
        assert list(video.decode(playlist, max_frames=10)) == []
        time.sleep(0.3)
        assert fetched == []
        assert os.environ["OPENCV_FFMPEG_CAPTURE_OPTIONS"] == video.FILE_CAPTURE_OPTIONS
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def live(redis_server, assets, tmp_path_factory):
    """A cluster of its own whose control workers may read the loopback camera, and a VLM
    stand-in answering in 0.5 s."""
    url = redis_server.url.rsplit("/", 1)[0] + "/9"
    redis.Redis.from_url(url).flushdb()
    with VLLMStandIn(model="Qwen/Qwen2.5-VL-3B-Instruct", latency_s=0.5) as vlm:
        env = {"ZROACT_MODEL": str(assets["model"]), "ZROACT_VLM_URL": vlm.url,
               "ZROACT_STREAM_SOURCES": ",".join(SOURCES), "ZROACT_STREAM_RECONNECT_S": "3",
               "ZROACT_STREAM_BACKLOG_SLOTS": str(BACKLOG), "ZROACT_STREAM_KEEP_SLOTS": str(KEEP)}
        cluster, _ = start_cluster(url, env, tmp_path_factory.mktemp("live-logs"))
        from zroact_tasks.client import Client

        client = Client(settings=Settings(redis_url=url, stream_sources=SOURCES))
        try:
            yield client, vlm, cluster
        finally:
            cluster.stop()
            client.close()


@pytest.mark.live
def test_a_live_camera_gives_verdicts_as_it_plays_reconnects_and_stops_on_cancel(live):
    """60 s of a real-time MJPEG camera that drops the connection once at 25 s: each slot's
    verdict event comes within 5 s of the camera sending the slot's last frame, the reader
    reconnects, frame memory stays flat, and a cancel stops the job (status ``stopped``) in 2 s."""
    client, vlm, _ = live
    r = redis.Redis.from_url(client.settings.redis_url)
    with MjpegCamera(fps=30, duration_s=70, drop_at_s=25) as camera:
        job = client.submit(camera.url, prompt="Is the square moving?")
        slot_events, latencies, held = [], [], []
        stop_reading = threading.Event()

        def watch_memory() -> None:
            while not stop_reading.wait(0.5):
                held.append(int(r.get(USED) or 0))

        threading.Thread(target=watch_memory, daemon=True).start()
        cancelled_at = None
        for event in job.events():
            now = time.time()
            if event.kind == "slot" and event.slot.verdict is not None:
                slot_events.append(event)
                sent = camera.sent
                last = event.keyframes[-1]
                if last < len(sent):
                    latencies.append(now - sent[last][1])
            if cancelled_at is None and now - camera.start >= 60:
                assert job.cancel()
                cancelled_at = time.time()
            if event.kind == "end":
                ended_at = now
                break
        stop_reading.set()
    report = job.wait(timeout=30)
    assert report.status == "stopped" and report.stream is not None
    assert ended_at - cancelled_at <= 2.0, ended_at - cancelled_at  # stopped within 2 s
    assert report.stream.reconnects >= 1 and camera.connections >= 2  # the drop was survived
    assert report.stream.ended == "stopped" and report.stream.dropped <= 2  # (a stall of a busy machine)
    # What it keeps is a rolling window: the last KEEP slots' records (and the slots still in
    # flight when it stopped), while the summary counts the whole stream.
    assert report.stream.slots >= 50 and report.stream.kept_slots == KEEP
    kept = [s.slot for s in report.slots]
    assert len(kept) <= KEEP + BACKLOG + 2 and min(kept) >= report.stream.slots - KEEP - BACKLOG - 2
    assert len(report.keyframes) <= 3 * (KEEP + BACKLOG + 2)
    # Verdicts all along the 60 s (a slot is 1 s at 30 fps), before and after the drop.
    assert len(slot_events) >= 45, len(slot_events)
    assert any(e.keyframes[0] > 25 * 30 for e in slot_events)
    steady = sorted(latencies[3:])
    assert steady and steady[-1] <= LATENCY_BOUND_S, steady[-5:]
    print(f"verdict latency p50 {steady[len(steady) // 2]:.2f} s, max {steady[-1]:.2f} s; "
          f"{len(slot_events)} verdicts; frames held max {max(held)} B")
    # Frame memory is flat: what the first 15 s held bounds what the rest held.
    early, late = max(held[: len(held) // 4]), max(held[len(held) // 4:])
    assert late <= 1.5 * early + 200_000, (early, late)
    assert int(r.get(USED) or 0) == 0  # all freed at the end


@pytest.mark.live
def test_a_stage2_slower_than_real_time_drops_slots_and_stays_near_the_live_edge(live):
    """The VLM answers in 12 s (3 in flight: 0.25 slots/s against the camera's 1 slot/s): the
    reader drops new slots while STREAM_BACKLOG_SLOTS (4) are unfinished, so a judged slot's
    verdict is at most ~4 slots of Stage 2 behind the live edge; the stream's end ends the job."""
    client, vlm, _ = live
    vlm.latency_s = 12.0
    try:
        with MjpegCamera(fps=30, duration_s=30) as camera:
            job = client.submit(camera.url)
            late = []
            for event in job.events():
                if event.kind == "slot" and event.slot.verdict is not None:
                    late.append(time.time() - camera.sent[event.keyframes[-1]][1])
            report = job.wait(timeout=60)
    finally:
        vlm.latency_s = 0.5
    assert report.stream.ended == "ended" and report.status == "completed_with_errors"
    dropped = [s for s in report.slots if s.error and s.error.startswith("dropped:")]
    # (the report keeps the last KEEP slots; the summary counts every dropped one)
    assert report.stream.dropped >= len(dropped) >= 3, report.stream
    bound = BACKLOG / 0.25 + 12.0 + 3.0  # the backlog at Stage 2's rate, one answer, margin
    assert late and max(late) <= bound, (max(late), bound)
    print(f"slow VLM: {len(late)} judged, {len(dropped)} dropped, lag max {max(late):.1f} s")


@pytest.mark.live
def test_an_rtsp_camera_is_read_live_and_stopped_on_cancel(live, tmp_path):
    """GStreamer's RTSP server (Debian) serving a live 30 fps picture: verdicts come about once a
    second of stream, and a cancel ends the job ``stopped`` within 2 s."""
    import shutil

    from zroact_tasks.local import free_port
    from zroact_tasks.testing import rtsp_server

    from .helpers import skip_unless_ci

    system = shutil.which("python3", path="/usr/bin")
    probe = subprocess.run([system or "python3", "-c", "import gi; gi.require_version("
                            "'GstRtspServer', '1.0'); from gi.repository import GstRtspServer"],
                           capture_output=True)
    if system is None or probe.returncode != 0:
        skip_unless_ci("no GStreamer RTSP server (apt install gir1.2-gst-rtsp-server-1.0 "
                       "python3-gi gstreamer1.0-plugins-good)")
    client, _, _ = live
    port = free_port()
    server = subprocess.Popen([system, rtsp_server.__file__, str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        job = client.submit(f"rtsp://127.0.0.1:{port}/cam")
        started, verdicts = time.time(), []
        for event in job.events():
            if event.kind == "slot" and event.slot.verdict is not None:
                verdicts.append(time.time())
            if len(verdicts) == 1:
                first = verdicts[0]
            if verdicts and time.time() - first >= 15 and not job.status().state == "stopped":
                assert job.cancel()
                cancelled_at = time.time()
                break
        ended = [e for e in job.events(since=event.id)]
        assert ended[-1].kind == "end" and ended[-1].status == "stopped"
        assert time.time() - cancelled_at <= 2.0
        report = job.wait(timeout=30)
    finally:
        server.kill()
        server.wait()
    assert report.status == "stopped" and report.stream.ended == "stopped"
    assert verdicts[0] - started <= 10, verdicts[0] - started  # open, a slot, Stage 1 and 2
    assert len(verdicts) >= 12, len(verdicts)  # ~1 a second over 15 s


@pytest.mark.live
def test_a_killed_reader_is_replaced_and_the_stream_goes_on(live):
    """SIGKILL of the control worker's pool processes (the stream's reader among them): the
    lease lapses, the job is repaired (a new reader, or the message given back) and verdicts
    resume at the live edge; the stream still ends ``stopped`` on cancel."""
    import signal

    from .test_kills import pool_children

    client, _, cluster = live
    control = next(w for w in cluster.workers if w.role == "control")
    with MjpegCamera(fps=30, duration_s=120) as camera:
        job = client.submit(camera.url)
        killed_at = cancelled = None
        after = []
        for event in job.events():
            now = time.time()
            if killed_at is None and event.kind == "slot" and now - camera.start >= 10:
                for pid in pool_children(control.proc.pid):
                    os.kill(pid, signal.SIGKILL)
                killed_at = now
            elif killed_at is not None and event.kind == "slot" and event.slot.verdict is not None \
                    and event.keyframes[0] > (killed_at - camera.start + 2) * 30:
                after.append(now - killed_at)
                if len(after) >= 5 and cancelled is None:
                    assert job.cancel()
                    cancelled = now
            if event.kind == "end":
                break
            assert now - camera.start < 110, "the stream did not resume after the kill"
        report = job.wait(timeout=30)
    assert report.status == "stopped" and len(after) >= 5
    resends = redis.Redis.from_url(client.settings.redis_url).hgetall("zroact:metrics:resends")
    print(f"reader killed: verdicts resumed {after[0]:.1f} s later; resends {resends}")
    assert after[0] <= 60, after[0]  # lease 15 s + the reconciler's quiet 20 s, or WORKER_LOST_S
