"""A thin client for vLLM's OpenAI-compatible server: one chat completion per slot.

The only place that talks HTTP to the VLM, and the only place that turns its failures into
zroact errors: transient ones (refused, timed out, HTTP 5xx/429/408) become
``VLMUnavailableError`` and are retried with capped exponential backoff; everything else becomes
``VLMResponseError`` at once.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import httpx
from pydantic import ValidationError
from tenacity import (
    retry,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from ..errors import VLMResponseError, VLMUnavailableError
from ..models import Verdict
from .context import ServerInfo

log = logging.getLogger(__name__)

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def verdict_schema() -> dict[str, Any]:
    """The JSON Schema vLLM's guided decoding must follow (``response_format``)."""
    return Verdict.model_json_schema()


def answer_token_bound(schema: dict[str, Any] | None = None) -> int:
    """``max_tokens`` that never cuts off an answer the schema allows (default: the verdict's).

    The longest compact JSON the schema admits, counted in UTF-8 bytes (a string of maxLength N:
    at most 4N bytes; a byte-level BPE token is at least one byte), plus 64 for whitespace the
    grammar lets the model put between tokens and a number's digits beyond 24."""
    root = schema or verdict_schema()

    def longest(s: dict[str, Any]) -> int:
        kind = s.get("type")
        if kind == "object":
            props = s.get("properties") or {}
            return 2 + sum(len(json.dumps(k)) + 1 + longest(v) + 1 for k, v in props.items())
        if kind == "string":
            return 2 + 4 * int(s.get("maxLength", 4096))  # unbounded strings: a generous cap
        if kind == "boolean":
            return 5
        if kind in ("number", "integer"):
            return 24
        return 16

    return longest(root) + 64


def _error_message(response: httpx.Response) -> str:
    """vLLM's error text; it has used ``{"error": {...}}`` and flat ``{"object": "error", ...}``."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200] or response.reason_phrase
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        message = inner.get("message") or inner.get("detail")
        if message:
            return " ".join(str(message).split())[:300]
    return json.dumps(body)[:200]


def image_part(jpeg: bytes) -> dict[str, Any]:
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}


class VLMClient:
    """Chat completions against one vLLM server root (``http://host:8000``)."""

    def __init__(self, base_url: str, *, model: str | None, timeout_s: float,
                 max_retries: int, backoff_max_s: float, max_tokens: int | None) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s)
        self._model = model
        self._server: ServerInfo | None = None
        self.max_tokens = max_tokens or answer_token_bound()  # None: the schema's longest
        self._retrying = retry(
            retry=retry_if_exception_type(VLMUnavailableError),
            stop=stop_after_attempt(max_retries + 1),
            wait=wait_exponential(multiplier=0.5, max=backoff_max_s),
            reraise=True,
        )

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise VLMUnavailableError(f"VLM at {self.base_url} timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise VLMUnavailableError(f"VLM at {self.base_url} unreachable: {exc}") from exc
        if response.status_code >= 400:
            error = VLMUnavailableError if response.status_code in TRANSIENT_STATUS else VLMResponseError
            raise error(f"VLM HTTP {response.status_code}: {_error_message(response)}")
        try:
            return response.json()
        except ValueError as exc:
            raise VLMResponseError(f"VLM sent a body that is not JSON: {response.text[:120]!r}") from exc

    @property
    def server(self) -> ServerInfo:
        """The served model's card (``/v1/models``), read once: the configured model's, else the
        only one listed. Its ``root`` and ``max_model_len`` size the frames (stage2/context.py)."""
        if self._server is None:
            listed = self._retrying(self._request)("GET", "/v1/models")
            cards = [m for m in listed.get("data", []) if isinstance(m, dict) and m.get("id")]
            ids = [m["id"] for m in cards]
            if self._model is None and len(cards) != 1:
                raise VLMResponseError(f"VLM serves {len(ids)} models {ids}; set ZROACT_VLM_MODEL")
            card = cards[0] if self._model is None else next(
                (m for m in cards if m["id"] == self._model), None)
            if card is None:
                raise VLMResponseError(f"VLM does not serve {self._model!r} (it serves {ids}); "
                                       "check ZROACT_VLM_MODEL")
            length = card.get("max_model_len")
            self._server = ServerInfo(model=card["id"], root=card.get("root") or None,
                                      max_model_len=length if isinstance(length, int) else None)
        return self._server

    @property
    def model(self) -> str:
        """The configured model, else the only one the server lists."""
        return self._model or self.server.model

    def build_request(self, images: list[bytes], text: str) -> dict[str, Any]:
        content = [image_part(jpeg) for jpeg in images] + [{"type": "text", "text": text}]
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "verdict", "schema": verdict_schema()}},
            "max_tokens": self.max_tokens,
        }

    def judge(self, images: list[bytes], text: str) -> Verdict:
        """Ask about these JPEG frames; retries transient failures, then raises."""
        body = self.build_request(images, text)
        answer = self._retrying(self._request)("POST", "/v1/chat/completions", json=body)
        return parse_verdict(answer, self.max_tokens)


def parse_verdict(answer: dict[str, Any], max_tokens: int) -> Verdict:
    try:
        choice = answer["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise VLMResponseError(f"VLM answer has no choices[0].message.content: {exc!r}") from exc
    if choice.get("finish_reason") == "length":
        raise VLMResponseError(f"VLM answer cut off at max_tokens={max_tokens} (finish_reason length)")
    try:
        data = json.loads(content or "")
    except ValueError as exc:
        raise VLMResponseError(f"VLM answer is not JSON: {str(content)[:80]!r}") from exc
    try:
        return Verdict.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "verdict"
        raise VLMResponseError(f"VLM verdict breaks the schema at {where}: {first['msg']}") from exc
