"""zroact: two-stage video inference (action detection -> VLM judge) on Celery + Redis."""

from .client import Client, Job
from .config import Settings, get_settings
from .errors import (
    InputError,
    JobNotFoundError,
    JobTimeoutError,
    ZroactError,
)
from .models import Detection, JobReport, JobStatus, Keyframe, SlotResult, Verdict

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
