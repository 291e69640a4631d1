"""Capacity-aware Stage 2 concurrency: the arithmetic, and reading a server's /metrics."""

from __future__ import annotations

import pytest

from zroact_tasks.stage2.capacity import ServerCapacity, knee, plan_concurrency, read_capacity
from zroact_tasks.testing.vllm_standin import VLLMStandIn


def test_latency_knee():
    # throughput k/(1+0.1(k-1)): 1, 1.82, 2.50, 3.08, 3.57, 4.00 -> the 6th adds 12 % < 15 %
    assert knee(0.10) == 5
    assert knee(0.0) == 7  # no slowdown: the 8th still adds only 1/7 = 14 %
    assert knee(1.0) == 1  # each extra request doubles latency: 1 in flight


@pytest.mark.parametrize("cap,tokens,workers,configured,override,expected,fragment", [
    # KV cache for 65,536 tokens / 4,368 per request = 15; max_num_seqs 8; knee 5 -> 5; 2 workers -> 2
    (ServerCapacity(8, 65_536), 4_368, 2, 3, False, 2, "server allows 5"),
    # one worker: min(configured 3, 5) = 3
    (ServerCapacity(8, 65_536), 4_368, 1, 3, False, 3, "-> 5 each; configured 3"),
    # a small KV cache: 8,192 / 4,368 = 1 request -> clamped up to 2 (the floor)
    (ServerCapacity(None, 8_192), 4_368, 1, 3, False, 2, "= 1"),
    # the same with the override: 1
    (ServerCapacity(None, 8_192), 4_368, 1, 3, True, 1, "override on"),
    # nothing reported: the knee alone; 4 wanted with override -> 4
    (ServerCapacity(), 4_368, 1, 4, True, 4, "latency knee 5"),
])
def test_plan(cap, tokens, workers, configured, override, expected, fragment):
    planned, line = plan_concurrency(cap, tokens_per_request=tokens, workers_sharing=workers,
                                     configured=configured, override=override, latency_growth=0.10)
    assert planned == expected
    assert line.startswith(f"stage2 concurrency {expected}: ") and fragment in line


def test_reads_what_the_server_publishes():
    with VLLMStandIn(num_gpu_blocks=1000, block_size=16) as server:
        cap = read_capacity(server.url, max_num_seqs=6)
    assert cap == ServerCapacity(max_num_seqs=6, kv_cache_tokens=16_000, running=0.0, waiting=0.0,
                                 kv_cache_usage=0.0)


def test_the_stage2_worker_plans_from_the_server():
    from zroact_tasks import cli

    with VLLMStandIn(num_gpu_blocks=1000, block_size=16) as server:
        # 16,000 tokens / (3 x 1,200 + 256 + 512 = 4,368) = 3 fit; 2 workers share it -> 1 -> 2.
        settings = cli._settings(vlm_url=server.url, stage2_workers_per_vlm=2)
        assert cli.stage2_concurrency(settings, None) == 2
        assert cli.stage2_concurrency(settings, 3) == 3  # an explicit -c wins
    down = cli._settings(vlm_url="http://127.0.0.1:1")
    assert cli.stage2_concurrency(down, None) == 3  # unknown capacity: the configured value
