"""How many VLM requests one Stage 2 worker keeps in flight, from what the vLLM server reports.

The seed sized this by hand from VRAM (≈5 GB weights + 1–2 GB per request → 2–3). With vLLM as a
server the real limits are its scheduler (``--max-num-seqs``), its KV cache (blocks × block size,
from ``vllm:cache_config_info`` on ``/metrics``) against the tokens one request holds, and the
latency curve: past some number in flight, each extra request slows all of them more than it adds.
All Stage 2 workers that share one server share these limits.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ..config import STAGE2_CONCURRENCY_RANGE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerCapacity:
    """What one vLLM server offers; None = not reported."""

    max_num_seqs: int | None = None
    kv_cache_tokens: int | None = None
    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0


def read_capacity(base_url: str, max_num_seqs: int | None, timeout_s: float = 5.0) -> ServerCapacity:
    """Parse the server's ``/metrics`` (``max_num_seqs`` comes from configuration: vLLM does not
    publish it)."""
    text = httpx.get(base_url.rstrip("/") + "/metrics", timeout=timeout_s).raise_for_status().text
    values: dict[str, float] = {}
    kv_tokens = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vllm:cache_config_info":
                blocks, size = sample.labels.get("num_gpu_blocks"), sample.labels.get("block_size")
                if blocks and size and blocks != "None":
                    kv_tokens = int(blocks) * int(size)
            else:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    usage = values.get("vllm:kv_cache_usage_perc", values.get("vllm:gpu_cache_usage_perc", 0.0))
    return ServerCapacity(max_num_seqs, kv_tokens, values.get("vllm:num_requests_running", 0.0),
                          values.get("vllm:num_requests_waiting", 0.0), usage)


def knee(latency_growth: float, min_gain: float = 0.15) -> int:
    """In-flight count past which one more request adds less than ``min_gain`` throughput.

    With latency ``L·(1 + g·(k−1))`` for k in flight, throughput is ``k / (L·(1 + g·(k−1)))``.
    """
    def throughput(k: int) -> float:
        return k / (1 + latency_growth * (k - 1))

    k = 1
    while k < 64 and throughput(k + 1) / throughput(k) - 1 >= min_gain:
        k += 1
    return k


def plan_concurrency(cap: ServerCapacity, *, tokens_per_request: int, workers_sharing: int,
                     configured: int, override: bool, latency_growth: float) -> tuple[int, str]:
    """Per-worker concurrency and the arithmetic behind it, as one log line."""
    limits = []
    parts = []
    if cap.max_num_seqs:
        limits.append(cap.max_num_seqs)
        parts.append(f"max_num_seqs {cap.max_num_seqs}")
    if cap.kv_cache_tokens:
        fit = cap.kv_cache_tokens // tokens_per_request
        limits.append(fit)
        parts.append(f"KV cache {cap.kv_cache_tokens} tokens / {tokens_per_request} per request "
                     f"= {fit}")
    k = knee(latency_growth)
    limits.append(k)
    parts.append(f"latency knee {k} (+{latency_growth:.0%} latency per request in flight)")
    server = min(limits)
    per_worker = max(1, math.floor(server / max(1, workers_sharing)))
    wanted = min(configured, per_worker)
    low, high = STAGE2_CONCURRENCY_RANGE
    final = wanted if override else min(high, max(low, wanted))
    line = (f"stage2 concurrency {final}: server allows {server} ({', '.join(parts)}); "
            f"{workers_sharing} worker(s) share it -> {per_worker} each; configured {configured}"
            + ("; override on" if override else f"; clamped to {low}-{high}"))
    return final, line
