"""The embedded default's parts: the throwaway Redis and the restarting supervisor."""

from __future__ import annotations

import signal
import time

import redis

import zroact_tasks
from zroact_tasks.config import Settings
from zroact_tasks.errors import PromptError
from zroact_tasks.client import Client
from zroact_tasks.local import EmbeddedRedis, LocalCluster


def test_embedded_redis_with_a_password_refuses_anonymous_clients():
    with EmbeddedRedis(password="s3cret") as server:
        assert redis.Redis.from_url(server.url).ping()
        anonymous = redis.Redis(port=server.port)
        try:
            anonymous.ping()
            raise AssertionError("an anonymous client was let in")
        except redis.AuthenticationError:
            pass


def test_supervisor_restarts_a_killed_worker(redis_server, tmp_path):
    url = redis_server.url.rsplit("/", 1)[0] + "/7"
    cluster = LocalCluster(url, log_dir=tmp_path).start(roles=("control",))
    client = Client(settings=Settings(redis_url=url))
    try:
        worker = cluster.workers[0]
        cluster.wait_ready(client.app)
        first_pid = worker.proc.pid
        worker.signal(signal.SIGKILL)
        deadline = time.monotonic() + 20
        while worker.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker.restarts == 1 and worker.proc.pid != first_pid
        cluster.wait_ready(client.app)  # the new process answers
    finally:
        cluster.stop()
        client.close()


def test_prompts_are_checked_before_anything_is_queued(redis_server):
    client = Client(settings=Settings(redis_url=redis_server.url, max_prompt_chars=10))
    for prompt, reason in (("   ", "is empty"), ("x" * 11, "11 characters is over MAX_PROMPT_CHARS 10")):
        try:
            client.submit("video.mp4", prompt=prompt)
            raise AssertionError("accepted a bad prompt")
        except PromptError as exc:
            assert reason in str(exc)
    client.close()


def test_public_names():
    import inspect

    public = {n for n, v in vars(zroact_tasks).items()
              if not n.startswith("_") and not inspect.ismodule(v)} | set(zroact_tasks._LAZY)
    assert set(zroact_tasks.__all__) == public
    for name in zroact_tasks.__all__:
        assert getattr(zroact_tasks, name) is not None


def test_every_setting_is_documented_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`ZROACT_{name.upper()}`" not in readme]
    assert missing == []
