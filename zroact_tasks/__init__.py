"""zroact: two-stage video inference (action detection -> VLM judge) on Celery + Redis."""

from importlib import import_module as _import_module
from typing import Any as _Any

from .config import Settings, get_settings
from .errors import (
    InputError,
    JobNotFoundError,
    JobTimeoutError,
    ZroactError,
)
from .models import Detection, JobReport, JobStatus, Keyframe, SlotResult, Verdict

_LAZY = {"Client": ".client", "Job": ".client"}
"""Imported on first use: the client brings the Celery app, whose config reads the settings, so
``import zroact_tasks`` (and ``zroact --help``) never fails on a bad ZROACT_* value."""


def __getattr__(name: str) -> _Any:
    if name in _LAZY:
        value = getattr(_import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Client",
    "Detection",
    "InputError",
    "Job",
    "JobNotFoundError",
    "JobReport",
    "JobStatus",
    "JobTimeoutError",
    "Keyframe",
    "Settings",
    "SlotResult",
    "Verdict",
    "ZroactError",
    "get_settings",
]
