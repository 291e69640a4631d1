"""Stage 2 fits each request into the VLM's context: frames shrink by the served family's rule until
the prompt and the longest allowed answer fit; only an impossible fit is refused."""

from __future__ import annotations

import pytest

from zroact_tasks.errors import VLMContextError, VLMResponseError
from zroact_tasks.stage2.context import ServerInfo, fit_frames, text_tokens
from zroact_tasks.stage2.image_tokens import CONSERVATIVE, QWEN2_VL, QWEN3_VL
from zroact_tasks.stage2.vlm import VLMClient
from zroact_tasks.testing.vllm_standin import VLLMStandIn

TEXT = "Slot 0: frames 9, 19, 29 at 0.3-1.0 s. Detector: person 0.91 walking. Is it real?" * 4
HD = [(1920, 1080)] * 3


def prompt_tokens(rule, sizes, text=TEXT) -> int:
    return sum(rule.tokens(w, h) for w, h in sizes) + text_tokens(text)


@pytest.mark.parametrize("root,rule", [("Qwen/Qwen2.5-VL-3B-Instruct", QWEN2_VL),
                                       ("/models/Qwen3-VL-2B-Instruct", QWEN3_VL),
                                       ("acme/llava-next", CONSERVATIVE)])
def test_three_1080p_frames_shrink_until_the_prompt_and_the_answer_fit(root, rule):
    server = ServerInfo(model="served-name", root=root, max_model_len=8192)
    assert prompt_tokens(rule, HD) + 2048 > 8192  # as they are, the server would answer 400
    sizes = fit_frames(HD, TEXT, server, max_tokens=2048)
    assert prompt_tokens(rule, sizes) + 2048 <= 8192
    (w, h), = set(sizes)  # every frame alike, the aspect kept, whole units of the family
    assert w < 1920 and abs(w / h - 16 / 9) < 0.1
    assert w % rule.unit == 0 and h % rule.unit == 0
    # and no smaller than it had to be: one unit more each way would not fit
    assert prompt_tokens(rule, [(w + rule.unit, h + rule.unit)] * 3) + 2048 > 8192


def test_the_family_comes_from_root_not_the_served_name():
    """compose serves Qwen3-VL as ``qwen3-vl-2b-instruct``; a renamed one still counts 32-px units."""
    renamed = ServerInfo(model="judge", root="Qwen/Qwen3-VL-2B-Instruct", max_model_len=6000)
    (w, h), = set(fit_frames(HD, TEXT, renamed, max_tokens=1024))
    assert w % 32 == 0 and h % 32 == 0
    assert QWEN3_VL.tokens(w, h) < QWEN2_VL.tokens(w, h)  # the 28-px rule would count more


def test_frames_that_fit_are_sent_as_they_are():
    server = ServerInfo(model="m", root="Qwen/Qwen2.5-VL-7B-Instruct", max_model_len=16384)
    assert fit_frames(HD, TEXT, server, max_tokens=4946) == HD  # 8,073 + text + 4,946 < 16,384
    unknown = ServerInfo(model="m", root=None, max_model_len=None)  # the server does not say
    assert fit_frames(HD, TEXT, unknown, max_tokens=4946) == HD


def test_a_context_too_small_for_the_smallest_images_is_refused_with_its_numbers():
    server = ServerInfo(model="m", root="Qwen/Qwen3-VL-2B-Instruct", max_model_len=4096)
    with pytest.raises(VLMContextError) as info:
        fit_frames(HD, TEXT, server, max_tokens=4000)
    message = str(info.value)
    assert "4096 tokens" in message and "max_tokens 4000" in message and "qwen3-vl" in message
    assert isinstance(info.value, VLMResponseError)  # permanent: not retried


def test_the_client_reads_root_and_context_from_the_server():
    with VLLMStandIn(model="Qwen/Qwen2.5-VL-3B-Instruct", max_model_len=5000) as standin:
        client = VLMClient(standin.url, model=None, timeout_s=5, max_retries=0,
                           backoff_max_s=0.1, max_tokens=None)
        try:
            assert client.server == ServerInfo("Qwen/Qwen2.5-VL-3B-Instruct",
                                               "Qwen/Qwen2.5-VL-3B-Instruct", 5000)
        finally:
            client.close()
        wrong = VLMClient(standin.url, model="qwen3-vl-2b-instruct", timeout_s=5, max_retries=0,
                          backoff_max_s=0.1, max_tokens=None)
        try:
            with pytest.raises(VLMResponseError, match="does not serve 'qwen3-vl-2b-instruct'"):
                wrong.server
        finally:
            wrong.close()
