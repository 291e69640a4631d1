"""Lets PyPI's torchvision import in the vLLM venv although its C++ library cannot load there.

Installed by scripts/install-vllm-cpu.sh as ``zroact_torchvision_hook.py`` in the venv's
site-packages, with a ``.pth`` line that imports it at interpreter start.

Why: vllm-cpu pins ``torch==2.13.0+cpu``, and PyPI's ``torchvision==0.28.0`` is a CUDA build
whose ``_C`` library does not load with that torch. torchvision tolerates that (its
``extension._has_ops()`` returns False) except in ``torchvision/_meta_registrations.py``, which
registers fake kernels for ``torchvision::nms`` and ``torchvision::qnms`` and fails when those
ops were never defined. vLLM's Qwen-VL path (and transformers' video processor, which it always
builds) uses only torchvision's Python transforms, so defining the two schemas is enough.

Lazy: at start-up this only puts a finder on ``sys.meta_path`` (no torch import). The finder
acts when ``torchvision._meta_registrations`` is first looked up — by then torchvision has
imported torch and tried its library — and defines the schemas only if that load failed.
"""

from __future__ import annotations

import sys

_TARGET = "torchvision._meta_registrations"
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # the torch.library.Library; kept alive, or its definitions are dropped


def _define_missing_ops() -> None:
    global _library
    import torch

    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS:
        _library.define(schema)


class _TorchvisionOpsFinder:
    """Finds nothing itself: only a chance to run before torchvision's meta registrations."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(cls)  # once is enough
        has_ops = getattr(sys.modules.get("torchvision.extension"), "_has_ops", None)
        if callable(has_ops) and not has_ops():  # torchvision's own verdict on its library
            _define_missing_ops()
        return None  # the usual finders load the module


if _TorchvisionOpsFinder not in sys.meta_path:
    sys.meta_path.insert(0, _TorchvisionOpsFinder)
