"""The HTTP job API (``zroact api``): FastAPI over the same ``Client`` as Python and the CLI.

::

    POST   /v1/jobs               multipart upload (field ``video``) or a ``path`` under MEDIA_ROOT
    GET    /v1/jobs/{id}          JobStatus
    GET    /v1/jobs/{id}/report   JobReport once the job has ended; 409 (with the status) before
    DELETE /v1/jobs/{id}          cancel
    GET    /healthz               200 while Redis answers, 503 otherwise (no auth)

Uploads are streamed to ``MEDIA_ROOT/uploads/<uuid><suffix>`` chunk by chunk (never held whole in
memory), and refused with 413 as soon as they pass ``API_MAX_UPLOAD_BYTES`` (the partial file is
deleted). Videos are checked as ``zroact run`` checks them (``resolve_video_path`` + ``probe``);
a bad one answers 422 with the same one-line message, naming the file as the client named it.
Every ``/v1`` route needs ``Authorization: Bearer <API_TOKEN>`` unless ``API_AUTH_DISABLED``.
docs/api.md has the details and curl examples.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import secrets
import uuid
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, BinaryIO, Literal
from urllib.parse import parse_qsl

import anyio
import redis
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from kombu.exceptions import OperationalError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import events
from .control import media_roots
from .media import streams
from .client import Client, Job, check_prompt
from .config import Settings, get_settings
from .errors import ConfigError, InputError, JobNotFoundError, VideoNotFoundError
from .media.video import probe, resolve_video_path
from .models import JobReport, JobStatus

log = logging.getLogger(__name__)

_Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(
    HTTPBearer(auto_error=False, description="The value of ZROACT_API_TOKEN."))]

UPLOAD_DIR = "uploads"
"""Uploads land in ``MEDIA_ROOT/uploads`` (the control workers read them from the same volume)."""
FORM_FIELDS = ("video", "path", "prompt", "priority")
_MAX_JSON_BYTES = 1024 * 1024
"""Largest body of a ``path`` request (JSON or urlencoded)."""
_MAX_PART_HEADER_BYTES = 16 * 1024
_SUFFIX = re.compile(r"\.[a-z0-9]{1,10}")


# --- wire models (the OpenAPI spec is generated from these) ----------------------------------------

def _utf8(value: str | None) -> str | None:
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (a JSON "\ud800" escape) cannot travel on
            raise ValueError("is not valid Unicode text") from None
    return value


class JobRequest(BaseModel):
    """A job on a video already under MEDIA_ROOT (``application/json`` or urlencoded form)."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, description="The video, relative to MEDIA_ROOT (or absolute "
                      "inside it); `..` and symlinks may not lead out of MEDIA_ROOT. Or a live "
                      "source's URL (rtsp://, http(s)://) under a ZROACT_STREAM_SOURCES prefix.")
    prompt: str | None = Field(None, description="Stage 2 prompt; the server's default if absent.")
    priority: int | None = Field(None, ge=0, le=9, description="0 (most urgent) to 9; the "
                                 "server's DEFAULT_PRIORITY (5) if absent. Celery on Redis has 4 "
                                 "levels: 0-2, 3-5, 6-8, 9.")

    @field_validator("path", "prompt")
    @classmethod
    def _encodable(cls, value: str | None) -> str | None:
        return _utf8(value)

    @field_validator("priority", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # pydantic would take true as 1; the schema says integer
            raise ValueError("must be an integer 0-9, not a boolean")
        return value


class JobAccepted(BaseModel):
    job_id: str
    url: str = Field(description="Where to follow the job: `/v1/jobs/<job_id>`.")


class CancelResult(BaseModel):
    job_id: str
    cancelled: bool = Field(description="False when the job had already ended or was stopping.")


class ReportPending(BaseModel):
    detail: str
    status: JobStatus


class ErrorBody(BaseModel):
    detail: str = Field(description="One line saying what is wrong.")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    detail: str | None = None


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "Malformed request body", 401: "Missing or wrong bearer token",
            404: "No such job (never submitted, or its records expired)",
            413: "Upload over API_MAX_UPLOAD_BYTES, or a form field too large",
            415: "Unsupported Content-Type", 422: "Bad input: video, path, prompt or priority",
            500: "The server cannot store uploads (a setup error: MEDIA_ROOT/uploads)",
            503: "Redis (job store and broker) unavailable",
            507: "The upload could not be stored: no space left (or over a disk quota)"}
    out: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorBody, "description": text[code]} for code in codes}
    if 401 in out:
        out[401]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}}
    return out


def _job_request_schema(max_prompt_chars: int) -> dict[str, Any]:
    """JobRequest's JSON Schema with the prompt rule check_prompt enforces (not blank, capped)."""
    schema = JobRequest.model_json_schema()
    schema["properties"]["prompt"]["anyOf"][0].update(
        minLength=1, maxLength=max_prompt_chars, pattern=r"\S")
    return schema


def _submit_body_schema(max_prompt_chars: int) -> dict[str, Any]:
    """POST /v1/jobs reads its body itself (to stream uploads), so its schema is written here."""
    text = {}
    for name, spec in _job_request_schema(max_prompt_chars)["properties"].items():
        text[name] = {k: v for k, v in spec.items() if k not in ("anyOf", "default")}
        text[name].update(spec["anyOf"][0] if "anyOf" in spec else {})  # no null in a form
    upload = {
        "type": "object",
        "properties": {"video": {"type": "string", "format": "binary",
                                 "description": "The video file (streamed to MEDIA_ROOT/uploads)."},
                       **text},
        "additionalProperties": False,
        "oneOf": [{"required": ["video"]}, {"required": ["path"]}],
        "description": "Exactly one of `video` (a file) and `path`.",
    }
    form = {"type": "object", "properties": text, "required": ["path"],
            "additionalProperties": False}
    return {"required": True, "content": {
        "multipart/form-data": {"schema": upload,
                                "encoding": {"video": {"contentType": "application/octet-stream"}}},
        "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}},
        "application/x-www-form-urlencoded": {"schema": form},
    }}


def _openapi(app: FastAPI, max_prompt_chars: int) -> dict[str, Any]:
    """FastAPI's spec without its automatic 422 (HTTPValidationError, a shape this app never
    sends): routes that can answer 422 declare it with ErrorBody, and a str path parameter cannot
    fail validation. Plus the JobRequest schema, which only the hand-written request body names."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                         description=app.description, routes=app.routes)
    for operation in (op for item in schema["paths"].values() for op in item.values()):
        response = operation.get("responses", {}).get("422")
        if response and "HTTPValidationError" in str(response):
            del operation["responses"]["422"]
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    components["JobRequest"] = _job_request_schema(max_prompt_chars)
    app.openapi_schema = schema
    return schema


# --- errors --------------------------------------------------------------------------------------

class Reject(Exception):
    """Answer ``status`` with ``{"detail": detail}``."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, detail)
        self.status, self.detail, self.headers = status, detail, headers


def _as_named(exc: InputError, name: str) -> InputError:
    """The same error, naming the video as the client named it (not the server's own path)."""
    return type(exc)(name, exc.reason)


def _first_error(exc: ValidationError | RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return f"{loc}: {first.get('msg', 'invalid')}"


# --- the upload ----------------------------------------------------------------------------------

@dataclass
class _Form:
    """What a multipart body carried. The video part went straight to ``upload`` on disk."""

    fields: dict[str, str] = field(default_factory=dict)
    upload: Path | None = None
    filename: str = ""
    size: int = 0


class _MultipartReader:
    """Streams one multipart body: the ``video`` part to a new file under ``uploads``, chunk by
    chunk; the other fields into memory (capped). Raises Reject; the caller deletes ``upload``."""

    def __init__(self, uploads: Path, max_upload: int, max_field: int) -> None:
        self.uploads, self.max_upload, self.max_field = uploads, max_upload, max_field
        self.form = _Form()
        self.ops: list[tuple[str, bytes]] = []
        self.handle: BinaryIO | None = None
        self.ended = False
        self._name: str | None = None
        self._is_file = False
        self._text = bytearray()
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._header_bytes = 0

    # python-multipart callbacks (synchronous, inside parser.write) --------------------------
    def on_part_begin(self) -> None:
        self._name, self._is_file, self._disposition, self._header_bytes = None, False, b"", 0
        self._text.clear()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]
        self._count_header(end - start)

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]
        self._count_header(end - start)

    def _count_header(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > _MAX_PART_HEADER_BYTES:
            raise Reject(400, f"a multipart part's headers are over {_MAX_PART_HEADER_BYTES} bytes")

    def on_header_end(self) -> None:
        if bytes(self._header_name).strip().lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise Reject(400, 'a multipart part has no Content-Disposition "name"')
        name = options[b"name"].decode("utf-8", "replace")
        if name not in FORM_FIELDS:
            raise Reject(422, f"unknown form field {name[:100]!r} (expected one of "
                              f"{', '.join(FORM_FIELDS)})")
        if name in self.form.fields or (name == "video" and self.form.upload is not None):
            raise Reject(422, f"form field {name!r} is given twice")
        if name != "video" and b"filename" in options:
            raise Reject(422, f"form field {name!r} must be text, not a file")
        self._name, self._is_file = name, name == "video"
        if self._is_file:
            raw = options.get(b"filename", b"").decode("utf-8", "replace")
            # The client's name, for messages only: its last component, kept short.
            self.form.filename = PurePosixPath(raw.replace("\\", "/")).name[:200] or "video"
            suffix = PurePosixPath(self.form.filename).suffix.lower()
            self.form.upload = self.uploads / (uuid.uuid4().hex +
                                               (suffix if _SUFFIX.fullmatch(suffix) else ""))
            self.ops.append(("open", b""))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._is_file:
            self.form.size += len(chunk)
            if self.form.size > self.max_upload:
                raise Reject(413, f"upload is over API_MAX_UPLOAD_BYTES {self.max_upload}")
            self.ops.append(("write", chunk))
        else:
            self._text += chunk
            if len(self._text) > self.max_field:
                raise Reject(413, f"form field {self._name!r} is over {self.max_field} bytes")

    def on_part_end(self) -> None:
        if self._is_file:
            self.ops.append(("close", b""))
        elif self._name is not None:
            try:
                self.form.fields[self._name] = self._text.decode("utf-8")
            except UnicodeDecodeError:
                raise Reject(422, f"form field {self._name!r} is not UTF-8") from None

    def on_end(self) -> None:
        self.ended = True

    # file operations, run in a worker thread -------------------------------------------------
    def apply(self, ops: list[tuple[str, bytes]]) -> None:
        for op, data in ops:
            if op == "open":
                self.handle = open(self.form.upload, "xb")  # noqa: SIM115 - closed by "close"
            elif op == "write":
                self.handle.write(data)
            else:
                self.handle.close()
                self.handle = None

    def discard(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None
        if self.form.upload is not None:
            self.form.upload.unlink(missing_ok=True)

    async def read(self, request: Request, boundary: bytes) -> _Form:
        callbacks = {name: getattr(self, name) for name in (
            "on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value",
            "on_header_end", "on_headers_finished", "on_end")}
        parser = MultipartParser(boundary, callbacks)
        try:
            async for chunk in request.stream():
                parser.write(chunk)  # a Reject here leaves the partial file to discard()
                ops, self.ops = self.ops, []
                if ops:
                    try:
                        await anyio.to_thread.run_sync(self.apply, ops)
                    except OSError as exc:
                        log.error("cannot store upload %s: %s", self.form.upload, exc)
                        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                            raise Reject(507, f"cannot store the upload: {exc.strerror}") from None
                        # Not the upload's fault: the upload directory is gone or not writable.
                        raise Reject(500, "server setup error: cannot store uploads in "
                                          f"MEDIA_ROOT/{UPLOAD_DIR}: {exc.strerror}") from None
                if self.ended:
                    break
            parser.finalize()
        except FormParserError as exc:
            raise Reject(400, f"malformed multipart body: {exc}") from None
        if not self.ended or self.handle is not None:
            raise Reject(400, "the multipart body ends before its closing boundary")
        return self.form


# --- the app -------------------------------------------------------------------------------------

@dataclass
class _Api:
    """What the routes share: settings, the Client, where uploads go."""

    settings: Settings
    client: Client
    root: Path
    uploads: Path
    health: redis.Redis
    max_field: int = 64 * 1024

    @property
    def form_slack(self) -> int:
        """Bytes a multipart body may carry beyond the video: the text fields and boundaries."""
        return 3 * self.max_field + 64 * 1024

    def check_video(self, path: str, name: str) -> Path:
        """``zroact run``'s checks, run on the server's copy; errors name the file as ``name``."""
        s = self.settings
        try:
            resolved = resolve_video_path(path, self.root)
            probe(resolved, max_pixels=s.max_pixels, max_frames=s.max_frames,
                  max_duration_s=s.max_duration_s)
        except InputError as exc:
            raise _as_named(exc, name) from None
        except (OSError, ValueError) as exc:  # NUL bytes, names too long, unreadable
            raise VideoNotFoundError(name, f"not a usable path ({type(exc).__name__})") from None
        return resolved

    def submit(self, video: Path, prompt: str | None, priority: int | None) -> Job:
        # Relative to MEDIA_ROOT: the control workers resolve it against their own mount.
        return self.client.submit(str(video.relative_to(self.root)), prompt=prompt,
                                  priority=priority)


def _check_fields(fields: dict[str, Any]) -> JobRequest:
    """The text fields of a multipart body, checked as JobRequest checks them (its ``path`` is a
    placeholder here: the caller checks the real one on disk)."""
    try:
        return JobRequest.model_validate({"path": "-", **fields})
    except ValidationError as exc:
        raise Reject(422, _first_error(exc)) from None


def _check_settings(settings: Settings) -> tuple[Path, Path]:
    """MEDIA_ROOT and its (writable) upload directory; ConfigError when the API cannot serve."""
    if settings.media_root is None:
        raise ConfigError("the HTTP API needs ZROACT_MEDIA_ROOT: uploads are stored under it and "
                          "job paths are resolved against it")
    root = Path(settings.media_root).resolve()
    if not root.is_dir():
        raise ConfigError(f"ZROACT_MEDIA_ROOT {root} is not a directory")
    uploads = root / UPLOAD_DIR
    try:
        uploads.mkdir(exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the upload directory {uploads}: {exc.strerror}") from None
    # Writing a file is the only test of writing one: os.access checks mode bits against the real
    # uid, which can pass where creating a file fails (a read-only or root-squashed mount, ACLs,
    # a directory replaced under a bind mount).
    probe_file = uploads / f".write-check-{uuid.uuid4().hex}"
    try:
        probe_file.open("xb").close()
        probe_file.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write in the upload directory {uploads} as uid {os.getuid()}: "
                          f"{exc.strerror} (it must be writable by this uid: docs/deployment.md)"
                          ) from None
    token = settings.api_token.get_secret_value() if settings.api_token else ""
    if not settings.api_auth_disabled and not token.strip():
        raise ConfigError("the HTTP API needs ZROACT_API_TOKEN (or ZROACT_API_AUTH_DISABLED=true "
                          "to run it without authentication)")
    return root, uploads


def _auth_dependency(settings: Settings) -> list[Any]:
    """The bearer check for /v1 (none when auth is disabled). Only a digest of the token is kept."""
    if settings.api_auth_disabled:
        log.warning("HTTP API authentication is disabled (ZROACT_API_AUTH_DISABLED)")
        return []
    expected = hashlib.sha256(settings.api_token.get_secret_value().strip().encode("utf-8")).digest()

    def require_token(credentials: _Credentials) -> None:
        # Digests of equal length, compared in constant time; header bytes are latin-1 on the wire.
        given = hashlib.sha256(credentials.credentials.encode("latin-1", "replace")
                               if credentials else b"").digest()
        if credentials is None or not secrets.compare_digest(given, expected):
            raise HTTPException(401, "missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    return [Depends(require_token)]


SSE_KEEPALIVE_S = 15.0
"""A comment line this often while nothing happens, so proxies keep the connection open."""


def _sse(api: _Api, job_id: str, since: str):
    """The SSE body: each event as it is recorded, a keep-alive comment when idle, then end."""
    r, job = api.client.jobs.r, Job(api.client, job_id)
    for event in events.follow(r, job_id, since, last_seq=events.seq_of(r, job_id, since),
                               ended=lambda: job.report() is not None,
                               keepalive_s=SSE_KEEPALIVE_S):
        if event is None:
            yield ": keep-alive\n\n"
        else:
            yield f"id: {event.id}\nevent: {event.kind}\ndata: {event.model_dump_json()}\n\n"


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API over the cluster behind ``settings.redis_url``; ConfigError if it cannot serve."""
    settings = settings or get_settings()
    root, uploads = _check_settings(settings)
    api = _Api(settings, Client(settings=settings), root, uploads,
               redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2,
                                    socket_keepalive=True),
               max_field=max(64 * 1024, 4 * settings.max_prompt_chars + 16))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        api.client.close()
        api.health.close()

    app = FastAPI(title="zroact job API", version="1", lifespan=lifespan,
                  summary="Two-stage video inference jobs over HTTP (the same Client as Python).")
    app.state.api = api
    app.openapi = lambda: _openapi(app, settings.max_prompt_chars)  # type: ignore[method-assign]

    @app.exception_handler(Reject)
    async def _reject(_: Request, exc: Reject) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Any:
        if exc.status_code == 405:  # Allow: every method of the path, not only the first route's
            path = request.scope["path"]
            allowed = {m for route in app.routes if isinstance(route, APIRoute)
                       and route.path_regex.match(path) for m in route.methods}
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(sorted(allowed))}
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _first_error(exc)}, 422)

    @app.exception_handler(JobNotFoundError)
    async def _not_found(_: Request, exc: JobNotFoundError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 404)

    @app.exception_handler(redis.RedisError)
    @app.exception_handler(OperationalError)
    async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s: Redis unavailable (%s)", request.method, request.url.path,
                  type(exc).__name__)
        return JSONResponse({"detail": "Redis (job store and broker) is unavailable"}, 503)

    v1 = APIRouter(prefix="/v1", dependencies=_auth_dependency(settings), tags=["jobs"])

    @v1.post("/jobs", status_code=202, response_model=JobAccepted,
             responses=_errors(400, 401, 413, 415, 422, 500, 503, 507),
             openapi_extra={"requestBody": _submit_body_schema(settings.max_prompt_chars)})
    async def submit_job(request: Request) -> JobAccepted:
        """Submit a job: upload the video (multipart field `video`) or name a `path` under
        MEDIA_ROOT (multipart, JSON or urlencoded), plus an optional `prompt` and `priority`."""
        problem = await run_in_threadpool(media_roots.mismatch, api.health, str(api.root))
        if problem is not None:  # every job would fail "no such file": refuse before reading
            raise Reject(503, problem)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == "multipart/form-data":
            return await _submit_upload(api, request)
        if kind in ("application/json", "application/x-www-form-urlencoded"):
            return await _submit_path(api, request, kind)
        raise Reject(415, "send multipart/form-data (upload or path), application/json or "
                          "application/x-www-form-urlencoded (path)")

    @v1.get("/jobs/{job_id}", response_model=JobStatus, responses=_errors(401, 404, 503))
    def job_status(job_id: str) -> JobStatus:
        """State and Stage 1 / Stage 2 progress."""
        return Job(api.client, job_id).status()

    @v1.get("/jobs/{job_id}/report", response_model=JobReport,
            responses={**_errors(401, 404, 422, 503), 409: {
                "model": ReportPending,
                "description": "The job has not ended: no report yet (body: its status)",
                "headers": {"Retry-After": {"schema": {"type": "integer"},
                                            "description": "Seconds before asking again"}}}})
    def job_report(job_id: str, partial: bool = False) -> Any:
        """The report (docs/report.schema.json) once the job has ended; 409 with the status
        before, or with `partial=true` the report of what is recorded so far (`partial: true`,
        `status` `queued` or `running`)."""
        job = Job(api.client, job_id)
        report = job.report(partial=partial)
        if report is not None:
            return report
        status = job.status()  # JobNotFoundError -> 404
        body = ReportPending(detail=f"job {job_id} is {status.state}; no report yet", status=status)
        return JSONResponse(body.model_dump(mode="json"), 409, headers={"Retry-After": "2"})

    @v1.get("/jobs/{job_id}/events", responses={**_errors(401, 404, 422, 503), 200: {
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
        "description": "Server-Sent Events: `id` (resume with Last-Event-ID), `event` (`keyframe`, "
                       "`slot`, `end`), `data` (a JobEvent as JSON); the stream ends after `end`"}})
    def job_events(job_id: str, request: Request, since: str | None = None) -> Any:
        """The job's results as they are recorded (Server-Sent Events): every keyframe, every
        slot, then the end. `Last-Event-ID` (or `since`) resumes after that event."""
        Job(api.client, job_id).status()  # JobNotFoundError -> 404, before the stream starts
        start = request.headers.get("last-event-id") or since or events.START
        if not events.EVENT_ID.fullmatch(start):
            raise Reject(422, f"Last-Event-ID {start[:40]!r} is not an event id (like 1712345678901-0)")
        return StreamingResponse(_sse(api, job_id, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @v1.delete("/jobs/{job_id}", response_model=CancelResult, responses=_errors(401, 404, 503))
    def cancel_job(job_id: str) -> CancelResult:
        """Cancel: pending tasks are revoked, running ones stop at their next step; the report
        (status `cancelled`) follows."""
        cancelled = Job(api.client, job_id).cancel()
        if cancelled:
            log.info("job %s cancelled", job_id)
        return CancelResult(job_id=job_id, cancelled=cancelled)

    app.include_router(v1)

    @app.get("/healthz", response_model=Health, tags=["health"],
             responses={503: {"model": Health, "description": "Redis does not answer"}})
    def healthz() -> Any:
        """200 while Redis answers a PING; 503 otherwise. No authentication."""
        try:
            api.health.ping()
        except redis.RedisError as exc:
            log.warning("health check: Redis does not answer (%s)", type(exc).__name__)
            return JSONResponse(Health(status="unavailable", detail="Redis does not answer")
                                .model_dump(), 503)
        return Health(status="ok")

    return app


async def _submit_upload(api: _Api, request: Request) -> JobAccepted:
    limit = api.settings.api_max_upload_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit + api.form_slack:
        # Refused before reading anything (a client sending `Expect: 100-continue` sends no body).
        raise Reject(413, f"upload is over API_MAX_UPLOAD_BYTES {limit}", {"Connection": "close"})
    _, params = parse_options_header(request.headers.get("content-type"))
    boundary = params.get(b"boundary")
    if not boundary:
        raise Reject(400, "multipart/form-data without a boundary")
    reader = _MultipartReader(api.uploads, limit, api.max_field)
    keep = False
    try:
        try:
            form = await reader.read(request, boundary)
        except Reject as exc:
            if not reader.ended:  # the rest of the body stays unread: answer, then hang up
                exc.headers = {**(exc.headers or {}), "Connection": "close"}
            raise
        except ClientDisconnect:
            log.info("upload abandoned by the client after %d bytes", reader.form.size)
            raise Reject(400, "the client went away during the upload") from None
        if (form.upload is None) == ("path" not in form.fields):
            raise Reject(422, "give exactly one of the form fields video (a file) and path")
        fields = _check_fields({k: v for k, v in form.fields.items() if k != "path"})
        if form.upload is None:  # a path, sent as multipart
            return await _submit_checked(api, form.fields["path"], form.fields["path"], fields)
        job = await _submit_checked(api, f"{UPLOAD_DIR}/{form.upload.name}", form.filename, fields,
                                    uploaded=True)
        keep = True
        log.info("job %s accepted: upload %s (%d bytes)", job.job_id, form.upload.name, form.size)
        return job
    finally:
        if not keep:
            await anyio.to_thread.run_sync(reader.discard)


async def _submit_path(api: _Api, request: Request, kind: str) -> JobAccepted:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_JSON_BYTES:
            raise Reject(413, f"request body is over {_MAX_JSON_BYTES} bytes",
                         {"Connection": "close"})
    try:
        if kind == "application/json":
            fields = JobRequest.model_validate_json(bytes(body))
        else:
            pairs = parse_qsl(bytes(body).decode("utf-8"), keep_blank_values=True,
                              max_num_fields=len(FORM_FIELDS))
            names = [k for k, _ in pairs]
            if len(set(names)) != len(names):
                raise Reject(422, "a form field is given twice")
            fields = JobRequest.model_validate(dict(pairs))
    except ValidationError as exc:
        raise Reject(422, _first_error(exc)) from None
    except (UnicodeDecodeError, ValueError):
        raise Reject(400, "malformed application/x-www-form-urlencoded body (UTF-8, at most "
                          f"{len(FORM_FIELDS)} fields)") from None
    job = await _submit_checked(api, fields.path, fields.path, fields)
    log.info("job %s accepted: path %r", job.job_id, fields.path)
    return job


async def _submit_checked(api: _Api, path: str, name: str, fields: JobRequest,
                          *, uploaded: bool = False) -> JobAccepted:
    """Check prompt and video as ``zroact run`` does (422 with its message), then submit."""
    def check_and_submit() -> Job:
        check_prompt(api.settings.prompt if fields.prompt is None else fields.prompt,
                     api.settings.max_prompt_chars)
        if not uploaded and streams.is_stream(path):  # checked against STREAM_SOURCES
            return api.client.submit(path, prompt=fields.prompt, priority=fields.priority)
        video = api.check_video(path, name)
        return api.submit(video, fields.prompt, fields.priority)

    try:
        job = await run_in_threadpool(check_and_submit)
    except InputError as exc:
        raise Reject(422, str(exc)) from None
    return JobAccepted(job_id=job.id, url=f"/v1/jobs/{job.id}")


def serve(settings: Settings | None = None, *, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Run the API with uvicorn until interrupted (``zroact api``). ConfigError before listening
    if the settings cannot serve (no MEDIA_ROOT, no token)."""
    import uvicorn

    app = create_app(settings)
    with suppress(KeyboardInterrupt):
        uvicorn.run(app, host=host, port=port, server_header=False, log_level="info")
