"""Security: JSON-only messages, a password-protected Redis end to end, no secret in any log."""

from __future__ import annotations

import time
import uuid

from zroact_tasks import pipeline
from zroact_tasks.local import EmbeddedRedis

from .conftest import start_cluster


def test_a_pickled_message_is_refused(cluster, assets):
    local, client = cluster
    spec_job = client.submit(assets["short_video"])  # a real job, to learn the spec's shape
    spec_job.wait(timeout=120)
    spec = client.jobs.spec(spec_job.id).model_dump(mode="json")
    spec["job_id"] = uuid.uuid4().hex
    client.jobs.create(client.jobs.spec(spec_job.id).model_copy(update={"job_id": spec["job_id"]}), 60)
    # Sent with pickle: the control worker must refuse to deserialize it, so the job never runs.
    client.app.send_task(pipeline.INGEST, args=(spec,), serializer="pickle",
                         task_id=pipeline.ingest_id(spec["job_id"]))
    after = client.submit(assets["short_video"]).wait(timeout=120)  # queued behind it (FIFO)
    assert after.status == "succeeded"
    deadline = time.monotonic() + 10
    while "untrusted content" not in local.logs() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "Refusing to deserialize untrusted content of type pickle" in local.logs()
    assert client.jobs.meta(spec["job_id"])["state"] == "queued"
    assert client.jobs.report_json(spec["job_id"]) is None


def test_password_protected_redis_end_to_end_and_no_secret_in_logs(assets, standin, tmp_path):
    secret = "pw-" + uuid.uuid4().hex
    with EmbeddedRedis(password=secret) as server:
        env = {"ZROACT_MODEL": str(assets["model"]), "ZROACT_VLM_URL": standin.url}
        local, client = start_cluster(server.url, env, tmp_path / "logs")
        try:
            report = client.submit(assets["short_video"]).wait(timeout=120)
            assert report.status == "succeeded" and report.slots[0].verdict is not None
        finally:
            local.stop()
            client.close()
        logs = local.logs()
    assert "redis://" in logs  # the banner names the broker: with the password masked
    assert secret not in logs
