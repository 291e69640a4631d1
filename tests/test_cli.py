"""The `zroact` command as a user runs it: exit codes, one-line errors, reports written."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest

from zroact_tasks.testing.onnx_models import make_bad_models, write_labels

from .helpers import text_match, validate_report, verdict_words


def zroact(*args: str, env: dict[str, str] | None = None, timeout: float = 180):
    return subprocess.run([sys.executable, "-m", "zroact_tasks.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_run_on_the_embedded_default(assets, standin, tmp_path):
    out, tmp = tmp_path / "report.json", tmp_path / "tmp"
    tmp.mkdir()
    res = zroact("run", assets["video"], "--model", assets["model"], "--labels", assets["labels"],
                 "--vlm-url", standin.url, "--json", out, env={"TMPDIR": str(tmp)})
    assert res.returncode == 0, res.stderr
    assert "succeeded" in res.stdout and "41 keyframes, 13 slots, 13 verdicts" in res.stdout
    report = json.loads(out.read_text())
    validate_report(report)
    assert report["stage2"] == {"status": "done", "model": standin.model, "reason": None}
    assert f"stage 2 model: {standin.model} (qwen2-vl image tokens, context 8192" in res.stderr
    # The throwaway cluster leaves nothing behind: its Redis and its workers' logs are gone.
    assert list(tmp.glob("zroact-*")) == [] and "logs kept" not in res.stderr


def test_run_without_a_vlm_skips_stage2(assets, tmp_path):
    out = tmp_path / "report.json"
    res = zroact("run", assets["short_video"], "--model", assets["model_b1"], "--json", out)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert report["stage2"]["status"] == "skipped" and "no VLM URL" in report["stage2"]["reason"]
    assert [s["verdict"] for s in report["slots"]] == [None]
    assert report["keyframes"][0]["detections"][0]["label"] is None  # no labels file given


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "text"])
def test_bad_video_is_exit_3_with_one_line(assets, tmp_path, case):
    path = {"missing": tmp_path / "absent.mp4", "directory": tmp_path,
            "empty": tmp_path / "empty.mp4", "text": tmp_path / "notes.mp4"}[case]
    if case == "empty":
        path.write_bytes(b"")
    if case == "text":
        path.write_text("not a video")
    res = zroact("run", path, "--model", assets["model"])
    assert res.returncode == 3, res.stderr
    assert str(path) in last_line(res.stderr) and "Traceback" not in res.stderr


def test_bad_model_and_labels_are_exit_3(assets, tmp_path):
    bad = make_bad_models(tmp_path)
    for model in (bad["not_onnx"], bad["wrong_input"], tmp_path / "absent.onnx"):
        res = zroact("run", assets["short_video"], "--model", model)
        assert res.returncode == 3 and str(model) in last_line(res.stderr), res.stderr
    labels = write_labels(tmp_path / "two.txt", ["a", "b"])
    res = zroact("run", assets["short_video"], "--model", assets["model"], "--labels", labels)
    assert res.returncode == 3 and "2 labels, but the model has 3 classes" in last_line(res.stderr)


def test_debug_shows_the_traceback(tmp_path):
    res = zroact("--debug", "run", tmp_path / "absent.mp4", "--model", tmp_path / "m.onnx")
    assert res.returncode == 3 and "Traceback" in res.stderr


def test_usage_errors_are_exit_2(tmp_path):
    assert zroact("run").returncode == 2
    assert zroact("frobnicate").returncode == 2
    res = zroact("worker", "stage2", "-c", "5")
    assert res.returncode == 2 and "outside 2-3" in last_line(res.stderr)


def test_stage1_worker_refuses_a_bad_model(tmp_path):
    model = make_bad_models(tmp_path)["wrong_output"]
    res = zroact("worker", "stage1", env={"ZROACT_MODEL": str(model)}, timeout=60)
    assert res.returncode == 3 and "output must be [B,4+C,A]" in last_line(res.stderr)


def test_submit_status_cancel_against_a_cluster(client, assets, tmp_path):
    env = {"ZROACT_REDIS_URL": client.settings.redis_url}
    out = tmp_path / "r.json"
    res = zroact("submit", assets["short_video"], "--wait", "--json", out, env=env)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.splitlines()[0]
    assert json.loads(out.read_text())["job_id"] == job_id
    status = json.loads(zroact("status", job_id, env=env).stdout)
    assert status["state"] == "succeeded" and status["stage1_done"] == 4
    res = zroact("cancel", job_id, env=env)
    assert res.returncode == 0 and "already ended" in res.stdout
    res = zroact("status", "nosuchjob", env=env)
    assert res.returncode == 1 and "no job nosuchjob" in last_line(res.stderr)


def test_submit_of_a_bad_video_is_exit_3_and_writes_the_report(client, tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_text("garbage")
    out = tmp_path / "r.json"
    res = zroact("submit", bad, "--wait", "--json", out,
                 env={"ZROACT_REDIS_URL": client.settings.redis_url})
    assert res.returncode == 3 and str(bad) in last_line(res.stderr)
    assert json.loads(out.read_text())["status"] == "failed"


def test_a_prompt_over_the_limit_is_exit_3(assets):
    res = zroact("run", assets["short_video"], "--model", assets["model"], "--prompt", "x" * 50,
                 env={"ZROACT_MAX_PROMPT_CHARS": "10"})
    assert res.returncode == 3 and "50 characters is over MAX_PROMPT_CHARS 10" in last_line(res.stderr)


def test_progress_plain_lines_off_a_terminal_and_a_live_bar_on_one(client, assets, tmp_path):
    import pty

    env = {"ZROACT_REDIS_URL": client.settings.redis_url}
    res = zroact("submit", assets["short_video"], "--wait", env=env)
    lines = [l for l in res.stderr.splitlines() if "stage 1" in l]
    assert res.returncode == 0 and lines and "\r" not in res.stderr
    assert lines[-1].startswith("succeeded stage 1 4/4 clips, stage 2 1/1 slots")

    leader, follower = pty.openpty()  # a real terminal for the child's stderr
    proc = subprocess.Popen([sys.executable, "-m", "zroact_tasks.cli", "submit",
                             str(assets["short_video"]), "--wait"], stdout=subprocess.PIPE,
                            stderr=follower, env={**os.environ, **env})
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    proc.wait(60)
    assert proc.returncode == 0
    assert b"\r\x1b[2K[" in out and b"####" in out and b"succeeded" in out


def test_run_draws_the_contact_sheet_and_annotated_video(assets, standin, tmp_path):
    import cv2

    from zroact_tasks.models import JobReport

    res = zroact("run", assets["short_video"], "--model", assets["model"], "--vlm-url", standin.url,
                 "--json", tmp_path / "r.json", "--contact-sheet", tmp_path / "s.png",
                 "--annotate", tmp_path / "a.mp4")
    assert res.returncode == 0, res.stderr
    report = JobReport.model_validate_json((tmp_path / "r.json").read_text())
    (slot,) = report.slots  # 4 keyframes: a slot of 3, judged, and keyframe 39 (Stage 1 only)
    assert slot.verdict is not None and slot.keyframes == [9, 19, 29]
    # The pictures show the verdict (text found by template matching, see helpers.text_match).
    sheet = cv2.imread(str(tmp_path / "s.png"))
    assert sheet is not None
    for text in verdict_words(slot):
        assert text_match(sheet, text)[0] > 0.95, text
    cap = cv2.VideoCapture(str(tmp_path / "a.mp4"))
    frames = []
    while (frame := cap.read())[0]:
        frames.append(frame[1])
    cap.release()
    assert len(frames) == 47
    for index in (9, 38):  # the slot's frames: from its first keyframe to keyframe 39
        for text in verdict_words(slot)[:2]:
            assert text_match(frames[index], text)[0] > 0.9, (index, text)
    for index in (8, 39, 46):  # before the first keyframe; from the keyframe past the slot on
        assert text_match(frames[index], slot.verdict.reason)[0] < 0.8, index

def test_zroact_cancel_on_a_running_job_and_exit_code_1(client, standin, assets, tmp_path):
    """`zroact submit --wait` on the session cluster; `zroact cancel` while its slot is at the
    VLM: the waiting command ends with exit 1 (cancelled), a second cancel says already ended."""
    url = client.settings.redis_url
    standin.hold()
    first = len(standin.requests)
    waiting = subprocess.Popen([sys.executable, "-m", "zroact_tasks.cli", "submit",
                                str(assets["short_video"]), "--wait", "--redis-url", url,
                                "--json", str(tmp_path / "r.json")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert standin.wait_for_requests(first + 1, timeout=60)  # the job is running
        job_id = waiting.stdout.readline().strip()
        assert client.job(job_id).status().state == "running"
        res = zroact("cancel", job_id, "--redis-url", url)
        assert (res.returncode, res.stdout.strip()) == (0, f"job {job_id}: cancelled"), res.stderr
        out, err = waiting.communicate(timeout=60)
    finally:
        standin.release()
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 1, (out, err)
    assert f"job {job_id}: cancelled" in out and last_line(err) == f"zroact: error: job {job_id} cancelled"
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "cancelled"
    again = zroact("cancel", job_id, "--redis-url", url)
    assert (again.returncode, again.stdout.strip()) == (0, f"job {job_id}: already ended")


def test_a_failed_job_exits_1(client, standin, assets):
    """A job that fails for a reason other than its input (here its deadline) exits 1."""
    standin.set_fault("slow")
    try:
        res = zroact("submit", assets["short_video"], "--wait", "--redis-url", client.settings.redis_url,
                     env={"ZROACT_JOB_DEADLINE_S": "2"})
    finally:
        standin.release()
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert ": failed in " in res.stdout and "zroact: error: timed out at stage 2" in res.stderr


def test_stage2_concurrency_outside_2_3_needs_the_override(standin):
    """The VRAM budget's 2-3 requests in flight per Stage 2 worker: a server that would take 5
    gets 3, and 5 asked for is refused, unless STAGE2_CONCURRENCY_OVERRIDE."""
    from zroact_tasks.cli import stage2_concurrency
    from zroact_tasks.config import Settings
    from zroact_tasks.errors import ConfigError

    url = standin.url  # its KV cache and latency knee allow 5 in flight
    assert stage2_concurrency(Settings(vlm_url=url), None) == 3  # clamped to 2-3
    with pytest.raises(ConfigError, match="stage2 concurrency 5 is outside 2-3"):
        stage2_concurrency(Settings(vlm_url=url, stage2_concurrency=5), None)
    with pytest.raises(ConfigError, match="outside 2-3"):
        stage2_concurrency(Settings(vlm_url=url), 1)  # the -c flag too
    override = Settings(vlm_url=url, stage2_concurrency=5, stage2_concurrency_override=True)
    assert stage2_concurrency(override, None) == 5
    assert stage2_concurrency(override, 6) == 6
    res = zroact("worker", "stage2", "-c", "5", env={"ZROACT_VLM_URL": url}, timeout=60)
    assert res.returncode == 2 and "ZROACT_STAGE2_CONCURRENCY_OVERRIDE" in res.stderr, res.stderr


@contextlib.contextmanager
def serving(args: list[str], env: dict[str, str], ready_url: str, exit_codes=(0,)):
    """A `zroact` server started as a user starts it, up once ``ready_url`` answers 200; it must
    stop on SIGTERM with one of ``exit_codes``. Yields a dict that gets ``output`` at the end."""
    import time

    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "zroact_tasks.cli", *args],
                            env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    result: dict = {}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.1)
        yield result
        proc.terminate()
        result["output"], _ = proc.communicate(timeout=15)
        assert proc.returncode in exit_codes, result["output"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_zroact_metrics_and_zroact_api_serve(client, assets, tmp_path):
    """The two server entry points, as a user starts them: they answer, and stop on SIGTERM."""
    import httpx

    from zroact_tasks.local import free_port

    url = client.settings.redis_url
    port = free_port()
    metrics = f"http://127.0.0.1:{port}/metrics"
    with serving(["metrics", "--port", str(port), "--redis-url", url], {}, metrics):
        text = httpx.get(metrics, timeout=10).text
    assert "zroact_redis_up 1.0" in text and 'zroact_queue_depth{queue="stage1"}' in text

    job = client.submit(assets["short_video"])
    job.wait(timeout=120)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {"ZROACT_REDIS_URL": url, "ZROACT_API_TOKEN": "cli-test-token",
           "ZROACT_MEDIA_ROOT": str(tmp_path)}
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal (exit -15).
    with serving(["api", "--port", str(port)], env, f"{base}/healthz", (0, -15)) as api:
        assert httpx.get(f"{base}/healthz", timeout=10).json()["status"] == "ok"
        assert httpx.get(f"{base}/v1/jobs/{job.id}", timeout=10).status_code == 401
        status = httpx.get(f"{base}/v1/jobs/{job.id}", timeout=10,
                           headers={"Authorization": "Bearer cli-test-token"})
        assert status.status_code == 200 and status.json()["state"] == "succeeded"
    assert "Application shutdown complete" in api["output"]
    assert "cli-test-token" not in api["output"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_one_line(res, code: int, *words: str, progress: tuple[str, ...] = ()) -> str:
    """The command failed with ``code`` and one stderr line (no traceback) holding ``words``;
    lines starting with one of ``progress`` (what the command printed before failing) aside."""
    lines = [line for line in res.stderr.strip().splitlines() if not line.startswith(progress)]
    assert res.returncode == code, (res.returncode, res.stderr)
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def test_a_bad_setting_never_breaks_help_and_is_one_line_elsewhere():
    env = {"ZROACT_KEYFRAME_STRIDE": "abc"}
    helped = zroact("--help", env=env)
    assert helped.returncode == 0 and "Traceback" not in helped.stderr and "submit" in helped.stdout
    for args in (["status", "0" * 32], ["submit", "x.mp4"], ["run", "x.mp4"]):
        assert_one_line(zroact(*args, env=env), 2, "ZROACT_KEYFRAME_STRIDE", "valid integer")


def test_a_cluster_that_does_not_answer_is_one_line_and_exit_1(assets):
    url = f"redis://:hunter2@127.0.0.1:{_free_port()}/0"
    for args in (["submit", assets["short_video"]], ["status", "0" * 32], ["cancel", "0" * 32]):
        line = assert_one_line(zroact(*args, "--redis-url", url, timeout=30), 1, "does not answer",
                               "--redis-url")
        assert "hunter2" not in line  # the password is masked


def test_version():
    from importlib.metadata import version

    res = zroact("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"zroact, version {version('zroact')}"


def test_stage1_without_onnxruntime_names_the_extra_to_install(assets, tmp_path):
    """``pip install .`` with no extra: the first use of Stage 1 says which extra to install."""
    shadow = tmp_path / "no-onnxruntime"
    shadow.mkdir()
    (shadow / "onnxruntime.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'onnxruntime'\", name='onnxruntime')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}
    res = zroact("run", assets["short_video"], "--model", assets["model"], env=env)
    assert_one_line(res, 2, "onnxruntime is not installed", "zroact[cpu]", "zroact[gpu]")


def test_run_with_a_vlm_that_does_not_answer_is_exit_2_before_the_job(assets):
    url = f"http://127.0.0.1:{_free_port()}"
    res = zroact("run", assets["short_video"], "--model", assets["model"], "--vlm-url", url,
                 timeout=60)
    line = assert_one_line(res, 2, f"the VLM at {url} does not answer", "--vlm-url",
                           progress=("stage 1 model: ",))
    assert "submitted" not in res.stderr  # no job was started
    assert "unreachable" in line
