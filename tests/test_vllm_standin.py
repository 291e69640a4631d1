"""The vLLM stand-in speaks vLLM's OpenAI-compatible protocol over real HTTP."""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from zroact_tasks.stage2.image_tokens import CONSERVATIVE, QWEN2_VL, QWEN3_VL
from zroact_tasks.testing.vllm_standin import VLLMStandIn, expected_content, image_digest

jsonschema = pytest.importorskip("jsonschema")

MODEL = "Qwen/Qwen2.5-VL-3B-Instruct"
REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {
    "type": "object",
    "properties": {
        "verdict": {"type": "string", "enum": ["fall", "no_fall", "unclear"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "reason": {"type": "string", "maxLength": 40},
        "frames": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                   "minItems": 1, "maxItems": 3},
        "flagged": {"type": "boolean"},
        "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "box": {"$ref": "#/$defs/Box"},
    },
    "required": ["verdict", "confidence", "reason", "frames", "flagged", "box"],
    "additionalProperties": False,
    "$defs": {"Box": {"type": "object", "required": ["x", "y"], "additionalProperties": False,
                      "properties": {"x": {"type": "integer", "exclusiveMinimum": 0},
                                     "y": {"type": ["integer", "null"], "maximum": -5}}}},
}


def image_url(shade: int, size: tuple[int, int] = (32, 32), mime: str = "image/jpeg") -> str:
    ok, jpg = cv2.imencode(".jpg", np.full((size[1], size[0], 3), shade, np.uint8))
    assert ok
    return f"data:{mime};base64," + base64.b64encode(jpg.tobytes()).decode()


def with_urls(body: dict, urls: list[str]) -> dict:
    """``body`` with its image parts replaced by ``urls``."""
    text = [p for p in body["messages"][0]["content"] if p["type"] == "text"]
    body["messages"][0]["content"] = text + [{"type": "image_url", "image_url": {"url": u}}
                                             for u in urls]
    return body


def chat_body(n_images: int = 3, *, schema: dict | None = SCHEMA, model: str = MODEL,
              name: str | None = "verdict", **extra) -> dict:
    content = [{"type": "text", "text": "Did someone fall?"}]
    content += [{"type": "image_url", "image_url": {"url": image_url(40 * i)}}
                for i in range(n_images)]
    body = {"model": model, "messages": [{"role": "user", "content": content}], **extra}
    if schema is not None:
        spec = {"schema": schema, **({"name": name} if name else {})}
        body["response_format"] = {"type": "json_schema", "json_schema": spec}
    return body


# Own function-scoped servers (not conftest's shared `standin`): these tests change faults,
# holds and recorded requests, and check counters from zero.
@pytest.fixture
def vllm():
    with VLLMStandIn(MODEL) as server:
        yield server


@pytest.fixture
def http(vllm):
    with httpx.Client(base_url=vllm.url, timeout=5) as session:
        yield session


def chat(http: httpx.Client, body, **kwargs) -> httpx.Response:
    return http.post("/v1/chat/completions", json=body, **kwargs)


def test_health_version_and_unknown_route(http):
    health = http.get("/health")
    assert (health.status_code, health.content) == (200, b"")
    assert isinstance(http.get("/version").json()["version"], str)
    assert http.get("/nope").status_code == 404


def test_models_list_has_vllm_model_card(http, vllm):
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    (card,) = body["data"]
    expected = {"id": MODEL, "object": "model", "owned_by": "vllm", "root": MODEL, "parent": None,
                "max_model_len": 8192}
    assert {k: card[k] for k in expected} == expected
    assert isinstance(card["created"], int)
    assert card["permission"][0]["object"] == "model_permission"


def test_three_images_with_schema_give_a_conforming_vllm_response(http, vllm):
    body = chat_body(3)
    response = chat(http, body)
    assert response.status_code == 200
    data = response.json()
    assert data["id"].startswith("chatcmpl-") and data["object"] == "chat.completion"
    assert data["model"] == MODEL and isinstance(data["created"], int)
    (choice,) = data["choices"]
    assert [choice[k] for k in ("index", "finish_reason", "stop_reason", "logprobs")] == [
        0, "stop", None, None]
    message = choice["message"]
    assert message["role"] == "assistant" and "tool_calls" not in message  # vLLM 0.32 omits []
    assert {"refusal", "annotations", "audio", "function_call", "reasoning"} <= message.keys()
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert "prompt_tokens_details" in usage
    # 32x32 is raised to Qwen's min_pixels: 2x2 units, plus the vision start/end markers.
    assert usage["prompt_tokens"] == chat(http, chat_body(0)).json()["usage"][
        "prompt_tokens"] + 3 * (4 + 2)
    body_text_only = vllm.requests.pop()
    vllm.responses.pop()
    assert body_text_only == chat_body(0)

    verdict = json.loads(message["content"])
    jsonschema.validate(verdict, SCHEMA)
    # The verdict can be tied to its request: recomputed from the recorded body, digest inside.
    assert vllm.requests == [body]
    assert message["content"] == expected_content(vllm.requests[0])
    assert image_digest(body) in verdict["reason"]
    assert vllm.responses[0].status == 200 and vllm.responses[0]["body"] == data
    assert image_digest(chat_body(2)) != image_digest(body)


@pytest.mark.parametrize("schema", [
    {"type": "array", "items": {"type": "string", "minLength": 12}, "minItems": 2},
    {"type": "object", "properties": {
        "n": {"type": "number", "exclusiveMinimum": 1, "exclusiveMaximum": 2},
        "k": {"type": "integer", "minimum": 5, "maximum": 5},
        "c": {"const": "fixed"},
        "all": {"allOf": [{"type": "boolean"}]}}},
    {"type": ["null", "string"], "maxLength": 3},
])
def test_generated_content_fits_other_schemas(schema):
    jsonschema.validate(json.loads(expected_content(chat_body(1, schema=schema))), schema)


def test_content_fn_and_plain_text(vllm, http):
    assert image_digest(chat_body(1)) in chat(http, chat_body(1, schema=None)).json()[
        "choices"][0]["message"]["content"]
    vllm.content_fn = lambda body: f"custom:{len(body['messages'])}"
    assert chat(http, chat_body(1)).json()["choices"][0]["message"]["content"] == "custom:1"


def test_unknown_model_is_vllm_404(http):
    response = chat(http, chat_body(1, model="gpt-4"))
    assert response.status_code == 404
    assert response.json() == {"error": {"message": "The model `gpt-4` does not exist. Valid "
                                                    f"aliases: {MODEL}.",
                                         "type": "NotFoundError", "param": "model", "code": 404}}


def test_validation_errors_are_400(http, vllm):
    no_name = chat(http, chat_body(1, name=None))
    assert no_name.status_code == 400
    error = no_name.json()["error"]
    assert error["type"] == "Bad Request" and error["code"] == 400
    assert "'json_schema', 'name')" in error["message"] and "Field required" in error["message"]

    no_messages = chat(http, {"model": MODEL})
    assert no_messages.status_code == 400
    assert "'messages')" in no_messages.json()["error"]["message"]

    not_json = http.post("/v1/chat/completions", content=b"{oops",
                           headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and "json_invalid" in not_json.json()["error"]["message"]
    assert vllm.requests[-1] == {"_raw_body": "{oops"}
    assert [r.status for r in vllm.responses] == [400, 400, 400]


def test_too_many_images_is_vllm_400(http):
    response = chat(http, chat_body(4))
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "At most 3 image(s) may be provided in one prompt. (parameter=image)",
        "type": "BadRequestError", "param": "image", "code": 400}


def prompt_tokens(http: httpx.Client, urls: list[str]) -> int:
    response = chat(http, with_urls(chat_body(0, schema=None, max_tokens=1), urls))
    assert response.status_code == 200, response.text
    return response.json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize(("root", "rule"), [
    (None, QWEN2_VL),  # the served name, Qwen/Qwen2.5-VL-3B-Instruct
    ("/models/Qwen3-VL-2B-Instruct", QWEN3_VL),
    ("llava-hf/llava-1.5-7b-hf", CONSERVATIVE),
])
def test_image_tokens_follow_the_model_family_of_root(root, rule):
    with VLLMStandIn(MODEL, root=root, max_model_len=32768) as server, \
            httpx.Client(base_url=server.url) as http:
        assert http.get("/v1/models").json()["data"][0]["root"] == (root or MODEL)
        text_only = prompt_tokens(http, [])
        for size in [(224, 224), (1280, 720), (1920, 1080), (4000, 4000)]:
            assert prompt_tokens(http, [image_url(90, size)]) - text_only == rule.tokens(*size)
        two = [image_url(90, (1280, 720)), image_url(30, (224, 224))]
        assert prompt_tokens(http, two) - text_only == rule.tokens(1280, 720) + rule.tokens(224, 224)


def test_prompt_past_the_context_is_vllm_400():
    frames = [image_url(90 + i, (1920, 1080)) for i in range(3)]  # 3 x 2693 tokens
    with VLLMStandIn(MODEL, max_model_len=6144) as server, \
            httpx.Client(base_url=server.url) as http:
        text_only = prompt_tokens(http, [])
        assert prompt_tokens(http, frames[:2]) == text_only + 2 * 2693  # fits
        response = chat(http, with_urls(chat_body(0), frames))
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": f"Input length ({text_only + 3 * 2693}) exceeds model's maximum context "
                   "length (6144).", "type": "BadRequestError", "param": None, "code": 400}


@pytest.mark.parametrize(("url", "status", "message"), [
    ("data:image/jpeg;base64," + base64.b64encode(b"not an image").decode(), 400,
     "Failed to load image: cannot identify image file <_io.BytesIO object>"),
    ("data:image/jpeg;base64,@@@", 400, "Non-base64 digit found"),
    ("data:image/jpeg;base64,abc", 400, "Non-base64 digit found"),  # bad padding: the same
    ("data:image/jpeg," + image_url(90).split(",", 1)[1], 501,
     "Only base64 data URLs are supported for now."),
    ("https://example.com/cat.jpg", 400, None),  # the stand-in fetches nothing
])
def test_undecodable_image_is_refused_like_vllm(http, url, status, message):
    response = chat(http, with_urls(chat_body(1), [url]))
    assert response.status_code == status
    if message is not None:
        assert response.json()["error"]["message"] == message


def test_media_type_is_not_checked(http):
    # vLLM only decodes the bytes: a JPEG labelled text/plain is an image all the same.
    assert prompt_tokens(http, [image_url(90, (224, 224), "text/plain")]) == prompt_tokens(
        http, [image_url(90, (224, 224))])


def test_max_tokens_beyond_context_is_vllm_400(http):
    error = chat(http, chat_body(1, max_tokens=9000)).json()["error"]
    assert error["message"] == ("max_tokens=9000 cannot be greater than max_model_len=8192. Please "
                                "request fewer output tokens. (parameter=max_tokens, value=9000)")
    assert error["param"] == "max_tokens"
    # Under max_model_len but past what the prompt leaves: vLLM 0.32 accepts (it stops at the end).
    assert chat(http, chat_body(1, max_tokens=8190)).status_code == 200
    short = chat(http, chat_body(1, max_tokens=3)).json()["choices"][0]
    assert short["finish_reason"] == "length" and len(short["message"]["content"]) <= 12


def test_flat_error_shape():
    with VLLMStandIn(MODEL, error_shape="flat") as server, \
            httpx.Client(base_url=server.url) as http:
        assert chat(http, chat_body(1, model="x")).json() == {
            "object": "error", "message": "The model `x` does not exist.", "type": "NotFoundError",
            "param": None, "code": 404}
        limit = chat(http, chat_body(4)).json()
        assert limit["message"] == "At most 3 image(s) may be provided in one prompt. None"
        assert chat(http, {"model": MODEL}).json()["type"] == "BadRequestError"
        assert "reasoning_content" in chat(http, chat_body(1)).json()["choices"][0]["message"]


def test_fault_modes(vllm, http):
    vllm.set_fault("500", count=1)
    failed = chat(http, chat_body(1))
    assert failed.status_code == 500
    assert failed.json()["error"] == {"message": "Internal server error",
                                      "type": "InternalServerError", "param": None, "code": 500}
    assert chat(http, chat_body(1)).status_code == 200  # count=1 reverted

    vllm.set_fault("400")
    assert [chat(http, chat_body(1)).status_code for _ in range(2)] == [400, 400]
    assert chat(http, chat_body(1)).json()["error"]["type"] == "BadRequestError"

    vllm.set_fault("garbage", 1)
    garbage = chat(http, chat_body(1)).json()["choices"][0]
    assert garbage["finish_reason"] == "stop"
    with pytest.raises(ValueError):
        json.loads(garbage["message"]["content"])

    vllm.set_fault("bad_schema", 1)
    off = json.loads(chat(http, chat_body(1)).json()["choices"][0]["message"]["content"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(off, SCHEMA)

    vllm.set_fault("length", 1)
    cut = chat(http, chat_body(1)).json()["choices"][0]
    assert cut["finish_reason"] == "length"
    with pytest.raises(ValueError):
        json.loads(cut["message"]["content"])
    assert chat(http, chat_body(1)).json()["choices"][0]["finish_reason"] == "stop"
    with pytest.raises(ValueError):
        vllm.set_fault("teapot")


def test_slow_fault_outlasts_the_client_until_released(vllm, http):
    vllm.set_fault("slow", 1)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        chat(http, chat_body(1), timeout=0.3)
    assert time.monotonic() - started < 2
    assert vllm.in_flight == 1
    vllm.release()
    deadline = time.monotonic() + 2
    while vllm.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert vllm.in_flight == 0
    assert chat(http, chat_body(1)).status_code == 200


def post_in_threads(url: str, bodies: list[dict]):
    """Sends each body from its own thread; returns (results, threads) to join."""
    results: list[tuple[int, float]] = [(0, 0.0)] * len(bodies)

    def send(i: int) -> None:
        with httpx.Client(base_url=url, timeout=10) as http:
            response = chat(http, bodies[i])
            results[i] = (response.status_code, time.monotonic())

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    return results, threads


def test_hold_release_and_in_flight(vllm, http):
    vllm.hold()
    results, threads = post_in_threads(vllm.url, [chat_body(1)] * 3)
    assert vllm.wait_for_requests(3, timeout=5)
    assert vllm.in_flight == 3 and vllm.responses == []
    metrics = http.get("/metrics").text
    assert f'vllm:num_requests_waiting{{engine="0",model_name="{MODEL}"}} 3.0' in metrics
    assert "vllm:num_requests_running{" in metrics and "vllm:kv_cache_usage_perc{" in metrics
    vllm.release()
    for t in threads:
        t.join(5)
    assert [status for status, _ in results] == [200, 200, 200]
    assert vllm.in_flight == 0 and vllm.max_in_flight == 3
    vllm.reset()
    assert (vllm.requests, vllm.responses, vllm.max_in_flight) == ([], [], 0)


def test_latency_grows_with_concurrency():
    with VLLMStandIn(MODEL, latency_s=0.2, latency_growth=0.10) as server:
        with httpx.Client(base_url=server.url) as http:
            started = time.monotonic()
            assert chat(http, chat_body(1)).status_code == 200
            alone = time.monotonic() - started
        server.hold()
        results, threads = post_in_threads(server.url, [chat_body(1)] * 3)
        assert server.wait_for_requests(4, timeout=5)
        released = time.monotonic()
        server.release()
        for t in threads:
            t.join(5)
    together = max(done for _, done in results) - released
    assert 0.18 <= alone < 0.6
    assert 0.2 * 1.15 <= together < 0.2 * 1.2 + 0.4  # each of 3 slept 0.2 * (1 + 0.1 * 2)


def test_stopped_server_refuses_connections():
    server = VLLMStandIn(MODEL).start()
    with httpx.Client(base_url=server.url, timeout=2) as http:
        assert http.get("/health").status_code == 200  # keeps a pooled keep-alive connection
        server.stop()
        with pytest.raises(httpx.TransportError):
            http.get("/health")
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health", timeout=2)


def test_runs_as_a_process_and_exits_cleanly_on_sigterm():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "zroact_tasks.testing.vllm_standin", "--host", "127.0.0.1",
         "--port", "0", "--model", "tiny-vlm"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        assert ready, "no ready line"
        line = proc.stdout.readline().strip()
        assert line.startswith("vLLM stand-in listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        assert httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["id"] == "tiny-vlm"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
