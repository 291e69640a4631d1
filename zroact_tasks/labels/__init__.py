"""Class names of YOWOv3's published datasets, in its configs' index order (line i = class i):
``ucf101-24``, ``ava-80``, ``ucf-crime-13``, ``jhmdb-21``. Use one as ``ZROACT_LABELS`` with
``path("ucf101-24")`` or ``python -m zroact_tasks.labels ucf101-24`` (prints the path)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

NAMES = ("ucf101-24", "ava-80", "ucf-crime-13", "jhmdb-21")


def path(name: str) -> Path:
    if name not in NAMES:
        raise KeyError(f"no label list {name!r}; there are {', '.join(NAMES)}")
    return Path(str(files(__name__) / f"{name}.txt"))
