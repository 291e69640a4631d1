"""Real services for the suite: a throwaway redis-server, worker subprocesses, the vLLM stand-in."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from zroact_tasks.client import Client
from zroact_tasks.config import Settings
from zroact_tasks.local import EmbeddedRedis, LocalCluster
from zroact_tasks.testing.onnx_models import make_yowo_model, write_labels
from zroact_tasks.testing.sample_media import make_video
from zroact_tasks.testing.vllm_standin import VLLMStandIn

ROOT = Path(__file__).resolve().parent.parent
REPORT_SCHEMA = ROOT / "docs" / "report.schema.json"


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("assets")
    return {
        "video": make_video(d / "sample.mp4", frames=419),
        "short_video": make_video(d / "short.mp4", frames=47),
        "model": make_yowo_model(d / "model.onnx"),
        "model_b1": make_yowo_model(d / "model_b1.onnx", batch=1),
        "labels": write_labels(d / "labels.txt"),
    }


@pytest.fixture(scope="session")
def redis_server():
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture(scope="session")
def standin():
    with VLLMStandIn(model="Qwen/Qwen2.5-VL-3B-Instruct") as server:
        yield server


def start_cluster(redis_url: str, env: dict[str, str], log_dir: Path) -> tuple[LocalCluster, Client]:
    cluster = LocalCluster(redis_url, env=env, log_dir=log_dir).start()
    client = Client(settings=Settings(redis_url=redis_url))
    try:
        cluster.wait_ready(client.app)
    except RuntimeError:
        cluster.stop()
        raise RuntimeError(cluster.logs())
    return cluster, client


@pytest.fixture(scope="session")
def cluster(redis_server, standin, assets, tmp_path_factory):
    """Control, Stage 1 and Stage 2 workers on the test Redis, Stage 2 on the stand-in."""
    env = {"ZROACT_MODEL": str(assets["model"]), "ZROACT_LABELS": str(assets["labels"]),
           "ZROACT_VLM_URL": standin.url + "/v1", "ZROACT_VLM_MAX_RETRIES": "1",
           "ZROACT_VLM_BACKOFF_MAX_S": "0.2", "ZROACT_VLM_TIMEOUT_S": "5"}
    cluster, client = start_cluster(redis_server.url, env, tmp_path_factory.mktemp("logs"))
    yield cluster, client
    cluster.stop()
    client.close()


@pytest.fixture(scope="session")
def client(cluster) -> Client:
    return cluster[1]


@pytest.fixture(autouse=True)
def _standin_reset(request):
    yield
    if "standin" in request.fixturenames:
        server = request.getfixturevalue("standin")
        server.set_fault(None)
        server.release()


def pytest_report_header(config):
    return f"zroact tests: real redis-server, worker subprocesses (pid {os.getpid()})"
