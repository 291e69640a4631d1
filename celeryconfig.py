"""Celery settings for zroact, derived from ``zroact_tasks.config.Settings``.

Workers load this module (``app.config_from_object("celeryconfig")``); clients with their own
settings call ``config_for(settings)``. Each value is set on purpose; the why is beside it.
"""

from __future__ import annotations

from typing import Any

from zroact_tasks.config import Settings, get_settings

QUEUES = ("control", "stage1", "stage2")


def config_for(s: Settings) -> dict[str, Any]:
    transport = {
        # Redelivery of an unacked task happens after this: it must exceed the longest task.
        "visibility_timeout": s.visibility_timeout_s,
        # kombu scans for unacked messages of dead workers only every ~100 s by default;
        # once a second keeps redelivery at visibility timeout + ~1 s.
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }
    return {
        "broker_url": s.redis_url,
        "result_backend": s.redis_url,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": s.visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        # JSON only: a pickled message is refused, so no message can run code in a worker.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # A task is acked after it ran; a worker that dies mid-task gives it back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # GPU and VLM tasks are long: a worker must not hoard queued tasks it cannot start.
        "worker_prefetch_multiplier": 1,
        "task_default_queue": "control",
        "task_routes": {
            "zroact.stage1.*": {"queue": "stage1"},
            "zroact.stage2.*": {"queue": "stage2"},
            "zroact.control.*": {"queue": "control"},
        },
        # Flower sees every task, including ones not yet started.
        "task_send_sent_event": True,
        "worker_send_task_events": True,
        "task_track_started": True,
        "result_extended": True,
        "result_expires": s.result_ttl_s,
        "task_ignore_result": False,  # chord headers need their results
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
    }


globals().update(config_for(get_settings()))
