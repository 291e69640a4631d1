"""Celery settings for zroact, derived from ``zroact_tasks.config.Settings``.

Workers load this module (``app.config_from_object("celeryconfig")``); clients with their own
settings call ``config_for(settings)``. Each value is set on purpose; the why is beside it.
"""

from __future__ import annotations

from typing import Any

from zroact_tasks import pipeline, redisconn
from zroact_tasks.config import Settings, get_settings, task_time_limits

QUEUES = ("control", "stage1", "stage2")


def _time_limits(s: Settings) -> dict[str, dict]:
    """Per-task hard limits (a stuck task is ended, so it cannot outlive the visibility
    timeout), with a soft limit a few seconds earlier so the task can record why it stopped."""
    limits = task_time_limits(s)
    by_task = {pipeline.INGEST: limits["ingest"], pipeline.DETECT: limits["stage1"],
               pipeline.JUDGE: limits["stage2"]}
    by_task |= {name: limits["control"] for name in pipeline.CONTROL_STEPS}
    return {name: {"time_limit": limit, "soft_time_limit": max(1.0, limit - min(10.0, limit / 10))}
            for name, limit in by_task.items()}


def _publish_retries(bound_s: float) -> int:
    """Retries of kombu's publish schedule (0, 1, 2, 3, 4, 4, ... s) that add up to ``bound_s``."""
    total, n = 0.0, 0
    while total < bound_s:
        total += min(redisconn.BACKOFF_CAP_S, n)
        n += 1
    return n


def config_for(s: Settings) -> dict[str, Any]:
    socket = {
        "socket_timeout": redisconn.SOCKET_TIMEOUT_S,
        "socket_connect_timeout": redisconn.CONNECT_TIMEOUT_S,
        "socket_keepalive": True,
        "health_check_interval": redisconn.HEALTH_CHECK_S,
        "retry_on_timeout": True,
    }
    transport = {**socket,
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
        "redis_socket_timeout": redisconn.SOCKET_TIMEOUT_S,
        "redis_socket_connect_timeout": redisconn.CONNECT_TIMEOUT_S,
        "redis_socket_keepalive": True,
        "redis_retry_on_timeout": True,
        "redis_backend_health_check_interval": redisconn.HEALTH_CHECK_S,
        # A Redis restart is a pause: results are stored and tasks published again and again
        # for about a minute (redisconn.RETRY_BOUND_S) before the error reaches the task.
        "result_backend_always_retry": True,
        # (the backend's sleeps are fully jittered: twice the retries cover the same time)
        "result_backend_max_retries": 2 * redisconn.retries_for(s.redis_retry_s),
        "result_backend_base_sleep_between_retries_ms": int(redisconn.BACKOFF_BASE_S * 1000),
        "result_backend_max_sleep_between_retries_ms": int(redisconn.BACKOFF_CAP_S * 1000),
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": _publish_retries(s.redis_retry_s),
                                      "interval_start": 0, "interval_step": 1,
                                      "interval_max": redisconn.BACKOFF_CAP_S},
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,  # a worker waits for Redis as long as it takes
        "task_annotations": _time_limits(s),
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
