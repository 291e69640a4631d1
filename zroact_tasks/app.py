"""The Celery app. Workers: ``celery -A zroact_tasks.app worker -Q <queue>`` (or ``zroact worker``)."""

from __future__ import annotations

from celery import Celery

import celeryconfig

from .config import Settings

TASK_MODULES = [
    "zroact_tasks.control.tasks",
    "zroact_tasks.stage1.tasks",
    "zroact_tasks.stage2.tasks",
]


def make_app(settings: Settings | None = None) -> Celery:
    """A Celery app on the cluster ``settings`` point at (default: the environment's)."""
    app = Celery("zroact", include=TASK_MODULES)
    if settings is None:
        app.config_from_object(celeryconfig)
    else:
        app.conf.update(celeryconfig.config_for(settings))
    return app


app = make_app()
