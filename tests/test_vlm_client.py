"""The Stage 2 client against the vLLM stand-in over real HTTP: shapes, retries, error kinds."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from zroact_tasks.errors import VLMResponseError, VLMUnavailableError
from zroact_tasks.local import free_port
from zroact_tasks.stage2.vlm import VLMClient
from zroact_tasks.testing.vllm_standin import VLLMStandIn, expected_content

JPEG = cv2.imencode(".jpg", np.full((60, 80, 3), 90, np.uint8))[1].tobytes()


def make_client(url: str, *, model: str | None = None, retries: int = 2, timeout: float = 5.0):
    return VLMClient(url, model=model, timeout_s=timeout, max_retries=retries, backoff_max_s=0.05,
                     max_tokens=128)


@pytest.fixture(params=["nested", "flat"])
def server(request):
    with VLLMStandIn(model="Qwen/Qwen2.5-VL-3B-Instruct", error_shape=request.param) as s:
        yield s


def test_request_shape_and_verdict(server):
    client = make_client(server.url + "/v1/")  # a trailing /v1 is accepted
    verdict = client.judge([JPEG] * 3, "what happens?")
    (body,) = server.requests
    assert body["model"] == "Qwen/Qwen2.5-VL-3B-Instruct"  # the only model listed
    content = body["messages"][0]["content"]
    assert [p["type"] for p in content] == ["image_url"] * 3 + ["text"]
    assert content[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["name"] == "verdict"
    assert verdict.model_dump() == json.loads(expected_content(body))


@pytest.mark.parametrize("fault,expected", [
    ("garbage", "not JSON"), ("bad_schema", "breaks the schema"), ("length", "finish_reason length"),
])
def test_bad_answers_are_permanent(server, fault, expected):
    server.set_fault(fault)
    with pytest.raises(VLMResponseError, match=expected):
        make_client(server.url).judge([JPEG] * 3, "x")
    assert len(server.requests) == 1  # not retried


def test_http_400_is_permanent_and_carries_vllms_message(server):
    with pytest.raises(VLMResponseError, match="HTTP 400: At most 3 image"):
        make_client(server.url).judge([JPEG] * 4, "x")
    assert len(server.requests) == 1


def test_unknown_model_is_404_not_retried(server):
    with pytest.raises(VLMResponseError, match="HTTP 404: The model `nope` does not exist"):
        make_client(server.url, model="nope").judge([JPEG] * 3, "x")
    assert len(server.requests) == 1


def test_http_500_is_retried_then_succeeds(server):
    server.set_fault("500", count=2)
    make_client(server.url, retries=2).judge([JPEG] * 3, "x")
    assert len(server.requests) == 3


def test_http_500_gives_up_after_the_retries(server):
    server.set_fault("500")
    with pytest.raises(VLMUnavailableError, match="HTTP 500"):
        make_client(server.url, retries=2).judge([JPEG] * 3, "x")
    assert len(server.requests) == 3


def test_slow_server_times_out_and_is_retried(server):
    server.set_fault("slow")
    with pytest.raises(VLMUnavailableError, match="timed out"):
        make_client(server.url, retries=1, timeout=0.3).judge([JPEG] * 3, "x")
    assert len(server.requests) == 2
    server.release()


def test_connection_refused_is_transient():
    client = make_client(f"http://127.0.0.1:{free_port()}", model="m", retries=1)
    with pytest.raises(VLMUnavailableError, match="unreachable"):
        client.judge([JPEG] * 3, "x")


def test_answer_token_bound_covers_the_longest_verdict():
    from zroact_tasks.models import Verdict
    from zroact_tasks.stage2.vlm import answer_token_bound

    longest = Verdict(action="é" * 200, confirmed=False, confidence=0.123456789, reason="é" * 1000)
    # every character two UTF-8 bytes here; the bound allows four, and whitespace on top
    assert len(longest.model_dump_json().encode()) < answer_token_bound()
    assert answer_token_bound() >= 4 * 1200  # 256 (the old default) cut 2 of 10 real answers
