"""The HTTP job API (zroact_tasks/api.py) served by a real uvicorn, against the real Redis and
real workers: its own small cluster on Redis db 11 whose control worker has a MEDIA_ROOT."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from zroact_tasks.api import UPLOAD_DIR, create_app
from zroact_tasks.config import Settings
from zroact_tasks.errors import ConfigError, InputError
from zroact_tasks.jobstate import JobStore
from zroact_tasks.local import EmbeddedRedis, free_port
from zroact_tasks.media.video import probe, resolve_video_path
from zroact_tasks.models import FINAL_STATES, JobReport, JobStatus

from .conftest import start_cluster
from .helpers import validate_report

TOKEN = "test-token-7f3a9c2e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """create_app(settings) on a real uvicorn in a thread; yields its base URL."""
    port = free_port()
    # log_config=None: uvicorn's loggers propagate to the root logger, where caplog sees them.
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port,
                                           log_config=None, log_level="info"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="module")
def api_settings(redis_server, standin, assets, media, tmp_path_factory) -> Iterator[Settings]:
    """A cluster of its own (db 11) whose control worker resolves videos under ``media``."""
    url = redis_server.url.rsplit("/", 1)[0] + "/11"
    env = {"ZROACT_MODEL": str(assets["model"]), "ZROACT_LABELS": str(assets["labels"]),
           "ZROACT_VLM_URL": standin.url + "/v1", "ZROACT_VLM_MAX_RETRIES": "1",
           "ZROACT_VLM_BACKOFF_MAX_S": "0.2", "ZROACT_VLM_TIMEOUT_S": "5",
           "ZROACT_MEDIA_ROOT": str(media)}
    cluster, client = start_cluster(url, env, tmp_path_factory.mktemp("api-logs"))
    try:
        yield Settings(redis_url=url, media_root=media, api_token=TOKEN)
    finally:
        cluster.stop()
        client.close()


@pytest.fixture(scope="module")
def api(api_settings) -> Iterator[str]:
    with serving(api_settings) as url:
        yield url


@pytest.fixture()
def http(api) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api, headers=AUTH, timeout=30) as client:
        yield client


def uploads(media: Path) -> set[str]:
    return set(os.listdir(media / UPLOAD_DIR))


def wait_for_report(http: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    """Poll status until the job ends (progress never goes back), then fetch the report."""
    deadline, last = time.monotonic() + timeout, (0, 0)
    while True:
        resp = http.get(f"/v1/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        status = JobStatus.model_validate(resp.json())
        progress = (status.stage1_done, status.stage2_done)
        assert progress >= last
        last = progress
        if status.state in FINAL_STATES:
            break
        assert time.monotonic() < deadline, f"job {job_id} still {status.state}"
        time.sleep(0.2)
    resp = http.get(f"/v1/jobs/{job_id}/report")
    assert resp.status_code == 200, resp.text
    validate_report(resp.json())
    assert JobReport.model_validate(resp.json()).status == status.state
    return resp.json()


def cli_message(path: Path) -> InputError:
    """The InputError `zroact run` ends with for this file (its stderr's last line is str(exc))."""
    with pytest.raises(InputError) as info:
        resolved = resolve_video_path(path, None)
        s = Settings()
        probe(resolved, max_pixels=s.max_pixels, max_frames=s.max_frames,
              max_duration_s=s.max_duration_s)
    return info.value


# --- jobs end to end -------------------------------------------------------------------------------

def test_upload_runs_a_job_and_serves_its_report(http, api_settings, assets, media):
    before = uploads(media)
    with open(assets["video"], "rb") as video:
        resp = http.post("/v1/jobs", files={"video": ("sample.mp4", video, "video/mp4")},
                         data={"prompt": "Is the square moving?", "priority": "5"})
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    assert resp.json() == {"job_id": job_id, "url": f"/v1/jobs/{job_id}"}
    (stored,) = uploads(media) - before  # streamed to MEDIA_ROOT/uploads/<uuid>.mp4
    assert re.fullmatch(r"[0-9a-f]{32}\.mp4", stored)
    assert (media / UPLOAD_DIR / stored).read_bytes() == assets["video"].read_bytes()
    spec = JobStore(api_settings.redis_url, 60).spec(job_id)  # the workers' path: under the root
    assert (spec.video, spec.priority) == (f"{UPLOAD_DIR}/{stored}", 5)

    report = wait_for_report(http, job_id)
    assert report["status"] == "succeeded"
    assert (len(report["keyframes"]), len(report["slots"])) == (41, 13)
    assert all(slot["verdict"] for slot in report["slots"])
    status = http.get(resp.json()["url"]).json()
    assert (status["stage1_done"], status["stage1_total"]) == (41, 41)
    assert (status["stage2_done"], status["stage2_total"]) == (13, 13)


def test_a_path_under_media_root_as_json_form_or_multipart(http, api_settings, assets, media):
    clips = media / "clips"
    clips.mkdir(exist_ok=True)
    shutil.copy(assets["short_video"], clips / "short.mp4")
    requests = [  # (request, the priority the job gets)
        ({"json": {"path": "clips/short.mp4", "prompt": "What happens?", "priority": 0}}, 0),
        ({"data": {"path": str(clips / "short.mp4")}}, 5),  # absolute, inside MEDIA_ROOT
        ({"files": {"path": (None, "clips/../clips/short.mp4"), "priority": (None, "9")}}, 9),
    ]
    ids = []
    for kwargs, priority in requests:
        resp = http.post("/v1/jobs", **kwargs)
        assert resp.status_code == 202, (kwargs, resp.text)
        ids.append(resp.json()["job_id"])
        spec = JobStore(api_settings.redis_url, 60).spec(ids[-1])
        assert (spec.video, spec.priority) == ("clips/short.mp4", priority)  # relative to the root
    assert JobStore(api_settings.redis_url, 60).spec(ids[0]).prompt == "What happens?"
    for job_id in ids:
        report = wait_for_report(http, job_id)
        assert report["status"] == "succeeded" and len(report["slots"]) == 1


def test_cancel_a_running_job(http, standin, assets):
    standin.hold()  # Stage 2 never answers: the job stays running
    try:
        first = len(standin.requests)
        with open(assets["short_video"], "rb") as video:
            resp = http.post("/v1/jobs", files={"video": ("short.mp4", video)})
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["job_id"]
        assert standin.wait_for_requests(first + 1, timeout=60)

        pending = http.get(f"/v1/jobs/{job_id}/report")  # no report while it runs
        assert pending.status_code == 409 and pending.headers["retry-after"] == "2"
        assert pending.json()["status"]["state"] == "running"

        resp = http.delete(f"/v1/jobs/{job_id}")
        assert resp.status_code == 200 and resp.json() == {"job_id": job_id, "cancelled": True}
        report = wait_for_report(http, job_id, timeout=60)
        assert report["status"] == "cancelled"
        assert http.delete(f"/v1/jobs/{job_id}").json()["cancelled"] is False  # already ended
    finally:
        standin.release()


def sse_events(response: httpx.Response, limit: int | None = None) -> list[dict]:
    """Parse a Server-Sent Events body into {id, event, data}, stopping after ``limit`` events
    (the reader then disconnects)."""
    found, current = [], {}
    for line in response.iter_lines():
        if line.startswith(":"):
            continue  # a keep-alive comment
        if not line:
            if current:
                current["data"] = json.loads(current["data"])
                found.append(current)
                current = {}
                if limit is not None and len(found) >= limit:
                    break
            continue
        field, _, value = line.partition(": ")
        current[field] = value
    return found


def test_events_over_sse_resume_with_last_event_id_and_a_partial_report(http, api, standin, assets):
    """Events arrive while the job runs; a reader that disconnects resumes with Last-Event-ID
    and gets the rest, none missed or repeated; ``?partial=true`` reports what is recorded."""
    standin.hold()  # no slot can end: the job runs until released
    try:
        with open(assets["video"], "rb") as video:
            resp = http.post("/v1/jobs", files={"video": ("sample.mp4", video)})
        job_id = resp.json()["job_id"]
        assert httpx.get(f"{api}/v1/jobs/{job_id}/events").status_code == 401  # same auth
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            first = sse_events(stream, limit=3)  # then it disconnects
        assert [e["event"] for e in first] == ["keyframe"] * 3
        partial = http.get(f"/v1/jobs/{job_id}/report", params={"partial": "true"})
        assert partial.status_code == 200, partial.text
        body = partial.json()
        validate_report(body)
        assert body["partial"] is True and body["status"] == "running"
        assert len(body["keyframes"]) >= 3 and all(s["verdict"] is None for s in body["slots"])
        assert http.get(f"/v1/jobs/{job_id}/report").status_code == 409  # no final report yet
    finally:
        standin.release()
    with http.stream("GET", f"/v1/jobs/{job_id}/events",
                     headers={"Last-Event-ID": first[-1]["id"]}, timeout=120) as stream:
        rest = sse_events(stream)
    seen = first + rest
    assert [e["data"]["seq"] for e in seen] == list(range(1, len(seen) + 1))
    assert seen[-1]["event"] == "end" and seen[-1]["data"]["status"] == "succeeded"
    assert [e["event"] for e in seen].count("slot") == 14
    report = wait_for_report(http, job_id)
    verdicts = {e["data"]["slot"]["slot"]: e["data"]["slot"]["verdict"] for e in seen
                if e["event"] == "slot"}
    assert all(verdicts[s["slot"]] == s["verdict"] for s in report["slots"])
    assert report["partial"] is False
    bad = http.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "nonsense"})
    assert bad.status_code == 422 and "not an event id" in bad.json()["detail"]
    assert http.get(f"/v1/jobs/{'0' * 32}/events").status_code == 404


# --- refusals ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["text", "empty"])
def test_a_bad_upload_is_422_with_the_clis_message_and_is_deleted(http, media, tmp_path, case):
    local = tmp_path / "notes.mp4"
    local.write_bytes(b"this is not a video" if case == "text" else b"")
    expected = cli_message(local)
    before = uploads(media)
    resp = http.post("/v1/jobs", files={"video": ("notes.mp4", local.read_bytes())})
    assert resp.status_code == 422
    # The CLI's one line, naming the file as the client named it (not the server's copy).
    assert resp.json() == {"detail": str(type(expected)("notes.mp4", expected.reason))}
    assert expected.reason in ("OpenCV cannot open it as a video", "the file is empty")
    assert uploads(media) == before


def test_paths_that_escape_media_root_are_422(http, assets, media, tmp_path):
    outside = tmp_path / "outside.mp4"
    shutil.copy(assets["short_video"], outside)
    link = media / "link.mp4"
    link.symlink_to(outside)
    try:
        for path in ("../" * 12 + str(outside).lstrip("/"), str(outside), "link.mp4"):
            resp = http.post("/v1/jobs", json={"path": path})
            assert resp.status_code == 422, path
            assert resp.json()["detail"].startswith(f"{path}: resolves outside MEDIA_ROOT ")
        resp = http.post("/v1/jobs", json={"path": "absent.mp4"})
        assert resp.status_code == 422 and resp.json()["detail"] == "absent.mp4: no such file"
    finally:
        link.unlink()


@pytest.mark.parametrize("kwargs, message", [
    ({"json": {"path": "a.mp4", "priority": 10}}, "priority: Input should be less than or equal to 9"),
    ({"json": {"path": "a.mp4", "prompt": " "}}, "prompt: is empty"),
    ({"json": {"path": "a.mp4", "colour": "red"}}, "colour: Extra inputs are not permitted"),
    ({"json": {}}, "path: Field required"),
    ({"files": {"prompt": (None, "hi")}}, "give exactly one of the form fields video (a file) and path"),
    ({"files": {"path": (None, "a.mp4"), "video": ("a.mp4", b"x")}},
     "give exactly one of the form fields video (a file) and path"),
    ({"files": {"path": (None, "a.mp4"), "priority": (None, "high")}},
     "priority: Input should be a valid integer, unable to parse string as an integer"),
    ({"files": {"colour": (None, "red")}}, None),
    ({"data": {"path": "a.mp4", "prompt": "x" * 4001}},
     "prompt: 4001 characters is over MAX_PROMPT_CHARS 4000"),
])
def test_bad_fields_are_422(http, media, kwargs, message):
    before = uploads(media)
    resp = http.post("/v1/jobs", **kwargs)
    assert resp.status_code == 422, resp.text
    assert message is None or resp.json() == {"detail": message}
    assert uploads(media) == before


def test_other_content_types_are_415_and_broken_bodies_400(http):
    assert http.post("/v1/jobs", content=b"a.mp4", headers={"content-type": "text/plain"}).status_code == 415
    assert http.post("/v1/jobs", content=b"--x\r\n",
                     headers={"content-type": "multipart/form-data"}).status_code == 400  # no boundary
    resp = http.post("/v1/jobs", content=b'--x\r\nContent-Disposition: form-data; name="path"\r\n\r\na',
                     headers={"content-type": "multipart/form-data; boundary=x"})
    assert resp.status_code == 400 and "closing boundary" in resp.json()["detail"]


def _raw_request(port: int, head: bytes, body: bytes) -> tuple[int, bytes]:
    """Send the head and part of a body, never the rest; the status line the server answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an answer: {answer!r}"
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer


def test_uploads_over_the_limit_are_413_unread_and_deleted(api_settings, media):
    limit = 1000
    with serving(api_settings.model_copy(update={"api_max_upload_bytes": limit})) as url:
        port = int(url.rsplit(":", 1)[1])
        before = uploads(media)
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
            at_limit = http.post("/v1/jobs", files={"video": ("a.mp4", b"x" * limit)})
            assert at_limit.status_code == 422  # accepted as an upload, then not a video
            over = http.post("/v1/jobs", files={"video": ("a.mp4", b"x" * (limit + 1))})
            assert over.status_code == 413
            assert over.json() == {"detail": f"upload is over API_MAX_UPLOAD_BYTES {limit}"}

        part = (b'--b\r\nContent-Disposition: form-data; name="video"; filename="big.mp4"\r\n'
                b"Content-Type: application/octet-stream\r\n\r\n")
        auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
        # Declared far over the limit: refused before the body is read (none of it is sent).
        head = (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n" + auth +
                b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 50000000\r\n\r\n")
        status, answer = _raw_request(port, head, b"")
        assert status == 413 and b"connection: close" in answer.lower()
        # Chunked, no length: 413 as soon as the file passes the limit, the rest never sent.
        head = (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n" + auth +
                b"Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n")
        data = part + b"y" * (limit + 100)
        status, _ = _raw_request(port, head, b"%x\r\n%s\r\n" % (len(data), data))
        assert status == 413
        time.sleep(0.2)
        assert uploads(media) == before  # partial files deleted


def test_auth_is_required_on_v1_and_tokens_are_never_logged(api, http, caplog):
    caplog.set_level(logging.DEBUG)
    job_urls = ["/v1/jobs/0123", "/v1/jobs/0123/report"]
    with httpx.Client(base_url=api, timeout=30) as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer é".encode()}):
            for url in job_urls:
                resp = anonymous.get(url, headers=headers)
                assert resp.status_code == 401 and resp.headers["www-authenticate"] == "Bearer"
            assert anonymous.delete(job_urls[0], headers=headers).status_code == 401
            assert anonymous.post("/v1/jobs", json={"path": "a.mp4"}, headers=headers).status_code == 401
        assert anonymous.get("/healthz").json() == {"status": "ok", "detail": None}
    for url in job_urls:  # with the token: an unknown job
        resp = http.get(url)
        assert resp.status_code == 404
        assert resp.json() == {"detail": "no job 0123 (never submitted, or its records expired)"}
    assert http.delete(job_urls[0]).status_code == 404
    assert "GET /v1/jobs/0123 HTTP/1.1" in caplog.text  # the access log was captured...
    assert TOKEN not in caplog.text and "wrong-token" not in caplog.text  # ...without a token


def test_healthz_is_503_when_redis_does_not_answer(media):
    # Redis errors are retried for REDIS_RETRY_S (60 s by default) before the API answers 503.
    dead = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", media_root=media,
                    api_token=TOKEN, redis_retry_s=2)
    with serving(dead) as url:
        resp = httpx.get(url + "/healthz", timeout=30)
        assert resp.status_code == 503 and resp.json()["status"] == "unavailable"
        resp = httpx.get(url + "/v1/jobs/0123", headers=AUTH, timeout=30)
        assert resp.status_code == 503 and "Redis" in resp.json()["detail"]


def test_the_app_refuses_to_start_without_media_root_or_token(media, tmp_path):
    with pytest.raises(ConfigError, match="ZROACT_MEDIA_ROOT"):
        create_app(Settings(api_token=TOKEN))
    with pytest.raises(ConfigError, match="is not a directory"):
        create_app(Settings(api_token=TOKEN, media_root=tmp_path / "absent"))
    with pytest.raises(ConfigError, match="ZROACT_API_TOKEN"):
        create_app(Settings(media_root=media))
    with pytest.raises(ConfigError, match="ZROACT_API_TOKEN"):
        create_app(Settings(media_root=media, api_token="  "))
    create_app(Settings(media_root=media, api_auth_disabled=True))  # explicitly open: allowed


def test_an_upload_dir_it_cannot_write_stops_the_start_and_a_lost_one_is_a_500():
    """Issue 15, defect 1: the start check writes a file in MEDIA_ROOT/uploads (mode bits, which
    os.access reads, can say yes where creating a file fails) and refuses in one line; an upload
    that cannot be stored for a setup reason is a 500 that says so, not 507 (no space)."""
    # A Redis of its own: no control worker publishes a MEDIA_ROOT there, so uploads are read.
    with tempfile.TemporaryDirectory() as top, EmbeddedRedis() as server:
        os.chmod(top, 0o755)  # not under pytest's 0700 tmp: uid 10001 must reach it
        _upload_dir_checks(Path(top) / "media", server.url)


def _upload_dir_checks(root: Path, redis_url: str) -> None:
    (root / UPLOAD_DIR).mkdir(parents=True)
    os.chmod(root, 0o755)
    os.chmod(root / UPLOAD_DIR, 0o755)
    settings = Settings(redis_url=redis_url, media_root=root, api_token=TOKEN)
    create_app(settings)  # writable here: it starts (and leaves no probe file behind)
    assert os.listdir(root / UPLOAD_DIR) == []
    if os.geteuid() == 0:
        # As the image's uid, with os.access saying yes: the write still fails, the check sees it.
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.close(read)
                os.setgid(10001)
                os.setuid(10001)
                os.access = lambda *_a, **_k: True
                try:
                    create_app(settings)
                    message = "started"
                except ConfigError as exc:
                    message = str(exc)
                except BaseException as exc:  # noqa: BLE001 - reported to the parent
                    message = f"{type(exc).__name__}: {exc}"
                os.write(write, message.encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as pipe:
            message = pipe.read().decode()
        os.waitpid(pid, 0)
        assert message.startswith(f"cannot write in the upload directory {root / UPLOAD_DIR} as "
                                  "uid 10001: Permission denied"), message
        assert "\n" not in message
    with serving(settings) as url:
        shutil.rmtree(root / UPLOAD_DIR)  # the directory is gone after the start
        resp = httpx.post(url + "/v1/jobs", headers=AUTH, timeout=30,
                          files={"video": ("a.mp4", b"x" * 1000)})
    assert resp.status_code == 500, resp.text
    assert resp.json() == {"detail": f"server setup error: cannot store uploads in "
                                     f"MEDIA_ROOT/{UPLOAD_DIR}: No such file or directory"}


def test_auth_disabled_explicitly_serves_without_a_token(api_settings):
    settings = api_settings.model_copy(update={"api_token": None, "api_auth_disabled": True})
    with serving(settings) as url:
        resp = httpx.get(url + "/v1/jobs/0123", timeout=30)
        assert resp.status_code == 404
        assert "security" not in httpx.get(url + "/openapi.json").json()["paths"]["/v1/jobs"]["post"]


# --- the OpenAPI spec, fuzzed ------------------------------------------------------------------------

def openapi_spec() -> dict:
    """The spec the API serves (building the app connects to nothing)."""
    with tempfile.TemporaryDirectory() as root:
        return create_app(Settings(media_root=root, api_token=TOKEN)).openapi()


# Loaded at import: schemathesis' lazy `from_fixture` loader does not run on pytest 9.
schema = schemathesis.openapi.from_dict(openapi_spec())


def test_the_served_spec_is_the_one_fuzzed(http):
    assert http.get("/openapi.json").json() == openapi_spec()


@schema.parametrize()
@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_the_openapi_spec_holds_and_nothing_is_a_server_error(case, api, media):
    before = uploads(media)
    # Every check but "schema-valid data is accepted": no generated path or bytes is a video.
    response = case.call_and_validate(base_url=api, headers=AUTH, timeout=30,
                                      excluded_checks=[positive_data_acceptance])
    if response.status_code != 202:  # a refused upload leaves nothing behind
        assert uploads(media) == before


def test_an_api_whose_media_root_no_control_worker_shares_refuses_jobs(api_settings, media,
                                                                       tmp_path, assets):
    """The cluster's control worker resolves paths under ``media``; an API storing uploads under
    another directory would get 202 and then every job failing "no such file": it answers 503
    with one line naming both roots instead, before reading the upload."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    settings = api_settings.model_copy(update={"media_root": other})
    with serving(settings) as url, httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
        with open(assets["short_video"], "rb") as video:
            resp = http.post("/v1/jobs", files={"video": ("short.mp4", video)})
        assert resp.status_code == 503, resp.text
        detail = resp.json()["detail"]
        assert str(other.resolve()) in detail and str(media.resolve()) in detail
        assert "ZROACT_MEDIA_ROOT" in detail and "\n" not in detail
        assert os.listdir(other / UPLOAD_DIR) == []  # nothing was stored


def test_a_live_source_outside_stream_sources_is_422(http):
    """The API's STREAM_SOURCES is empty (the default): no live source is accepted."""
    for body in ({"path": "rtsp://127.0.0.1:8554/cam"}, {"path": "http://127.0.0.1:9/live.mjpg"}):
        resp = http.post("/v1/jobs", json=body)
        assert resp.status_code == 422, resp.text
        assert "not under an allowed ZROACT_STREAM_SOURCES prefix (allowed: none)" in resp.json()["detail"]
