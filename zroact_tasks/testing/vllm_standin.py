"""A stand-in for vLLM's OpenAI-compatible server, for tests, the demo and the bench.

This is NOT vLLM and runs no model.  It is a small stdlib HTTP server that answers the
routes our code uses with the shapes vLLM uses, so that clients can be tested without a GPU:
``/health``, ``/version``, ``/metrics``, ``/v1/models`` and ``/v1/chat/completions``.
Chat answers are computed from the request (see :func:`expected_content`); faults, holds
and a latency model can be switched on from tests.

Shapes were taken from the vllm-project/vllm sources:

* ``error_shape="nested"`` (default) follows vLLM 0.16 (errors nested since 0.10.1, PR
  #22099; ``reasoning_content`` removed in 0.16, PR #33402), read from main of that time:
  ``vllm/entrypoints/openai/engine/protocol.py`` (ErrorInfo, ErrorResponse, ModelCard,
  ModelPermission, UsageInfo), ``.../chat_completion/protocol.py`` (ChatMessage with
  ``reasoning``, ChatCompletionResponse with ``prompt_token_ids``, choice ``token_ids``),
  ``.../engine/serving.py`` (``create_error_response``, ``_check_model``,
  ``_validate_input`` wording) and ``.../api_server.py`` (``/version``, and the
  RequestValidationError handler, whose errors are typed ``"Bad Request"``).
* ``error_shape="flat"`` follows vLLM <= 0.10.0: ``{"object": "error", "message", ...}``,
  validation errors typed ``"BadRequestError"``, preprocessing errors formatted
  ``f"{e} {e.__cause__}"`` (hence the trailing `` None``), ``reasoning_content`` in messages.
* ``At most N image(s) may be provided in one prompt.`` is vLLM's multimodal limit message
  (``validate_num_items`` in ``vllm/multimodal``); metric names and help texts follow
  ``vllm/v1/metrics/loggers.py``.
* The image path of ``nested`` was checked against a real vLLM 0.32 serving a Qwen2.5-VL
  (tests/test_vllm_contract.py): images cost the prompt tokens of the served model's family
  (``stage2.image_tokens.rule_for(root)``), a prompt past ``max_model_len`` is a 400 ``Input
  length (N) exceeds model's maximum context length (M).``, and bad image parts are refused
  with vLLM's status and wording.

Known simplifications are listed in :data:`DIFFERENCES`.

Run as a process: ``python -m zroact_tasks.testing.vllm_standin --port 8000 --model NAME``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import math
import random
import signal
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, NamedTuple

import cv2
import numpy as np

from ..stage2.image_tokens import TokenRule, rule_for

__all__ = ["VLLMStandIn", "ChatResponse", "expected_content", "image_digest", "FAULTS"]

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
FAULTS = (None, "500", "503", "408", "429", "garbage", "bad_schema", "length", "slow", "400")
SLOW_FAULT_S = 3600.0  # longer than any sane client timeout
DIFFERENCES = (
    "no streaming (stream=true is answered 400), tools, logprobs, guided_json or LoRA models",
    "only data: image URLs; http(s) URLs are refused (400) instead of fetched",
    "text token counts are estimates (len(text)//4 + 8 per message); image tokens follow the "
    "served model family's rule (stage2.image_tokens.rule_for(root)), as vLLM counts them",
    "validation messages are abridged: only messages/role and json_schema.name are checked, "
    "one error per bad message instead of pydantic's whole union dump",
    "json_schema keywords pattern, format, multipleOf, uniqueItems are not honoured",
    "/metrics has only the running/waiting/KV-cache gauges; X-Request-Id is ignored",
    "/version reports a label for the imitated generation, not a real release",
    "vLLM 0.10.1-0.15 nest errors like 'nested' but name the message field reasoning_content "
    "(0.11-0.15 send both); the two generations imitated are 0.32 (nested) and <=0.10.0 (flat)",
    "pydantic validation messages (no messages, json_schema without name) keep tuple locs and "
    "echo the input; vLLM 0.32 prints dotted locs, '<dict of N items>' and sets param",
)
# Per error shape: the vLLM generation it imitates (labels, not exact releases).
_PROFILES = {
    # "nested" was checked against a real vLLM 0.32 (tests/test_vllm_contract.py).
    "nested": {"version": "0.32.0+standin", "reasoning": "reasoning", "token_ids": True,
               "validation_type": "Bad Request", "modern": True,
               "cache_metrics": ("vllm:kv_cache_usage_perc",)},
    "flat": {"version": "0.10.0+standin", "reasoning": "reasoning_content", "token_ids": False,
             "validation_type": "BadRequestError", "modern": False,
             "cache_metrics": ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc")},
}


class ChatResponse(NamedTuple):
    """One chat-completions answer as sent: ``status, body = r``, ``r.body`` or ``r["body"]``."""

    status: int
    body: Any

    def __getitem__(self, key):  # type: ignore[override]
        return getattr(self, key) if isinstance(key, str) else tuple.__getitem__(self, key)


class _Reject(Exception):
    """A request vLLM would refuse; rendered in the configured error shape."""

    def __init__(self, status: int, message: str, err_type: str = "BadRequestError",
                 param: str | None = None, value: Any = None, preprocessing: bool = False):
        super().__init__(message)
        self.status, self.message, self.err_type = status, message, err_type
        self.param, self.value, self.preprocessing = param, value, preprocessing


# ---------------------------------------------------------------- request inspection


def _parts(body: dict) -> list[dict]:
    parts = []
    for msg in body.get("messages") or []:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
        elif isinstance(content, list):
            parts.extend(p for p in content if isinstance(p, dict))
    return parts


def _image_urls(body: dict) -> list[str]:
    urls = []
    for part in _parts(body):
        if part.get("type") == "image_url":
            ref = part.get("image_url")
            urls.append(ref.get("url", "") if isinstance(ref, dict) else str(ref or ""))
    return urls


class _Image(NamedTuple):
    raw: bytes
    width: int
    height: int


def _load_image(url: str, modern: bool = True) -> _Image:
    """The image of a ``data:...;base64,`` URL, else the _Reject vLLM answers it with.

    ``modern``: vLLM 0.32's answers; else 0.10's. Like vLLM, the media type is not checked:
    only whether the bytes decode."""
    if not url.startswith("data:"):
        raise _Reject(400, "The stand-in only accepts data:image/...;base64, URLs "
                           f"(vLLM would fetch this one): {url[:60]!r}", preprocessing=True)
    spec, _, data = url[5:].partition(",")
    if spec.partition(";")[2] != "base64":
        if modern:  # vLLM raises NotImplementedError, which it answers with a 501
            raise _Reject(501, "Only base64 data URLs are supported for now.",
                          "NotImplementedError")
        raise _Reject(400, "Only base64 data URLs are supported for now.", preprocessing=True)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        # vLLM decodes with pybase64, whose only message is this one.
        raise _Reject(400, "Non-base64 digit found" if modern else str(exc),
                      preprocessing=True) from None
    image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR) if raw else None
    if image is None:
        # PIL's message, after vLLM's sanitize_message() strips the object address.
        message = "cannot identify image file <_io.BytesIO object>"
        raise _Reject(400, f"Failed to load image: {message}" if modern else message,
                      preprocessing=True)
    return _Image(raw, image.shape[1], image.shape[0])


def image_digest(body: dict) -> str:
    """First 8 hex chars of sha256 over the request's decoded images, in order.

    An image that does not decode contributes its URL text, so this never raises."""
    h = hashlib.sha256()
    for url in _image_urls(body):
        try:
            h.update(_load_image(url).raw)
        except _Reject:
            h.update(url.encode())
    return h.hexdigest()[:8]


def _prompt_tokens(body: dict, image_tokens: int) -> int:
    """An estimate for the text (~4 characters a token, 8 per message) plus the images' tokens."""
    text = sum(len(p.get("text") or "") for p in _parts(body) if p.get("type") == "text")
    return text // 4 + image_tokens + 8 * len(body.get("messages") or [])


def _schema(body: dict) -> dict | None:
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        return schema if isinstance(schema, dict) else None
    return None


# ------------------------------------------------------------ schema-driven content


def _resolve(schema: Any, root: dict) -> dict:
    """Follows local ``$ref``s (``#/$defs/X``, as pydantic writes them) and merges ``allOf``."""
    if not isinstance(schema, dict):
        return {}
    if isinstance(schema.get("$ref"), str) and schema["$ref"].startswith("#/"):
        target: Any = root
        for key in schema["$ref"][2:].split("/"):
            target = target.get(key, {}) if isinstance(target, dict) else {}
        schema = {**_resolve(target, root), **{k: v for k, v in schema.items() if k != "$ref"}}
    if isinstance(schema.get("allOf"), list):
        merged: dict = {}
        for sub in schema["allOf"]:
            merged.update(_resolve(sub, root))
        schema = {**merged, **{k: v for k, v in schema.items() if k != "allOf"}}
    return schema


def _number(s: dict, kind: str, seed: int) -> int | float:
    lo, hi = s.get("minimum"), s.get("maximum")
    xlo, xhi = s.get("exclusiveMinimum"), s.get("exclusiveMaximum")
    if kind == "integer":
        lows = ([math.ceil(lo)] if lo is not None else []) + (
            [math.floor(xlo) + 1] if isinstance(xlo, (int, float)) else [])
        highs = ([math.floor(hi)] if hi is not None else []) + (
            [math.ceil(xhi) - 1] if isinstance(xhi, (int, float)) else [])
        lo_i = max(lows) if lows else min([0, *highs])
        hi_i = min(highs) if highs else lo_i + 99
        return lo_i + seed % (hi_i - lo_i + 1) if hi_i >= lo_i else lo_i
    lo = lo if lo is not None else (xlo if isinstance(xlo, (int, float)) else None)
    hi = hi if hi is not None else (xhi if isinstance(xhi, (int, float)) else None)
    frac = 0.25 + 0.5 * (seed % 1000) / 1000  # strictly inside, so exclusive bounds hold
    if lo is not None and hi is not None:
        return lo + (hi - lo) * frac
    return lo + 1.0 if lo is not None else (hi - 1.0 if hi is not None else round(frac, 3))


def _string(s: dict, name: str, digest: str) -> str:
    text = f"{name}-{digest}"
    if isinstance(s.get("maxLength"), int) and len(text) > s["maxLength"]:
        text = digest[: s["maxLength"]]
    return text.ljust(s.get("minLength") or 0, "x")


def _generate(schema: Any, root: dict, name: str, digest: str, depth: int = 0) -> Any:
    """A value that fits ``schema``, derived from ``digest`` (what guided decoding ensures)."""
    s, seed = _resolve(schema, root), int(digest, 16)
    if depth > 16:
        return None
    if "const" in s:
        return s["const"]
    if isinstance(s.get("enum"), list) and s["enum"]:
        return s["enum"][seed % len(s["enum"])]
    for key in ("anyOf", "oneOf"):
        if isinstance(s.get(key), list) and s[key]:
            options = [o for o in s[key] if _resolve(o, root).get("type") != "null"] or s[key]
            return _generate(options[0], root, name, digest, depth + 1)
    kind = s.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    kind = kind or ("object" if "properties" in s else "array" if "items" in s else "string")
    if kind == "object":
        props = dict(s.get("properties") or {})
        for key in s.get("required") or []:
            props.setdefault(key, {"type": "string"})  # required but undescribed
        return {k: _generate(v, root, k, digest, depth + 1) for k, v in props.items()}
    if kind == "array":
        count = max(s.get("minItems") or 0, 1)
        count = min(count, s["maxItems"]) if isinstance(s.get("maxItems"), int) else count
        item = s.get("items") or {}
        return [_generate(item, root, name, digest, depth + 1) for _ in range(count)]
    if kind in ("integer", "number"):
        return _number(s, kind, seed)
    if kind == "boolean":
        return seed % 2 == 0
    return None if kind == "null" else _string(s, name, digest)


def expected_content(request_body: dict) -> str:
    """The message content the default generator answers ``request_body`` with."""
    digest = image_digest(request_body)
    schema = _schema(request_body)
    if schema is not None:
        return json.dumps(_generate(schema, schema, "value", digest))
    if (request_body.get("response_format") or {}).get("type") == "json_object":
        return json.dumps({"answer": digest})
    return f"Stand-in answer for {len(_image_urls(request_body))} image(s) [{digest}]."


def _off_schema(body: dict) -> str:
    """Valid JSON that does not fit the request's schema (a required key dropped, or the
    wrong top-level type)."""
    root = _schema(body) or {}
    schema = _resolve(root, root)
    doc = json.loads(expected_content(body)) if root else {"answer": image_digest(body)}
    present = [k for k in schema.get("required") or [] if isinstance(doc, dict) and k in doc]
    if present:
        doc.pop(present[0])
        return json.dumps(doc)
    return json.dumps({"unexpected": [doc]}) if schema.get("type") == "array" else json.dumps([doc])


# ------------------------------------------------------------------- validation


def _pydantic_errors(body: Any) -> list[dict]:
    """The RequestValidationError list FastAPI would raise for the fields we check."""
    if not isinstance(body, dict):
        return [{"type": "model_attributes_type", "loc": ("body",), "input": body,
                 "msg": "Input should be a valid dictionary or object to extract fields from"}]
    if "messages" not in body:
        return [{"type": "missing", "loc": ("body", "messages"), "msg": "Field required",
                 "input": body}]
    msgs, errors = body["messages"], []
    if not isinstance(msgs, list):
        return [{"type": "list_type", "loc": ("body", "messages"), "input": msgs,
                 "msg": "Input should be a valid list"}]
    for i, msg in enumerate(msgs):
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str):
            errors.append({"type": "missing", "loc": ("body", "messages", i, "role"),
                           "msg": "Field required", "input": msg})
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        js = fmt.get("json_schema")
        if isinstance(js, dict) and not isinstance(js.get("name"), str):
            # AnyResponseFormat is a union, so pydantic reports every member's failure.
            where = ("body", "response_format")
            errors.append({"type": "missing", "msg": "Field required", "input": js,
                           "loc": (*where, "ResponseFormat", "json_schema", "name")})
            for member, fields in (
                    ("StructuralTagResponseFormat", ("format",)),
                    ("LegacyStructuralTagResponseFormat", ("structures", "triggers"))):
                errors.append({"type": "literal_error", "loc": (*where, member, "type"),
                               "msg": "Input should be 'structural_tag'", "input": fmt["type"],
                               "ctx": {"expected": "'structural_tag'"}})
                errors += [{"type": "missing", "loc": (*where, member, f), "msg": "Field required",
                            "input": fmt} for f in fields]
    return errors


def _check_request(body: dict, model: str, max_images: int, max_model_len: int,
                   modern: bool = True, rule: TokenRule | None = None) -> int:
    """vLLM's checks after pydantic, in its order: model, stream, images, context length.
    Returns the prompt tokens, images counted by ``rule`` (default: the Qwen2.5-VL family's).
    ``modern``: vLLM 0.32's wording and limits; else 0.10's."""
    if body.get("model") and body["model"] != model:  # no model means the served one
        aliases = f" Valid aliases: {model}." if modern else ""
        raise _Reject(404, f"The model `{body['model']}` does not exist.{aliases}",
                      "NotFoundError", "model")
    if body.get("stream"):
        raise _Reject(400, "The vLLM stand-in does not implement stream=true.", param="stream")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" and not fmt.get("json_schema"):
        raise _Reject(400, "When response_format type is 'json_schema', the 'json_schema' field "
                           "must be provided. (parameter=response_format)", param="response_format")
    _check_image_count(len(_image_urls(body)), max_images, modern)
    rule = rule or rule_for(model)
    images = [_load_image(url, modern) for url in _image_urls(body)]
    tokens = _prompt_tokens(body, sum(rule.tokens(i.width, i.height) for i in images))
    asked = body.get("max_completion_tokens") or body.get("max_tokens")
    if modern:
        _check_length_modern(tokens, asked, max_model_len)
    else:
        _check_length_legacy(tokens, asked, max_model_len)
    return tokens


def _check_image_count(count: int, max_images: int, modern: bool) -> None:
    if count > max_images:
        message = f"At most {max_images} image(s) may be provided in one prompt."
        if modern:  # a VLLMValidationError(parameter="image")
            raise _Reject(400, message + " (parameter=image)", param="image")
        raise _Reject(400, message, preprocessing=True)


def _check_length_modern(tokens: int, asked: Any, max_model_len: int) -> None:
    """vLLM 0.32: a prompt longer than the context is refused; max_tokens only past the context
    (a prompt that leaves fewer tokens than asked just stops at the context's end)."""
    if tokens > max_model_len:
        raise _Reject(400, f"Input length ({tokens}) exceeds model's maximum context length "
                           f"({max_model_len}).")
    if isinstance(asked, int) and asked > max_model_len:
        raise _Reject(400, f"max_tokens={asked} cannot be greater than max_model_len="
                           f"{max_model_len}. Please request fewer output tokens.",
                      param="max_tokens", value=asked)


def _check_length_legacy(tokens: int, asked: Any, max_model_len: int) -> None:
    """vLLM <= 0.10: prompt and max_tokens must fit into the context together."""
    if tokens >= max_model_len:
        raise _Reject(400, f"This model's maximum context length is {max_model_len} tokens. "
                           f"However, your request has {tokens} input tokens. Please reduce the "
                           "length of the input messages.", param="input_tokens", value=tokens,
                      preprocessing=True)
    if isinstance(asked, int) and tokens + asked > max_model_len:
        raise _Reject(400, f"'max_tokens' or 'max_completion_tokens' is too large: {asked}. This "
                           f"model's maximum context length is {max_model_len} tokens and your "
                           f"request has {tokens} input tokens ({asked} > {max_model_len} - "
                           f"{tokens}).", param="max_tokens", value=asked, preprocessing=True)


# ----------------------------------------------------------------------- server


class VLLMStandIn:
    """The stand-in server; ``start()`` it (or use ``with``) and point clients at :attr:`url`."""

    def __init__(self, model: str = DEFAULT_MODEL, *, host: str = "127.0.0.1", port: int = 0,
                 max_images: int = 3, max_model_len: int = 8192, latency_s: float = 0.0,
                 latency_growth: float = 0.10,
                 content_fn: Callable[[dict], str] | None = None, error_shape: str = "nested",
                 num_gpu_blocks: int = 4096, block_size: int = 16, root: str | None = None):
        """``root``: what vLLM's model card reports as the model's path or hub id (default: the
        served name). It names the model family, whose rule counts the image tokens."""
        if error_shape not in _PROFILES:
            raise ValueError(f"error_shape must be 'nested' or 'flat', not {error_shape!r}")
        self.model, self.host, self.port = model, host, port
        self.root = root or model
        self.token_rule = rule_for(self.root)
        self.max_images, self.max_model_len = max_images, max_model_len
        self.latency_s, self.latency_growth = latency_s, latency_growth
        self.content_fn, self.error_shape = content_fn, error_shape
        self.num_gpu_blocks, self.block_size = num_gpu_blocks, block_size  # KV cache size
        self.url = ""
        self.requests: list[dict] = []
        self.request_times: list[float] = []  # time.time() of each request, beside requests
        self.responses: list[ChatResponse] = []
        self.max_in_flight = 0
        self._cond = threading.Condition()  # guards everything below and wakes held requests
        self._in_flight = self._waiting = self._release_gen = 0
        self._held = False
        self._fault: str | None = None
        self._fault_left: int | None = None
        self._fault_share: float | None = None
        self._fault_rng = random.Random(0)
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> "VLLMStandIn":
        if self._server is None:
            self._stopping.clear()
            self._server = _Server((self.host, self.port), self)
            self.port = self._server.server_address[1]
            self.url = f"http://{self.host}:{self.port}"
            self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                            name=f"vllm-standin-{self.port}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()  # held and "slow" requests give up without answering
        server.shutdown()
        server.close_connections()  # keep-alive clients must see the server go away too
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "VLLMStandIn":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- test controls
    def set_fault(self, fault: str | None, count: int | None = None, *,
                  share: float | None = None, seed: int = 0) -> None:
        """Answer with ``fault`` (the next ``count`` requests, or all); with ``share``, only
        that fraction of requests, drawn from a seeded generator (chaos tests)."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")
        with self._cond:
            self._fault, self._fault_left = fault, count
            self._fault_share = share
            self._fault_rng = random.Random(seed)

    def hold(self) -> None:
        with self._cond:
            self._held = True

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._release_gen += 1  # also ends any "slow" sleeps
            self._cond.notify_all()

    def reset(self) -> None:
        """Clears faults, holds and the records, for a server shared between tests."""
        self.set_fault(None)
        self.release()
        with self._cond:
            self.requests.clear()
            self.request_times.clear()
            self.responses.clear()
            self.max_in_flight = self._in_flight

    @property
    def in_flight(self) -> int:
        with self._cond:
            return self._in_flight

    def wait_for_requests(self, n: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.requests) >= n, timeout)

    # -- request handling (called from server threads)
    def handle_chat(self, raw: bytes) -> ChatResponse | None:
        """Answers one chat request; None means the server stopped before an answer."""
        try:
            body: Any = json.loads(raw)
            error = None
        except ValueError as exc:
            body, error = None, exc
        with self._cond:
            # A body that is not a JSON object is kept as text so requests/responses line up.
            text = raw.decode("utf-8", "replace")
            recorded = body if isinstance(body, dict) else {"_raw_body": text}
            self.requests.append(recorded)
            self.request_times.append(time.time())
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            self._waiting += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._held or self._stopping.is_set())
            self._waiting -= 1
            fault, concurrency = self._take_fault(), self._in_flight
        try:
            if self._stopping.is_set():
                return None
            answer = self._answer(body, error, fault, concurrency)
            if answer is not None:
                with self._cond:
                    self.responses.append(answer)
            return answer
        finally:
            with self._cond:
                self._in_flight -= 1

    def _take_fault(self) -> str | None:
        fault = self._fault
        share = self._fault_share
        if fault is not None and share is not None and self._fault_rng.random() >= share:
            return None
        if fault is not None and self._fault_left is not None:
            self._fault_left -= 1
            if self._fault_left <= 0:
                self._fault, self._fault_left = None, None
        return fault

    def _answer(self, body: Any, error: ValueError | None, fault: str | None,
                concurrency: int) -> ChatResponse | None:
        if fault == "500":
            return self._error(_Reject(500, "Internal server error", "InternalServerError"))
        if fault == "503":  # what a proxy or an overloaded server answers
            return self._error(_Reject(503, "Service unavailable", "ServiceUnavailableError"))
        if fault == "408":  # what uvicorn or a proxy answers a request that took too long
            return self._error(_Reject(408, "Request timeout", "RequestTimeoutError"))
        if fault == "429":  # what a rate-limiting proxy in front of vLLM answers
            return self._error(_Reject(429, "Too many requests", "RateLimitError"))
        if fault == "400":
            return self._error(_Reject(400, "Injected fault: the stand-in refused this request."))
        if fault == "slow" and not self._sleep_until_released(SLOW_FAULT_S):
            return None
        if error is not None:
            pos = getattr(error, "pos", 0)
            return self._validation_error([{"type": "json_invalid", "loc": ("body", pos),
                                            "msg": "JSON decode error", "input": {},
                                            "ctx": {"error": getattr(error, "msg", str(error))}}])
        if errors := _pydantic_errors(body):
            return self._validation_error(errors)
        try:
            prompt_tokens = _check_request(body, self.model, self.max_images,
                                           self.max_model_len,
                                           _PROFILES[self.error_shape]["modern"], self.token_rule)
        except _Reject as reject:
            return self._error(reject)
        delay = self.latency_s * (1 + self.latency_growth * (concurrency - 1))
        if delay > 0 and self._stopping.wait(delay):
            return None
        content = self.content_fn(body) if self.content_fn else expected_content(body)
        finish = "stop"
        if fault == "garbage":
            content = f"Sure! Here is my verdict: {{verdict: maybe}} ({image_digest(body)})"
        elif fault == "bad_schema":
            content = _off_schema(body)
        elif fault == "length":
            content, finish = content[: max(1, len(content) // 2)], "length"
        asked = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(asked, int) and len(content) > 4 * asked:  # ~4 characters a token
            content, finish = content[: 4 * asked], "length"
        return ChatResponse(200, self._completion(body, content, finish, prompt_tokens))

    def _sleep_until_released(self, seconds: float) -> bool:
        with self._cond:
            gen = self._release_gen
            self._cond.wait_for(
                lambda: self._release_gen != gen or self._stopping.is_set(), seconds)
        return not self._stopping.is_set()

    def _completion(self, body: dict, content: str, finish: str, prompt: int) -> dict:
        profile = _PROFILES[self.error_shape]
        n = body.get("n") if isinstance(body.get("n"), int) and body["n"] > 0 else 1
        completion = max(1, len(content) // 4)
        choices = []
        for i in range(n):
            message = {"role": "assistant", "content": content, "refusal": None,
                       "annotations": None, "audio": None, "function_call": None,
                       profile["reasoning"]: None}
            if not profile["modern"]:
                message["tool_calls"] = []  # 0.32 leaves an empty list out
            choice = {"index": i, "message": message, "logprobs": None, "finish_reason": finish,
                      "stop_reason": None}
            if profile["modern"]:
                choice["routed_experts"] = None
            choices.append({**choice, "token_ids": None} if profile["token_ids"] else choice)
        response = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                    "created": int(time.time()), "model": self.model, "choices": choices,
                    "service_tier": None, "system_fingerprint": None,
                    "usage": {"prompt_tokens": prompt, "total_tokens": prompt + n * completion,
                              "completion_tokens": n * completion, "prompt_tokens_details": None},
                    "prompt_logprobs": None}
        if profile["token_ids"]:
            response["prompt_token_ids"] = None
        response["kv_transfer_params"] = None
        if profile["modern"]:
            response["usage"]["completion_tokens_details"] = None
            response |= {"prompt_text": None, "ec_transfer_params": None, "metrics": None}
        return response

    def _error(self, r: _Reject) -> ChatResponse:
        message, param = r.message, r.param
        if self.error_shape == "flat":
            param = None  # 0.10.0 never set param
            message += " None" if r.preprocessing else ""  # f"{e} {e.__cause__}"
        elif r.value is not None:  # VLLMValidationError.__str__ appends these
            message += f" (parameter={r.param}, value={r.value})"
        info = {"message": message, "type": r.err_type, "param": param, "code": r.status}
        body = {"object": "error", **info} if self.error_shape == "flat" else {"error": info}
        return ChatResponse(r.status, body)

    def _validation_error(self, errors: list[dict]) -> ChatResponse:
        kind = _PROFILES[self.error_shape]["validation_type"]
        return self._error(_Reject(400, str(errors), kind))

    # -- other routes
    def models_body(self) -> dict:
        permission = {"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission",
                      "created": int(time.time()), "allow_create_engine": False,
                      "allow_sampling": True, "allow_logprobs": True, "allow_search_indices": False,
                      "allow_view": True, "allow_fine_tuning": False, "organization": "*",
                      "group": None, "is_blocking": False}
        card = {"id": self.model, "object": "model", "created": int(time.time()),
                "owned_by": "vllm", "root": self.root, "parent": None,
                "max_model_len": self.max_model_len, "permission": [permission]}
        return {"object": "list", "data": [card]}

    def metrics_text(self) -> str:
        with self._cond:
            running, waiting = self._in_flight - self._waiting, self._waiting
        values = [("vllm:num_requests_running", "Number of requests in model execution batches.",
                   running),
                  ("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                   waiting)]
        values += [(name, "KV-cache usage. 1 means 100 percent usage.", min(1.0, 0.01 * running))
                   for name in _PROFILES[self.error_shape]["cache_metrics"]]
        labels = '{engine="0",model_name="%s"}' % self.model.replace('"', '\\"')
        # vLLM publishes its CacheConfig as an info-style gauge whose labels carry the values.
        info = ('# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n'
                '# TYPE vllm:cache_config_info gauge\n'
                f'vllm:cache_config_info{{block_size="{self.block_size}",cache_dtype="auto",'
                f'engine="0",num_gpu_blocks="{self.num_gpu_blocks}"}} 1.0\n')
        return info + "".join(f"# HELP {name} {doc}\n# TYPE {name} gauge\n{name}{labels} {float(v)}\n"
                              for name, doc, v in values)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], standin: VLLMStandIn):
        self.standin = standin
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # a client hanging up is not news
            super().handle_error(request, client_address)

    def close_connections(self) -> None:
        with self.connections_lock:
            for conn in self.connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class _Handler(BaseHTTPRequestHandler):
    # Headers and body go out in two writes: without TCP_NODELAY each answer waits ~40 ms on
    # a delayed ACK, which vLLM (uvicorn) does not.
    disable_nagle_algorithm = True
    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries Content-Length
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def version_string(self) -> str:
        return "uvicorn"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # tests do not want an access log on stderr

    def do_GET(self) -> None:
        standin, path = self.server.standin, self.path.split("?", 1)[0]
        if path == "/health":
            self._send(200, b"", None)  # vLLM: Response(status_code=200), no body
        elif path == "/version":
            self._json(200, {"version": _PROFILES[standin.error_shape]["version"]})
        elif path == "/v1/models":
            self._json(200, standin.models_body())
        elif path == "/metrics":
            self._send(200, standin.metrics_text().encode(),
                       "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._unrouted(path == "/v1/chat/completions")

    def do_POST(self) -> None:
        raw = self._read_body()
        path = self.path.split("?", 1)[0]
        if path != "/v1/chat/completions":
            self._unrouted(path in ("/health", "/version", "/v1/models", "/metrics"))
            return
        answer = self.server.standin.handle_chat(raw)
        if answer is None:  # stopped mid-request: drop the connection like a dying server
            self.close_connection = True
            return
        self._json(answer.status, answer.body)

    def _unrouted(self, other_method_exists: bool) -> None:
        # FastAPI's default answers for an unknown path or a wrong method.
        if other_method_exists:
            self._json(405, {"detail": "Method Not Allowed"})
        else:
            self._json(404, {"detail": "Not Found"})

    def _read_body(self) -> bytes:
        # httpx and the OpenAI SDK always send Content-Length for JSON bodies.
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _json(self, status: int, obj: Any) -> None:
        # Compact and non-ASCII-preserving, like Starlette's JSONResponse.
        payload = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        self._send(status, payload, "application/json")

    def _send(self, status: int, payload: bytes, content_type: str | None) -> None:
        try:
            self.send_response(status)
            if content_type:
                self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up (timeout) or the server is stopping
            self.close_connection = True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="vLLM stand-in server (for tests; not vLLM)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--root", default=None,
                        help="the model's path or hub id (/v1/models root); picks the image-token "
                             "rule (default: --model)")
    parser.add_argument("--latency-s", type=float, default=0.0)
    parser.add_argument("--latency-growth", type=float, default=0.10)
    parser.add_argument("--max-images", type=int, default=3)
    parser.add_argument("--max-model-len", type=int, default=8192)
    parser.add_argument("--error-shape", choices=sorted(_PROFILES), default="nested")
    args = parser.parse_args(argv)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    standin = VLLMStandIn(args.model, host=args.host, port=args.port, max_images=args.max_images,
                          max_model_len=args.max_model_len, latency_s=args.latency_s,
                          latency_growth=args.latency_growth, error_shape=args.error_shape,
                          root=args.root).start()
    print(f"vLLM stand-in listening on {standin.url}", flush=True)
    try:
        while not done.wait(0.2):  # short waits keep the main thread responsive to signals
            pass
    finally:
        standin.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
