"""The ``zroact`` command, over client.py and local.py.

Exit codes: 0 succeeded / completed_with_errors; 1 failed / cancelled; 2 usage or configuration
error; 3 bad input (video, model, labels, prompt).
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import click

from .config import (STAGE2_CONCURRENCY_RANGE, Settings, load_settings, timeout_problems,
                     use_settings)
from .errors import ClusterUnavailableError, ConfigError, InputError, ZroactError, first_line
from .models import JobReport
from .redisconn import TRANSIENT_ERRORS

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INPUT = 0, 1, 2, 3
DEFAULT_CONCURRENCY = {"control": 4, "stage1": 1}


def _settings(**flags: Any) -> Settings:
    """Settings from the environment, with the CLI flags that were given on top."""
    return load_settings(**{k: v for k, v in flags.items() if v is not None})


def _cluster(redis_url: str | None):
    """A client of the running cluster, once its Redis answers (a down cluster is one line,
    not a minute of retries and a traceback)."""
    import redis

    from .client import Client
    from .urls import masked

    settings = _settings(redis_url=redis_url)
    probe = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=3)
    try:
        probe.ping()
    except redis.RedisError as exc:
        raise ClusterUnavailableError(
            f"the cluster's Redis at {masked(settings.redis_url)} does not answer "
            f"({first_line(exc)}): is it running? (--redis-url / ZROACT_REDIS_URL)") from exc
    finally:
        probe.close()
    return Client(settings=settings)


def _fail(message: str, code: int) -> None:
    click.echo(f"zroact: error: {message}", err=True)
    sys.exit(code)


def handles_errors(func):
    """Turn zroact errors into one stderr line and an exit code; tracebacks only with --debug."""
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return func(*args, **kwargs)
        except (ZroactError, OSError) as exc:
            if debug:
                traceback.print_exc()
            code = EXIT_INPUT if isinstance(exc, InputError) else (
                EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED)
            _fail(str(exc), code)
        except TRANSIENT_ERRORS as exc:  # Redis went away mid-command, after its retries
            if debug:
                traceback.print_exc()
            _fail(f"lost the cluster's Redis: {first_line(exc)}", EXIT_FAILED)
        except KeyboardInterrupt:  # Ctrl-C: a submitted job goes on (zroact cancel ends it)
            _fail("interrupted", 130)
    return wrapper


def check_model_isolated(settings: Settings):
    """Load the model in a spawned process: the caller (a worker parent) must never hold a
    session. Its description and its ``registry.ModelInfo``."""
    from .stage1.detector import check_model

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(check_model, settings).result()


def check_vlm(settings: Settings) -> str:
    """The VLM answers its model list before a local job starts (a wrong ``--vlm-url`` would
    otherwise cost every slot its retries); its description."""
    from .errors import VLMError
    from .stage2.vlm import VLMClient

    client = VLMClient(settings.vlm_url, model=settings.vlm_model, timeout_s=5, max_retries=0,
                       backoff_max_s=0.1, max_tokens=settings.vlm_max_tokens)
    try:
        server = client.server
    except VLMError as exc:
        raise ConfigError(f"the VLM at {settings.vlm_url} does not answer ({exc}): start it, "
                          "fix --vlm-url, or leave it out to skip Stage 2") from exc
    finally:
        client.close()
    context = f", context {server.max_model_len} tokens" if server.max_model_len else ""
    return f"{server.model} ({server.rule.name} image tokens{context})"


def event_line(event) -> str | None:
    """A slot's line for ``--follow`` (keyframe events are for ``--json-lines``)."""
    if event.kind != "slot":
        return None
    slot = event.slot
    head = f"slot {slot.slot} (frames {', '.join(map(str, slot.keyframes))}):"
    if slot.verdict is not None:
        v = slot.verdict
        return (f"{head} {v.action} | {'confirmed' if v.confirmed else 'not confirmed'} | "
                f"{v.confidence:.2f} — {v.reason}")
    return f"{head} error: {slot.error}" if slot.error else f"{head} Stage 1 only"


def render(video: Path, report: JobReport, annotate: Path | None, sheet: Path | None) -> None:
    """Draw the report when asked (needs the video on this machine and a decoded video)."""
    if (annotate is None and sheet is None) or report.video is None:
        return
    from . import render as draw

    if annotate is not None:
        click.echo(f"annotated video: {draw.annotate_video(video, report, annotate)}", err=True)
    if sheet is not None:
        click.echo(f"contact sheet: {draw.contact_sheet(video, report, sheet)}", err=True)


def finish(report: JobReport, json_out: Path | None) -> None:
    """Print the summary, write OUT, exit with the report's code."""
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.model_dump(mode="json"), indent=2))
    verdicts = sum(1 for s in report.slots if s.verdict is not None)
    errors = sum(1 for s in report.slots if s.error) + sum(1 for k in report.keyframes if k.error)
    frames = report.video.frames if report.video else 0
    click.echo(f"job {report.job_id}: {report.status} in {report.timings.get('total', 0):.2f} s — "
               f"{frames} frames, {len(report.keyframes)} keyframes, {len(report.slots)} slots, "
               f"{verdicts} verdicts, {errors} errors; stage 2 {report.stage2.status}"
               + (f" ({report.stage2.model})" if report.stage2.model else ""))
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    if json_out is not None:
        click.echo(f"report: {json_out}")
    if report.error is not None:
        _fail(report.error.message, EXIT_INPUT if report.error.input_error else EXIT_FAILED)
    if report.status in ("failed", "cancelled"):
        _fail(f"job {report.job_id} {report.status}", EXIT_FAILED)


@click.group()
@click.version_option(package_name="zroact", prog_name="zroact")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(debug: bool) -> None:
    """zroact: two-stage video inference on Celery + Redis."""


@main.command()
@click.argument("video", type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path), help="Stage 1 ONNX model [ZROACT_MODEL].")
@click.option("--labels", type=click.Path(path_type=Path), help="Class names, one per line.")
@click.option("--vlm-url", help="vLLM server root, e.g. http://127.0.0.1:8000 (none: skip Stage 2).")
@click.option("--vlm-model", help="Served model name (default: the only one listed).")
@click.option("--prompt", help="Stage 2 prompt.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the report here.")
@click.option("--timeout", type=float, default=None, help="Give up waiting after this many seconds.")
@click.option("--annotate", type=click.Path(path_type=Path), help="Write the video with boxes and verdicts (mp4).")
@click.option("--contact-sheet", type=click.Path(path_type=Path), help="Write one PNG of the slots.")
@handles_errors
def run(video: Path, model: Path | None, labels: Path | None, vlm_url: str | None,
        vlm_model: str | None, prompt: str | None, json_out: Path | None,
        timeout: float | None, annotate: Path | None, contact_sheet: Path | None) -> None:
    """Run one job on a throwaway local Redis and local workers, then shut them down."""
    from .local import EmbeddedRedis, LocalCluster
    from .media.video import probe, resolve_video_path

    settings = _settings(model=model, labels=labels, vlm_url=vlm_url, vlm_model=vlm_model,
                         prompt=prompt)
    from .client import check_prompt

    check_prompt(settings.prompt, settings.max_prompt_chars)
    path = resolve_video_path(video, settings.media_root)
    probe(path, max_pixels=settings.max_pixels, max_frames=settings.max_frames,
          max_duration_s=settings.max_duration_s)
    click.echo(f"stage 1 model: {check_model_isolated(settings)[0]}", err=True)
    if settings.vlm_url is not None:
        click.echo(f"stage 2 model: {check_vlm(settings)}", err=True)
    env = {f"ZROACT_{k.upper()}": str(v) for k, v in
           {"model": settings.model, "labels": settings.labels, "vlm_url": settings.vlm_url,
            "vlm_model": settings.vlm_model}.items() if v is not None}
    with EmbeddedRedis() as server:
        from .client import Client

        cluster = LocalCluster(server.url, env=env).start()
        client = Client(server.url, settings=settings)
        report = None
        try:
            cluster.wait_ready(client.app)
            job = client.submit(path, prompt=settings.prompt)
            click.echo(f"job {job.id} submitted", err=True)
            from .progress import follow

            report = follow(job, sys.stderr, timeout)
        finally:
            cluster.stop()
            client.close()
            # The workers' logs go with the throwaway cluster, unless the job went wrong.
            if report is not None and report.status in ("succeeded", "completed_with_errors"):
                cluster.remove_logs()
            else:
                click.echo(f"workers' logs kept in {cluster.log_dir}", err=True)
    render(path, report, annotate, contact_sheet)
    finish(report, json_out)


@main.command()
@click.argument("video")
@click.option("--prompt", help="Stage 2 prompt.")
@click.option("--priority", type=int, default=None, help="0 (most urgent) to 9 [ZROACT_DEFAULT_PRIORITY, 5].")
@click.option("--wait", "wait_", is_flag=True, help="Wait for the report.")
@click.option("--follow", is_flag=True, help="Print each slot's verdict as it is decided, then wait.")
@click.option("--json-lines", is_flag=True, help="With --follow: every event as one JSON line.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the report here.")
@click.option("--redis-url", help="The cluster's Redis [ZROACT_REDIS_URL].")
@click.option("--timeout", type=float, default=None, help="With --wait: give up after this long.")
@click.option("--annotate", type=click.Path(path_type=Path), help="With --wait: write the annotated video.")
@click.option("--contact-sheet", type=click.Path(path_type=Path), help="With --wait: write a PNG of the slots.")
@handles_errors
def submit(video: str, prompt: str | None, priority: int | None, wait_: bool, follow: bool,
           json_lines: bool, json_out: Path | None, redis_url: str | None, timeout: float | None,
           annotate: Path | None, contact_sheet: Path | None) -> None:
    """Submit a job to a running cluster; prints its id."""
    if json_lines and not follow:
        raise click.UsageError("--json-lines needs --follow")
    client = _cluster(redis_url)
    job = client.submit(video, prompt=prompt, priority=priority)
    click.echo(job.id)
    if follow:
        for event in job.events():
            line = event.model_dump_json() if json_lines else event_line(event)
            if line is not None:
                click.echo(line)
        report = job.report()
        render(Path(video), report, annotate, contact_sheet)
        finish(report, json_out)
    elif wait_ or json_out is not None or annotate is not None or contact_sheet is not None:
        from .progress import follow

        report = follow(job, sys.stderr, timeout)
        render(Path(video), report, annotate, contact_sheet)
        finish(report, json_out)


@main.command()
@click.argument("job_id")
@click.option("--redis-url", help="The cluster's Redis [ZROACT_REDIS_URL].")
@handles_errors
def status(job_id: str, redis_url: str | None) -> None:
    """Print a job's state and progress as JSON."""
    click.echo(_cluster(redis_url).job(job_id).status().model_dump_json())


@main.command()
@click.argument("job_id")
@click.option("--redis-url", help="The cluster's Redis [ZROACT_REDIS_URL].")
@handles_errors
def cancel(job_id: str, redis_url: str | None) -> None:
    """Cancel a job: pending tasks are revoked, running ones stop at their next step."""
    job = _cluster(redis_url).job(job_id)
    click.echo(f"job {job_id}: " + ("cancelled" if job.cancel() else "already ended"))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", type=int, default=8080, show_default=True)
@handles_errors
def api(host: str, port: int) -> None:
    """Serve the HTTP job API (docs/api.md): upload, status, report, cancel."""
    from .api import serve

    serve(_settings(), host=host, port=port)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: all).")
@click.option("--port", type=int, default=9808, show_default=True)
@click.option("--redis-url", help="The cluster's Redis [ZROACT_REDIS_URL].")
@handles_errors
def metrics(host: str, port: int, redis_url: str | None) -> None:
    """Serve Prometheus metrics (queue depth, jobs, VLM errors, task latencies) on /metrics."""
    import logging

    from .metrics import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(_settings(redis_url=redis_url), host, port)


def stage2_concurrency(settings: Settings, flag: int | None) -> int:
    """The flag if given; else planned from the VLM server's capacity (logged), else configured."""
    from .stage2.capacity import plan_concurrency, read_capacity

    low, high = STAGE2_CONCURRENCY_RANGE
    configured = flag or settings.stage2_concurrency
    if not low <= configured <= high and not settings.stage2_concurrency_override:
        raise ConfigError(f"stage2 concurrency {configured} is outside {low}-{high} (the VRAM "
                          "budget); set ZROACT_STAGE2_CONCURRENCY_OVERRIDE=true to allow it")
    if settings.vlm_url is None:
        click.echo("warning: no ZROACT_VLM_URL; this worker will fail Stage 2 requests", err=True)
        return configured
    if flag is not None:
        return flag
    try:
        cap = read_capacity(settings.vlm_url, settings.vlm_max_num_seqs)
    except Exception as exc:  # noqa: BLE001 - the server may start after us: plan without it
        click.echo(f"stage2 concurrency {configured}: VLM capacity unknown ({type(exc).__name__})",
                   err=True)
        return configured
    from .stage2.vlm import answer_token_bound  # imported where used, like read_capacity

    reply = settings.vlm_max_tokens or answer_token_bound()
    tokens = 3 * settings.vlm_tokens_per_image + reply + 512  # images, reply, text
    planned, line = plan_concurrency(
        cap, tokens_per_request=tokens, workers_sharing=settings.stage2_workers_per_vlm,
        configured=configured, override=settings.stage2_concurrency_override,
        latency_growth=settings.vlm_latency_growth)
    click.echo(line, err=True)
    return planned


@main.command()
@click.argument("role", type=click.Choice(["stage1", "stage2", "control"]))
@click.option("--concurrency", "-c", type=int, help="Pool processes (stage2: ZROACT_STAGE2_CONCURRENCY).")
@click.option("--name", "-n", default=None, help="Node name (default ROLE@%h).")
@click.option("--loglevel", "-l", default="INFO")
@handles_errors
def worker(role: str, concurrency: int | None, name: str | None, loglevel: str) -> None:
    """Start a Celery worker with this role's queue, pool and concurrency."""
    settings = _settings(preload_detector=role == "stage1")
    if role == "stage1":
        text, info = check_model_isolated(settings)
        click.echo(f"stage 1 model: {text}", err=True)
        from .redisconn import TRANSIENT_ERRORS, connect
        from .stage1 import registry

        try:
            registry.check_joins(connect(settings.redis_url), info)  # one model per queue
        except TRANSIENT_ERRORS as exc:  # the worker waits for Redis; the next start checks
            click.echo(f"warning: the model could not be checked against the queue's: {exc}",
                       err=True)
        registry.serving = info  # published by the heartbeat (liveness.py)
    if role == "control":
        from .control import media_roots

        media_roots.serving = str(Path(settings.media_root).resolve()) if settings.media_root else ""
    if role == "stage2":
        concurrency = stage2_concurrency(settings, concurrency)
    use_settings(settings)  # before the app is imported: celeryconfig reads it
    for problem in timeout_problems(settings):
        click.echo(f"warning: {problem}", err=True)
    from .app import app

    pool = "prefork"
    if role == "stage1" and settings.stage1_max_batch > 1:
        # Batching: one process, a thread per reserved task, so the prefetch window (threads x
        # multiplier 1) holds a whole batch and the batcher can merge their clips.
        pool, concurrency = "threads", settings.stage1_max_batch
    app.worker_main([
        "worker", "-Q", role, "-P", pool, "-c", str(concurrency or DEFAULT_CONCURRENCY[role]),
        "-n", name or f"{role}@%h", "-E", "--prefetch-multiplier", "1", "-l", loglevel,
    ])


if __name__ == "__main__":
    main()
