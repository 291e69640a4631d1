"""Fit a slot's request into the VLM server's context: frame sizes from the server's own limits.

A real vLLM answers 400 for a prompt longer than its ``max_model_len`` ("Input length (8449)
exceeds model's maximum context length (8192)"), and three 1080p frames already cost ~8,000 tokens
on Qwen2.5-VL. So each request's frames are downscaled, by default, until the prompt plus the
longest answer the verdict schema allows (``max_tokens``) fit: the prompt then always fits, and no
answer the schema allows is cut off. Only when even the smallest image the model takes cannot fit
is the slot refused (``VLMContextError``), before anything is sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import VLMContextError
from .image_tokens import TokenRule, fit_size, rule_for

TEMPLATE_TOKENS = 64
"""The chat template around one user turn (role markers, a default system prompt): ~25 tokens on
Qwen's template, counted generously."""


@dataclass(frozen=True)
class ServerInfo:
    """What ``/v1/models`` says of the served model."""

    model: str
    """The served name (what requests name)."""
    root: str | None
    """The path or hub id it was loaded from: the family (and its image rule) comes from here."""
    max_model_len: int | None
    """Its context in tokens; None when the server does not say (no fitting then)."""

    @property
    def rule(self) -> TokenRule:
        return rule_for(self.root or self.model)


def text_tokens(text: str) -> int:
    """At most the prompt's tokens: a byte-level BPE token is at least one UTF-8 byte."""
    return len(text.encode("utf-8")) + TEMPLATE_TOKENS


def fit_frames(sizes: list[tuple[int, int]], text: str, server: ServerInfo,
               max_tokens: int) -> list[tuple[int, int]]:
    """The (width, height) to send each frame at: as given when the request fits, else each frame
    shrunk (aspect kept, whole units of the family's rule) to an equal share of what is left
    after the text and ``max_tokens``. Raises VLMContextError when the smallest images do not fit."""
    if server.max_model_len is None or not sizes:
        return list(sizes)
    rule = server.rule
    room = server.max_model_len - text_tokens(text) - max_tokens
    if sum(rule.tokens(w, h) for w, h in sizes) <= room:
        return list(sizes)
    share = room // len(sizes)
    fitted = [fit_size(rule, w, h, share) for w, h in sizes]
    if any(size is None for size in fitted):
        raise VLMContextError(
            f"the VLM's context ({server.max_model_len} tokens) cannot hold {len(sizes)} images at "
            f"their smallest ({rule.min_tokens} tokens each on {rule.name}), the prompt (~"
            f"{text_tokens(text)}) and the longest answer (max_tokens {max_tokens}): serve a "
            f"larger --max-model-len, or lower ZROACT_VLM_MAX_TOKENS or ZROACT_SLOT_SIZE")
    return [size for size in fitted if size is not None]
