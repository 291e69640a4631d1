"""The Celery app. Workers: ``celery -A zroact_tasks.app worker -Q <queue>`` (or ``zroact worker``)."""

from __future__ import annotations

import logging

from celery import Celery, Task
from celery.exceptions import Reject

import celeryconfig

from . import liveness, resources  # noqa: F401  (liveness: every worker's heartbeat)
from .config import Settings
from .redisconn import TRANSIENT_ERRORS

log = logging.getLogger(__name__)

TASK_MODULES = [
    "zroact_tasks.control.tasks",
    "zroact_tasks.stage1.tasks",
    "zroact_tasks.stage2.tasks",
]


class TransientTask(Task):
    """A task that gives its message back when Redis stays away longer than the clients'
    own retries (``REDIS_RETRY_S``): requeued, never acked as done or failed."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except TRANSIENT_ERRORS as exc:
            if self.request.called_directly:
                raise
            log.warning("%s[%s]: Redis unavailable (%s: %s); requeued", self.name,
                        self.request.id, type(exc).__name__, exc)
            try:  # a requeue for an outage is not a worker crash: off the poison count
                resources.jobs().forgive_delivery(self.delivery_key)
            except TRANSIENT_ERRORS:
                pass  # still down: this delivery counts, which MAX_TASK_DELIVERIES allows for
            raise Reject(exc, requeue=True) from exc

    @property
    def delivery_key(self) -> str:
        """What ``JobStore.check_delivery`` counts: a deliberate retry is a new message."""
        retries = self.request.retries or 0
        return f"{self.request.id}:{retries}" if retries else self.request.id


def make_app(settings: Settings | None = None) -> Celery:
    """A Celery app on the cluster ``settings`` point at (default: the environment's)."""
    app = Celery("zroact", include=TASK_MODULES, task_cls=TransientTask)
    if settings is None:
        app.config_from_object(celeryconfig)
    else:
        app.conf.update(celeryconfig.config_for(settings))
    return app


app = make_app()
