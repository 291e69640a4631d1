"""The checks of scripts/compose-smoke.sh that talk HTTP and Redis (run with the project's venv).

Every subcommand exits non-zero with one line on stderr when its check fails, and prints one
line of facts (JSON) on success. Settings come from the environment the smoke sets:
ZROACT_REDIS_URL, SMOKE_API_PORT, SMOKE_FLOWER_PORT, SMOKE_METRICS_PORT, API_TOKEN,
FLOWER_BASIC_AUTH, SMOKE_PROJECT (the compose project, for `docker` calls).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from zroact_tasks import pipeline
from zroact_tasks.client import Client

FINAL = {"succeeded", "completed_with_errors", "failed", "cancelled"}


class CheckFailed(Exception):
    pass


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise CheckFailed(f"{name} is not set")
    return value


def http(url: str, *, data: bytes | None = None, headers: dict | None = None,
         timeout: float = 30) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def api_url(path: str) -> str:
    return f"http://127.0.0.1:{env('SMOKE_API_PORT')}{path}"


def bearer() -> dict:
    return {"Authorization": f"Bearer {env('API_TOKEN')}"}


def flower_tasks() -> dict:
    auth = base64.b64encode(env("FLOWER_BASIC_AUTH").encode()).decode()
    status, body = http(f"http://127.0.0.1:{env('SMOKE_FLOWER_PORT')}/api/tasks?limit=100000",
                        headers={"Authorization": f"Basic {auth}"})
    if status != 200:
        raise CheckFailed(f"Flower /api/tasks answered {status}: {body[:200]!r}")
    return json.loads(body)


def job_tasks(job_id: str) -> list[dict]:
    """Flower's tasks of this job (its id is in every task's arguments), each with its uuid."""
    return [{**t, "uuid": uuid_} for uuid_, t in flower_tasks().items()
            if job_id in f"{t.get('args')}{t.get('kwargs')}"]


def check_report(report, what: str) -> dict:
    if report.status != "succeeded":
        raise CheckFailed(f"{what}: job {report.job_id} ended {report.status}: {report.error}")
    verdicts = sum(1 for s in report.slots if s.verdict is not None and not s.error)
    if report.stage2.status != "done" or not report.slots or verdicts != len(report.slots):
        raise CheckFailed(f"{what}: job {report.job_id}: Stage 2 {report.stage2.status}, "
                          f"{verdicts} of {len(report.slots)} slots have a verdict")
    return {"job": report.job_id, "slots": len(report.slots), "keyframes": len(report.keyframes),
            "total_s": round(report.timings.get("total", 0.0), 2)}


def cmd_report(args) -> dict:
    """The host CLI's report (zroact submit --wait --json FILE) is a succeeded job."""
    from zroact_tasks.models import JobReport
    return check_report(JobReport.model_validate_json(Path(args.file).read_text()), "host CLI")


def cmd_api_upload(args) -> dict:
    """A job through the HTTP API: multipart upload, then status and report by URL."""
    status, body = http(api_url("/healthz"))
    if status != 200:
        raise CheckFailed(f"/healthz answered {status}")
    video = Path(args.video).read_bytes()
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; "
            f"filename=\"{Path(args.video).name}\"\r\nContent-Type: video/mp4\r\n\r\n").encode()
    body += video + f"\r\n--{boundary}--\r\n".encode()
    t0 = time.monotonic()
    status, answer = http(api_url("/v1/jobs"), data=body, headers={
        **bearer(), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    if status not in (200, 201, 202):
        raise CheckFailed(f"upload answered {status}: {answer[:300]!r}")
    job = json.loads(answer)
    url = job["url"]
    while True:
        status, answer = http(api_url(url), headers=bearer())
        if status != 200:
            raise CheckFailed(f"GET {url} answered {status}: {answer[:200]!r}")
        state = json.loads(answer).get("state")
        if state in FINAL:
            break
        if time.monotonic() - t0 > args.timeout:
            raise CheckFailed(f"upload job {job['job_id']} still {state} after {args.timeout} s")
        time.sleep(0.5)
    status, answer = http(api_url(url + "/report"), headers=bearer())
    if status != 200:
        raise CheckFailed(f"GET {url}/report answered {status}")
    from zroact_tasks.models import JobReport
    out = check_report(JobReport.model_validate_json(answer), "HTTP API")
    return {**out, "upload_to_report_s": round(time.monotonic() - t0, 2)}


def cmd_flower(args) -> dict:
    """Flower lists the job's tasks, each with the worker that ran it."""
    deadline = time.monotonic() + 30
    while True:
        tasks = job_tasks(args.job)
        names = {t.get("name") for t in tasks}
        if {pipeline.DETECT, pipeline.JUDGE} <= names and all(t.get("worker") for t in tasks):
            break
        if time.monotonic() > deadline:
            raise CheckFailed(f"Flower lists {len(tasks)} tasks of job {args.job} "
                              f"(names {sorted(n for n in names if n)}), not its Stage 1 and 2 "
                              "tasks each with a worker")
        time.sleep(1)
    return {"job": args.job, "tasks": len(tasks),
            "workers": sorted({t["worker"] for t in tasks})}


def cmd_metrics(args) -> dict:
    status, body = http(f"http://127.0.0.1:{env('SMOKE_METRICS_PORT')}/metrics")
    text = body.decode("utf-8", "replace")
    if status != 200:
        raise CheckFailed(f"/metrics answered {status}")
    lines = [line for line in text.splitlines() if line.startswith("zroact_")]
    if not lines:
        raise CheckFailed("/metrics has no zroact_ series")
    for name in args.expect:
        if not any(line.startswith(name) for line in lines):
            raise CheckFailed(f"/metrics has no {name} series")
    return {"series": len(lines)}


def client() -> Client:
    return Client(env("ZROACT_REDIS_URL"))


def cmd_scale(args) -> dict:
    """Several jobs at once; every replica of stage1 and stage2 ran some of their tasks."""
    c = client()
    t0 = time.monotonic()
    jobs = [c.submit(args.video) for _ in range(args.jobs)]
    for job in jobs:
        check_report(job.wait(timeout=args.timeout), "scaled")
    elapsed = time.monotonic() - t0
    by_queue: dict[str, dict[str, int]] = {"stage1": {}, "stage2": {}}
    deadline = time.monotonic() + 30
    while True:
        by_queue = {"stage1": {}, "stage2": {}}
        for job in jobs:
            for t in job_tasks(job.id):
                queue = {pipeline.DETECT: "stage1", pipeline.JUDGE: "stage2"}.get(t.get("name"))
                if queue and t.get("state") == "SUCCESS":
                    by_queue[queue][t["worker"]] = by_queue[queue].get(t["worker"], 0) + 1
        if all(len(w) >= args.replicas for w in by_queue.values()) or time.monotonic() > deadline:
            break
        time.sleep(1)
    for queue, workers in by_queue.items():
        if len(workers) < args.replicas:
            raise CheckFailed(f"{queue}: tasks ran on {len(workers)} worker(s) {workers}, "
                              f"not on all {args.replicas} replicas")
    return {"jobs": len(jobs), "elapsed_s": round(elapsed, 2), **by_queue}


def docker(*argv: str) -> str:
    return subprocess.run(["docker", *argv], check=True, capture_output=True, text=True).stdout


def replicas(service: str) -> list[str]:
    out = docker("ps", "-q", "--filter", f"label=com.docker.compose.project={env('SMOKE_PROJECT')}",
                 "--filter", f"label=com.docker.compose.service={service}")
    return sorted(out.split())


def node_name(container: str) -> str:
    return docker("exec", container, "cat", "/tmp/zroact-node-name").strip()


def cmd_kill(args) -> dict:
    """A stage2 replica dies while it runs a job's Stage 2 tasks; the tasks it held run again on
    another replica within the documented recovery time (``--bound``: WORKER_LOST_S +
    RECONCILE_INTERVAL_S + a margin), and the job succeeds.

    worker:    the worker process inside the replica is SIGKILLed (the container exits; the
               restart policy starts it again, as a new holder).
    container: `docker kill` of the replica (a manual stop for `restart: unless-stopped`: it stays
               down; the smoke starts it again afterwards).
    """
    containers = replicas("stage2")
    if len(containers) < 2:
        raise CheckFailed(f"{len(containers)} stage2 replica(s) running, need 2")
    victim, survivor = containers[0], containers[1]
    victim_node, survivor_node = node_name(victim), node_name(survivor)
    restarts = int(docker("inspect", "-f", "{{.RestartCount}}", victim))
    init_pid = docker("inspect", "-f", "{{.State.Pid}}", victim).strip()  # looked up before: the
    c = client()                                                           # kill must be quick
    job = c.submit(args.video)
    t_submit = time.monotonic()
    # Wait until the victim is running one of this job's Stage 2 tasks, started so recently that
    # it is still waiting for the VLM (SMOKE_VLM_LATENCY_S per request) when the kill lands.
    while True:
        held = [t for t in job_tasks(job.id)
                if t.get("name") == pipeline.JUDGE and t.get("worker") == victim_node
                and t.get("state") == "STARTED"
                and time.time() - (t.get("started") or 0) < args.fresh_s]
        if held:
            break
        if job.status().state in FINAL or time.monotonic() - t_submit > 120:
            raise CheckFailed(f"kill {args.mode}: the victim {victim_node} ran no Stage 2 task of "
                              f"job {job.id} in time")
        time.sleep(0.2)
    if args.mode == "worker":
        children = Path(f"/proc/{init_pid}/task/{init_pid}/children").read_text().split()
        if not children:
            raise CheckFailed(f"no worker process under the victim's init (pid {init_pid})")
        kill_wall = time.time()
        subprocess.run(["kill", "-KILL", *children], check=True)
    else:
        kill_wall = time.time()
        docker("kill", victim)
    t_kill = time.monotonic()
    report = job.wait(timeout=args.timeout)
    completed = time.monotonic() - t_kill
    out = check_report(report, f"kill {args.mode}")
    # When each task the victim was running started again elsewhere (Flower: the same task id,
    # started by another worker; workers' clocks are this host's). One that the victim finished
    # in the instant before the kill is not given back: left out.
    rerun = {t["uuid"]: t for t in job_tasks(job.id)}
    held_ids = {t["uuid"] for t in held
                if not (rerun.get(t["uuid"], {}).get("worker") == victim_node
                        and rerun[t["uuid"]].get("state") == "SUCCESS")}
    if not held_ids:
        raise CheckFailed(f"kill {args.mode}: the victim finished its tasks before the kill")
    late = [i for i in held_ids if rerun.get(i, {}).get("worker") in (None, victim_node)
            or rerun[i].get("state") != "SUCCESS" or not rerun[i].get("started")]
    if late:
        raise CheckFailed(f"kill {args.mode}: task(s) {late} held by {victim_node} did not run "
                          f"again elsewhere ({[rerun.get(i) for i in late]})")
    redelivered = max(rerun[i]["started"] for i in held_ids) - kill_wall
    if redelivered > args.bound:
        raise CheckFailed(f"kill {args.mode}: the victim's task(s) started again {redelivered:.1f} s "
                          f"after the kill, over the documented bound {args.bound} s")
    judged = {}
    for t in job_tasks(job.id):
        if t.get("name") == pipeline.JUDGE and t.get("state") == "SUCCESS":
            judged[t["worker"]] = judged.get(t["worker"], 0) + 1
    state = json.loads(docker("inspect", "-f", "{{json .State}}", victim))
    new_restarts = int(docker("inspect", "-f", "{{.RestartCount}}", victim))
    if args.mode == "worker":
        # The restart policy starts the replica again (wait for it: the policy backs off).
        deadline = time.monotonic() + 60
        while not (state.get("Running") and new_restarts > restarts):
            if time.monotonic() > deadline:
                raise CheckFailed(f"kill worker: the replica was not restarted (state {state})")
            time.sleep(1)
            state = json.loads(docker("inspect", "-f", "{{json .State}}", victim))
            new_restarts = int(docker("inspect", "-f", "{{.RestartCount}}", victim))
    elif state.get("Running"):
        raise CheckFailed("kill container: the killed replica runs again (expected a manual stop)")
    if judged.get(survivor_node, 0) < 1:
        raise CheckFailed(f"kill {args.mode}: the other replica {survivor_node} judged no slot "
                          f"of job {job.id} ({judged})")
    return {**out, "mode": args.mode, "victim": victim_node, "held": len(held_ids),
            "rerun_after_s": round(redelivered, 1), "job_done_after_s": round(completed, 1),
            "rerun_by": sorted({rerun[i]["worker"] for i in held_ids}),
            "judged_by": judged, "victim_restarts": new_restarts}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="smoke_checks.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("report"); p.add_argument("file"); p.set_defaults(fn=cmd_report)
    p = sub.add_parser("api-upload"); p.add_argument("video")
    p.add_argument("--timeout", type=float, default=300); p.set_defaults(fn=cmd_api_upload)
    p = sub.add_parser("flower"); p.add_argument("job"); p.set_defaults(fn=cmd_flower)
    p = sub.add_parser("metrics"); p.add_argument("--expect", nargs="*", default=[])
    p.set_defaults(fn=cmd_metrics)
    p = sub.add_parser("scale"); p.add_argument("video"); p.add_argument("--jobs", type=int, default=3)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600); p.set_defaults(fn=cmd_scale)
    p = sub.add_parser("kill"); p.add_argument("mode", choices=["worker", "container"])
    p.add_argument("video"); p.add_argument("--bound", type=float, required=True)
    p.add_argument("--fresh-s", type=float, default=1.0)
    p.add_argument("--timeout", type=float, default=600); p.set_defaults(fn=cmd_kill)
    args = parser.parse_args(argv)
    try:
        print(json.dumps(args.fn(args)))
    except CheckFailed as exc:
        print(f"CHECK FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
