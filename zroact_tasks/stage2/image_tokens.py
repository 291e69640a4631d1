"""How many prompt tokens an image costs on a vLLM server, by model family, and the frame size
that fits a request into the server's context.

vLLM resizes every image with the model's own processor before counting, so the count depends on
the family, not on the served name (compose serves Qwen3-VL as ``qwen3-vl-2b-instruct``): the
family is read from the model card's ``root`` (the path or hub id given to ``--model``).

* Qwen2-VL / Qwen2.5-VL: patch 14, merge 2 → 28-px units; each side rounded to the nearest unit,
  then the area clamped into [min_pixels, max_pixels] = [3,136, 12,845,056] (the 3B/7B processor
  values) keeping the aspect; tokens = units_w × units_h, plus 2 (vision start/end) per image.
  1280×720 → 1196, 224×224 → 64, 1920×1080 → 2691, anything over 12.8 MP → 16384.
* Qwen3-VL: patch 16, merge 2 → 32-px units, the same rounding, pixels in [65,536, 16,777,216].
* Any other family: the conservative rule — 28-px units with each side rounded *up* and no upper
  clamp (at least as many tokens as Qwen2.5-VL counts for any size), plus 2. A model that counts
  more per pixel than that is not fitted correctly; its server then answers 400 for length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["TokenRule", "rule_for", "image_tokens", "fit_size", "QWEN2_VL", "QWEN3_VL",
           "CONSERVATIVE"]


@dataclass(frozen=True)
class TokenRule:
    """One family's image-token rule: ``unit``-px cells, area clamped to [min, max] pixels."""

    name: str
    unit: int
    min_pixels: int
    max_pixels: int | None
    round_up: bool = False  # sides rounded up instead of to the nearest unit
    extra: int = 2  # <|vision_start|> and <|vision_end|> around each image

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """The size the model's processor resizes to (Qwen's ``smart_resize``)."""
        u = self.unit
        side = (lambda x: math.ceil(x / u) * u) if self.round_up else (lambda x: round(x / u) * u)
        w, h = max(u, side(width)), max(u, side(height))
        if self.max_pixels is not None and w * h > self.max_pixels:
            beta = math.sqrt(width * height / self.max_pixels)
            w = max(u, math.floor(width / beta / u) * u)
            h = max(u, math.floor(height / beta / u) * u)
        elif w * h < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (width * height))
            w, h = math.ceil(width * beta / u) * u, math.ceil(height * beta / u) * u
        return w, h

    def tokens(self, width: int, height: int) -> int:
        """Prompt tokens of one image of this size, the markers around it included."""
        w, h = self.resized(width, height)
        return (w // self.unit) * (h // self.unit) + self.extra

    @property
    def min_tokens(self) -> int:
        """What the smallest image costs: its area is raised to ``min_pixels`` anyway."""
        return math.ceil(self.min_pixels / self.unit**2) + self.extra


QWEN2_VL = TokenRule("qwen2-vl", 28, 3136, 12_845_056)
QWEN3_VL = TokenRule("qwen3-vl", 32, 65_536, 16_777_216)
CONSERVATIVE = TokenRule("unknown", 28, 3136, None, round_up=True)


def rule_for(root: str | None) -> TokenRule:
    """The rule of the model at ``root`` (a path or hub id); unknown families: CONSERVATIVE."""
    name = (root or "").rstrip("/").rsplit("/", 1)[-1].lower().replace("_", "-")
    if "qwen3-vl" in name or "qwen3vl" in name:
        return QWEN3_VL
    if any(k in name for k in ("qwen2-vl", "qwen2.5-vl", "qwen2vl", "qwen2.5vl", "qwen25-vl")):
        return QWEN2_VL
    return CONSERVATIVE


def image_tokens(root: str | None, width: int, height: int) -> int:
    return rule_for(root).tokens(width, height)


def fit_size(rule: TokenRule, width: int, height: int, budget: int) -> tuple[int, int] | None:
    """The largest size of this aspect, at most ``width``×``height``, whose image costs at most
    ``budget`` tokens; None when not even the smallest image (``min_tokens``) fits.

    Sizes are whole units, so the server's resize leaves them as they are."""
    if rule.tokens(width, height) <= budget:
        return width, height
    if budget < rule.min_tokens:
        return None
    cells = budget - rule.extra
    scale = math.sqrt(cells * rule.unit**2 / (width * height))
    for _ in range(400):  # 3% smaller each time: reaches one unit from any real size
        w = max(rule.unit, math.floor(width * scale / rule.unit) * rule.unit)
        h = max(rule.unit, math.floor(height * scale / rule.unit) * rule.unit)
        if rule.tokens(w, h) <= budget:
            return w, h
        scale *= 0.97
    return None
