"""docker-compose.yml, .env.example and workers/ checked against the compose spec and zroact itself.

The compose file is read twice: raw (for the JSON schema and the no-literal-password rule) and
interpolated with .env.example the way Compose does it (for everything about what would run).
Each ``*_problems`` checker returns what is wrong; the last tests feed them broken copies to show
that they can fail.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

import celeryconfig
from zroact_tasks.config import STAGE2_CONCURRENCY_RANGE, Settings
from zroact_tasks.local import EmbeddedRedis

from .helpers import skip_unless_ci

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
ENTRYPOINT = ROOT / "workers" / "entrypoint.sh"
SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"  # vendored: data/README.md
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

GPU_SERVICES = ("vllm", "stage1")
# .env.example leaves these empty (so nothing starts with a published secret): the tests fill them.
SECRETS = ("REDIS_PASSWORD", "API_TOKEN", "FLOWER_BASIC_AUTH")
TEST_SECRETS = {"REDIS_PASSWORD": "5f0c1d2e3a4b5c6d7e8f90a1b2c3d4e5",
                "API_TOKEN": "9a8b7c6d5e4f30211f2e3d4c5b6a7980",
                "FLOWER_BASIC_AUTH": "admin:3c4d5e6f7a8b9c0d"}
SHARED_SETTINGS = ("ZROACT_REDIS_URL", "ZROACT_VISIBILITY_TIMEOUT_S", "ZROACT_RESULT_TTL_S")

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, $NAME and $$.
_VAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
                  r"|(?P<bare>[A-Za-z_]\w*))")


# --- reading the files ---------------------------------------------------------------------------

def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            env[key.strip()] = value.strip()
    return env


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution over every string of a loaded compose file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        name, op = m["name"] or m["bare"], m["op"] or ""
        current = env.get(name)
        missing = not current if op.startswith(":") else current is None
        if missing and op.endswith("-"):
            return m["arg"]
        if missing and op.endswith("?"):
            raise KeyError(f"{name}: {m['arg']}")
        if current is None:
            raise KeyError(f"{name} is not set")
        return current

    return _VAR.sub(substitute, value)


def variables_used(text: str) -> set[str]:
    return {m["name"] or m["bare"] for m in _VAR.finditer(text) if not m["escaped"]}


def raw_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def filled_env() -> dict[str, str]:
    """.env.example with its secrets set, as a user's .env is."""
    return read_env_file(ENV_EXAMPLE) | TEST_SECRETS


def resolved_compose() -> dict:
    return interpolate(raw_compose(), filled_env())


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def as_list(command: Any) -> list[str]:
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def role_of(service: dict) -> str | None:
    """The queue a service consumes: WORKER_ROLE (workers/entrypoint.sh) or `zroact worker ROLE`."""
    if "WORKER_ROLE" in environment(service):
        return environment(service)["WORKER_ROLE"]
    words = as_list(service.get("entrypoint")) + as_list(service.get("command"))
    for i, word in enumerate(words[:-2]):
        if word.endswith("zroact") and words[i + 1] == "worker":
            return words[i + 2]
    return None


def worker_services(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if role_of(s)}


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_of(service: dict) -> Path:
    build = service["build"]
    context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
    return context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")


def exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for word, args in instructions:
        if word == "ENV":
            env.update(item.partition("=")[::2] for item in shlex.split(args))
    return env


def base_images(instructions: list[tuple[str, str]]) -> list[str]:
    """FROM images with the defaults of the ARGs declared before them substituted."""
    args, images = {}, []
    for word, rest in instructions:
        if word == "ARG" and "=" in rest and not images:
            key, _, value = rest.partition("=")
            args[key] = value.strip('"')
        elif word == "FROM":
            images.append(interpolate(rest.split()[0], args))
    return images


def is_pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and re.search(r"\d+\.\d+", tag) is not None


def mounts(service: dict) -> list[tuple[str, str, str]]:
    """(source, target, mode) of each volume, short or long syntax."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            out.append((volume.get("source", ""), volume["target"],
                        "ro" if volume.get("read_only") else "rw"))
            continue
        source, target, *mode = volume.split(":")
        out.append((source, target, mode[0] if mode else "rw"))
    return out


def bind_mounts(service: dict) -> list[tuple[str, str, str]]:
    """The long-syntax bind mounts (a missing source is an error, not a new directory)."""
    return [(v["source"], v["target"], "ro" if v.get("read_only") else "rw")
            for v in service.get("volumes", [])
            if isinstance(v, dict) and v.get("type") == "bind"]


def flag_value(words: list[str], flag: str) -> str | None:
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            return words[i + 1]
        if word.startswith(flag + "="):
            return word.split("=", 1)[1]
    return None


# --- checkers --------------------------------------------------------------------------------------

def consumer_problems(compose: dict) -> list[str]:
    roles = {role_of(s) for s in worker_services(compose).values()}
    problems = [f"queue {q!r} has no consumer service" for q in celeryconfig.QUEUES if q not in roles]
    problems += [f"service role {r!r} is not a queue" for r in roles - set(celeryconfig.QUEUES)]
    return problems


def scaling_problems(compose: dict) -> list[str]:
    problems = []
    for name, service in worker_services(compose).items():
        for key in ("container_name", "hostname", "ports"):
            if key in service:
                problems.append(f"{name}: {key} breaks --scale (fixed name or host port)")
    return problems


def gpu_problems(compose: dict) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        devices = (service.get("deploy", {}).get("resources", {}).get("reservations", {})
                   .get("devices", []))
        gpu = any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
                  and int(d.get("count", 0) or 0) >= 1 for d in devices)
        if name in GPU_SERVICES and not gpu:
            problems.append(f"{name}: reserves no GPU")
        if name not in GPU_SERVICES and devices:
            problems.append(f"{name}: reserves devices it does not need")
        if "gpus" in service:
            problems.append(f"{name}: service-level gpus: is not accepted by docker-compose 1.29")
    return problems


_SECRET_KEY = re.compile(r"PASSWORD|TOKEN|SECRET|AUTH", re.I)


def literal_secret_problems(text: str, env_example: dict[str, str]) -> list[str]:
    """Secrets in the compose text must be ${VAR} references, never values."""
    problems = []
    for m in re.finditer(r"--requirepass[\s\"',=]+([^\s\"',\]]+)", text):
        if not m[1].startswith("$"):
            problems.append(f"literal --requirepass {m[1]}")
    for m in re.finditer(r"(?:redis|rediss)://[^:@/\s]*:([^@\s]+)@", text):
        if not m[1].startswith("${"):
            problems.append(f"literal password in a Redis URL: {m[0]}")
    for m in re.finditer(r"^\s*-?\s*([A-Z0-9_]+)\s*[:=]\s*(.*)$", text, re.M):
        key, value = m[1], m[2].strip().strip("'\"")
        if _SECRET_KEY.search(key) and value and not re.fullmatch(r"\$\{?\$?\w+[^}]*\}?", value):
            problems.append(f"{key} is given a literal value")
    for key in ("REDIS_PASSWORD", "FLOWER_BASIC_AUTH", "HF_TOKEN", "API_TOKEN"):
        value = env_example.get(key, "")
        if value and value in text:
            problems.append(f"the .env.example value of {key} appears in the compose file")
    return problems


def stage2_budget_problems(compose: dict) -> list[str]:
    problems = []
    low, high = STAGE2_CONCURRENCY_RANGE
    stage2 = environment(compose["services"]["stage2"])
    concurrency = int(stage2.get("ZROACT_STAGE2_CONCURRENCY", Settings().stage2_concurrency))
    if not low <= concurrency <= high and stage2.get("ZROACT_STAGE2_CONCURRENCY_OVERRIDE") != "true":
        problems.append(f"stage2 concurrency {concurrency} is outside {low}-{high}")
    words = as_list(compose["services"]["vllm"].get("command"))
    max_seqs = int(flag_value(words, "--max-num-seqs") or 0)
    if max_seqs < concurrency:
        problems.append(f"vLLM --max-num-seqs {max_seqs} < one Stage 2 worker's {concurrency}")
    limits = json.loads(flag_value(words, "--limit-mm-per-prompt") or "{}")
    images = limits.get("image", 0)
    images = images.get("count", 0) if isinstance(images, dict) else images
    if images < Settings().slot_size:
        problems.append(f"vLLM accepts {images} images per prompt < slot size {Settings().slot_size}")
    if flag_value(words, "--served-model-name") != stage2.get("ZROACT_VLM_MODEL"):
        problems.append("stage2 asks for a model name vLLM does not serve")
    return problems


API_COMMAND = ["zroact", "api", "--host", "0.0.0.0", "--port", "8080"]


def api_problems(compose: dict) -> list[str]:
    """The HTTP API: `zroact api` on 8080 from the control image, its token required, and the
    media volume read-write at the control workers' MEDIA_ROOT (uploads land where they read)."""
    services = compose["services"]
    if "api" not in services:
        return ["no api service"]
    api, control = services["api"], services["control"]
    env, problems = environment(api), []
    if as_list(api.get("entrypoint")) + as_list(api.get("command")) != API_COMMAND:
        problems.append(f"api does not run {' '.join(API_COMMAND)}")
    if api.get("image") != control.get("image"):
        problems.append("api does not run the control image")
    root = env.get("ZROACT_MEDIA_ROOT")
    if root != environment(control).get("ZROACT_MEDIA_ROOT"):
        problems.append("api and control see the media under different roots")
    media = [m for m in bind_mounts(control) if m[1] == root]
    if not media or (media[0][0], root, "rw") not in bind_mounts(api):
        problems.append("api: MEDIA_DIR is not bound read-write at its MEDIA_ROOT")
    if not env.get("ZROACT_API_TOKEN"):
        problems.append("api: no ZROACT_API_TOKEN")
    if env.get("ZROACT_API_AUTH_DISABLED", "false").lower() not in ("", "0", "false", "no", "off"):
        problems.append("api: authentication disabled")
    if not any(str(port).endswith(":8080") for port in api.get("ports", [])):
        problems.append("api: port 8080 is not published")
    return problems


def build_once_problems(compose: dict) -> list[str]:
    """Each image tag is built by one service (the others that run it only name it)."""
    builders: dict[str, list[str]] = {}
    for name, service in compose["services"].items():
        if "build" in service:
            builders.setdefault(service.get("image", name), []).append(name)
    problems = [f"{image} is built by {', '.join(names)}"
                for image, names in builders.items() if len(names) > 1]
    for name, service in compose["services"].items():
        if "build" not in service and service.get("image") in builders \
                and service.get("pull_policy") != "never":
            problems.append(f"{name} runs the built {service['image']} but may pull it")
    return problems


# --- the compose file as a whole ---------------------------------------------------------------

def schema_problems(compose: dict) -> list[str]:
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)  # its $schema names draft-07
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose)]


def test_compose_file_matches_the_compose_spec():
    assert schema_problems(raw_compose()) == []


def test_compose_file_avoids_what_docker_compose_1_29_rejects():
    compose = raw_compose()
    assert not {"name", "include"} & compose.keys()
    assert gpu_problems(compose) == []


def _docker_compose(*args: str, env_file: Path, compose_file: Path = COMPOSE) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    if binary is None:
        skip_unless_ci("docker-compose is not installed (apt-get install docker-compose)")
    # Only the env file decides: variables of this shell would override it.
    env = {k: v for k, v in os.environ.items() if k not in filled_env()}
    return subprocess.run([binary, "--env-file", str(env_file), "-f", str(compose_file), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def write_env(path: Path, env: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return path


@pytest.fixture()
def filled_env_file(tmp_path) -> Path:
    return write_env(tmp_path / "filled.env", filled_env())


def test_docker_compose_config_accepts_it(filled_env_file):
    result = _docker_compose("config", "-q", env_file=filled_env_file)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("secret", SECRETS)
def test_docker_compose_refuses_to_start_without_a_secret(tmp_path, secret):
    env_file = write_env(tmp_path / "env", {k: v for k, v in filled_env().items() if k != secret})
    result = _docker_compose("config", "-q", env_file=env_file)
    assert result.returncode != 0 and f"set {secret}" in result.stderr


def test_env_example_publishes_no_secret_and_starts_nothing_as_shipped():
    """Issue 15, defect 5: a placeholder would pass the `:?` checks and run with a secret anyone
    can read here; empty, Compose refuses every service until .env sets it."""
    env_example = read_env_file(ENV_EXAMPLE)
    for secret in SECRETS:
        assert env_example[secret] == "", secret
        assert f"${{{secret}:?" in COMPOSE.read_text(), secret
    result = _docker_compose("config", "-q", env_file=ENV_EXAMPLE)
    assert result.returncode != 0 and "set REDIS_PASSWORD" in result.stderr, result.stderr


def test_env_example_defines_exactly_the_variables_the_compose_file_uses():
    used = variables_used(json.dumps(raw_compose()))  # what Compose reads: no comments
    defined = set(read_env_file(ENV_EXAMPLE))
    assert used - defined == set(), "used in docker-compose.yml, missing from .env.example"
    assert defined - used == set(), "in .env.example, used nowhere"
    resolved_compose()  # no ${VAR:?} left unsatisfied


# --- against the Celery setup ----------------------------------------------------------------------

def test_every_queue_has_a_consumer_service():
    assert consumer_problems(resolved_compose()) == []


def test_each_worker_image_defaults_to_the_role_compose_gives_it():
    for name, service in worker_services(resolved_compose()).items():
        assert dockerfile_env(dockerfile(dockerfile_of(service))).get("WORKER_ROLE") == \
            role_of(service), name


def test_stage2_concurrency_is_within_the_vram_budget():
    low, high = STAGE2_CONCURRENCY_RANGE
    assert low <= int(read_env_file(ENV_EXAMPLE)["STAGE2_CONCURRENCY"]) <= high
    default = re.search(r"\$\{STAGE2_CONCURRENCY:-(\d+)\}", COMPOSE.read_text())
    assert default and low <= int(default[1]) <= high
    assert stage2_budget_problems(resolved_compose()) == []


def test_gpu_services_reserve_a_gpu():
    assert gpu_problems(resolved_compose()) == []


def test_scalable_services_have_no_fixed_name_or_port():
    compose = resolved_compose()
    assert set(worker_services(compose)) == {"stage1", "stage2", "control"}
    assert scaling_problems(compose) == []


def test_every_zroact_process_shares_the_cluster_settings():
    compose = resolved_compose()
    env_example = filled_env()
    zroact = {n: environment(s) for n, s in compose["services"].items()
              if any(k.startswith("ZROACT_") for k in environment(s))}
    assert set(zroact) == {"stage1", "stage2", "control", "flower", "api", "metrics"}
    for key in SHARED_SETTINGS:
        assert len({env.get(key) for env in zroact.values()}) == 1, key
    url = zroact["control"]["ZROACT_REDIS_URL"]
    assert url == f"redis://:{env_example['REDIS_PASSWORD']}@{env_example['REDIS_ADDRESS']}/0"
    assert env_example["REDIS_ADDRESS"] == "redis:6379"  # the example runs Redis here
    for name, env in zroact.items():  # every value is one zroact accepts
        Settings(**{k.removeprefix("ZROACT_").lower(): v for k, v in env.items()
                    if k.startswith("ZROACT_")})


def test_stage1_reads_its_model_from_a_read_only_mount():
    stage1 = resolved_compose()["services"]["stage1"]
    model = environment(stage1)["ZROACT_MODEL"]
    assert any(model.startswith(target + "/") and mode == "ro"
               for _, target, mode in mounts(stage1)), model


def test_control_reads_videos_under_its_media_root():
    compose = resolved_compose()
    control = compose["services"]["control"]
    root = environment(control)["ZROACT_MEDIA_ROOT"]
    # A plain bind of MEDIA_DIR (a named volume with bind options kept its first path: issue 15)
    assert (filled_env()["MEDIA_DIR"], root, "ro") in bind_mounts(control)
    assert "media" not in (compose.get("volumes") or {})
    raw = raw_compose()["services"]
    for name in ("control", "api"):
        source = [v for v in raw[name]["volumes"] if isinstance(v, dict)][0]["source"]
        assert source.startswith("${MEDIA_DIR:?"), name
    assert environment(control).get("ZROACT_VLM_URL") == \
        environment(compose["services"]["stage2"])["ZROACT_VLM_URL"]


def test_api_serves_uploads_into_the_media_volume_with_a_required_token():
    compose = resolved_compose()
    assert api_problems(compose) == []
    assert build_once_problems(compose) == []
    raw = environment(raw_compose()["services"]["api"])
    assert raw["ZROACT_API_TOKEN"].startswith("${API_TOKEN:?")  # from .env, no default
    api = compose["services"]["api"]
    assert "http://localhost:8080/healthz" in " ".join(api["healthcheck"]["test"])
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert int(environment(api)["ZROACT_API_MAX_UPLOAD_BYTES"]) == \
        Settings().api_max_upload_bytes  # the example keeps zroact's default


def test_stage2_waits_for_a_healthy_vllm():
    compose = resolved_compose()
    assert compose["services"]["stage2"]["depends_on"]["vllm"]["condition"] == "service_healthy"
    vllm = compose["services"]["vllm"]
    assert "http://localhost:8000/health" in " ".join(vllm["healthcheck"]["test"])
    assert flag_value(as_list(vllm["command"]), "--port") == "8000"
    assert environment(compose["services"]["stage2"])["ZROACT_VLM_URL"] == "http://vllm:8000"


# --- images and entry points ---------------------------------------------------------------------

def test_images_and_base_images_are_pinned():
    compose = resolved_compose()
    for name, service in compose["services"].items():
        if "build" in service:
            instructions = dockerfile(dockerfile_of(service))
            assert base_images(instructions), name
            for image in base_images(instructions):
                assert is_pinned(image), f"{name}: FROM {image}"
        else:
            assert is_pinned(service["image"]), f"{name}: {service['image']}"


def test_every_dockerfile_exists_and_starts_a_known_program():
    compose = resolved_compose()
    scripts = PYPROJECT["project"]["scripts"]
    dependencies = " ".join(PYPROJECT["project"]["dependencies"])
    for name, service in compose["services"].items():
        if "build" not in service:
            continue
        path = dockerfile_of(service)
        assert path.is_file(), f"{name}: {path}"
        instructions = dockerfile(path)
        copied = {}
        for word, args in instructions:
            if word == "COPY":
                *sources, dest = shlex.split(args)
                for source in sources:
                    assert (ROOT / source).exists(), f"{name}: COPY {source}"
                copied[dest] = sources
        last = {w: exec_form(a) for w, a in instructions if w in ("ENTRYPOINT", "CMD")}
        words = (as_list(service.get("entrypoint")) or last.get("ENTRYPOINT", [])) + \
            (as_list(service.get("command")) or last.get("CMD", []))
        assert words, f"{name}: starts nothing"
        program = words[0]
        if program in copied:  # a script of ours: it must exist and start the zroact command
            script = ROOT / copied[program][0]
            assert script.is_file() and "exec zroact worker" in script.read_text(), name
            assert "zroact" in scripts, "pyproject declares no zroact console script"
        elif program == "zroact":
            assert "zroact" in scripts
        elif program == "celery":
            assert "celery" in dependencies
            assert words[words.index("-A") + 1] == "zroact_tasks.app", name
        else:
            pytest.fail(f"{name}: starts {program!r}, neither a script of ours nor a console script")


def test_slim_images_need_no_onnxruntime():
    """control, stage2 and flower images skip onnxruntime: the package must import without it."""
    code = ("import sys\nsys.modules['onnxruntime'] = sys.modules['onnx'] = None\n"
            "import zroact_tasks.app, zroact_tasks.cli\n"
            "import zroact_tasks.control.tasks, zroact_tasks.stage1.tasks, zroact_tasks.stage2.tasks\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for role in ("control", "stage2", "flower"):
        text = (ROOT / "workers" / role / "Dockerfile").read_text()
        assert "[gpu]" not in text and "[cpu]" not in text and "onnxruntime-gpu" not in text, role


# --- Redis and Flower ------------------------------------------------------------------------------

def test_no_literal_password_in_the_compose_file():
    assert literal_secret_problems(COMPOSE.read_text(), read_env_file(ENV_EXAMPLE)) == []


def test_redis_keeps_an_append_only_file_and_requires_the_password():
    redis = resolved_compose()["services"]["redis"]
    command = " ".join(as_list(redis["command"]))
    assert re.search(r"--appendonly\s+yes\b", command)
    assert re.search(r"--requirepass\s+\S", command)
    assert any(target == "/data" for _, target, _ in mounts(redis))
    check = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli" in check and "ping" in check and " -a " not in check
    assert environment(redis)["REDISCLI_AUTH"] == filled_env()["REDIS_PASSWORD"]
    # Not root, whatever the image's entrypoint does (it drops privileges only for a first
    # argument redis-server, and this command is sh -c).
    assert str(redis.get("user", "root")).split(":")[0] not in ("root", "0")


def test_flower_has_basic_auth_and_keeps_its_state():
    flower = resolved_compose()["services"]["flower"]
    words = as_list(flower["command"])
    auth = environment(flower).get("FLOWER_BASIC_AUTH") or flag_value(words, "--basic-auth")
    assert auth and all(re.fullmatch(r"[^:,]+:[^,]+", pair) for pair in auth.split(","))
    assert flag_value(words, "--persistent") == "True"
    db = flag_value(words, "--db")
    assert db and any(db.startswith(target + "/") for _, target, _ in mounts(flower))
    assert any(port.endswith(":5555") for port in flower["ports"])


# --- the entry point script, for real ---------------------------------------------------------------

def _entrypoint(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_entrypoint_script_is_valid_sh():
    assert subprocess.run(["sh", "-n", str(ENTRYPOINT)], capture_output=True).returncode == 0
    if shutil.which("shellcheck"):
        result = subprocess.run(["shellcheck", "-s", "sh", str(ENTRYPOINT)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def test_entrypoint_starts_a_worker_its_health_check_finds(tmp_path):
    bin_dir = str(Path(sys.executable).parent)  # the venv's zroact and celery
    with EmbeddedRedis(password="s3cret") as redis:
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
               "ZROACT_REDIS_URL": redis.url, "HEALTH_TIMEOUT_S": "3"}
        env.pop("WORKER_ROLE", None)
        unset = _entrypoint(env=env)
        assert unset.returncode == 2 and "WORKER_ROLE" in unset.stderr
        assert _entrypoint("echo", "passed through", env=env).stdout == "passed through\n"

        env["WORKER_ROLE"] = "control"
        assert _entrypoint("health", env=env).returncode != 0  # nothing runs yet
        log = (tmp_path / "worker.log").open("w")
        worker = subprocess.Popen(["sh", str(ENTRYPOINT), "-c", "1", "-l", "WARNING"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while _entrypoint("health", env=env).returncode != 0:
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()
                assert time.monotonic() < deadline, "the worker never answered its health check"
                time.sleep(1)
        finally:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, 9)
                worker.wait()
            log.close()


# --- the checkers can fail ---------------------------------------------------------------------------

def _broken(edit) -> dict:
    compose = copy.deepcopy(resolved_compose())
    edit(compose["services"])
    return compose


@pytest.mark.parametrize("checker, edit", [
    (consumer_problems, lambda s: s.pop("stage1")),
    (consumer_problems, lambda s: s["control"]["environment"].update(WORKER_ROLE="ingest")),
    (scaling_problems, lambda s: s["stage2"].update(container_name="zroact-stage2")),
    (scaling_problems, lambda s: s["stage1"].update(ports=["8080:8080"])),
    (gpu_problems, lambda s: s["stage1"].pop("deploy")),
    (gpu_problems, lambda s: s["vllm"].update(gpus="all")),
    (stage2_budget_problems, lambda s: s["stage2"]["environment"]
     .update(ZROACT_STAGE2_CONCURRENCY="5")),
    (stage2_budget_problems, lambda s: s["vllm"]["command"].__setitem__(
        s["vllm"]["command"].index("--limit-mm-per-prompt") + 1, '{"image": 1}')),
    (stage2_budget_problems, lambda s: s["stage2"]["environment"].update(ZROACT_VLM_MODEL="other")),
    (api_problems, lambda s: s.pop("api")),
    (api_problems, lambda s: s["api"].update(volumes=["media:/media:ro"])),
    (api_problems, lambda s: s["api"]["volumes"][0].update(read_only=True)),
    (build_once_problems, lambda s: s["api"].update(build=s["control"]["build"])),
    (build_once_problems, lambda s: s["metrics"].pop("pull_policy")),
    (api_problems, lambda s: s["api"]["environment"].update(ZROACT_MEDIA_ROOT="/data")),
    (api_problems, lambda s: s["api"]["environment"].update(ZROACT_API_AUTH_DISABLED="true")),
    (api_problems, lambda s: s["api"]["environment"].pop("ZROACT_API_TOKEN")),
    (api_problems, lambda s: s["api"].pop("ports")),
    (api_problems, lambda s: s["api"].update(command=["zroact", "api"])),
])
def test_checkers_catch_a_broken_compose_file(checker, edit):
    assert checker(_broken(edit)) != []


def _raw_broken(edit) -> dict:
    compose = copy.deepcopy(raw_compose())
    edit(compose["services"])
    return compose


@pytest.mark.parametrize("edit", [
    lambda s: s["stage1"].update(ports="8080:8080"),  # a list, not a string
    lambda s: s["control"].update(replicas=2),  # deploy.replicas; no such service key
    lambda s: s["redis"].update(healthcheck={"test": ["CMD", "true"], "interval": 5}),  # a duration
    lambda s: s["stage2"].update(depends_on={"vllm": {"condition": "when_ready"}}),
])
def test_schema_catches_a_broken_compose_file(edit):
    assert schema_problems(_raw_broken(edit)) != []


def test_docker_compose_refuses_a_broken_compose_file(tmp_path, filled_env_file):
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(yaml.safe_dump(_raw_broken(lambda s: s["control"].update(replicas=2))))
    result = _docker_compose("config", "-q", env_file=filled_env_file, compose_file=broken)
    assert result.returncode != 0 and "replicas" in result.stderr, result.stderr
    # The same file unbroken passes: what failed was the edit, not the copy.
    broken.write_text(yaml.safe_dump(raw_compose()))
    result = _docker_compose("config", "-q", env_file=filled_env_file, compose_file=broken)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("text", [
    'command: ["redis-server", "--requirepass", "hunter2"]',
    "ZROACT_REDIS_URL: redis://:hunter2@redis:6379/0",
    "FLOWER_BASIC_AUTH: admin:hunter2",
    "HF_TOKEN: hf_abcdef",
    "ZROACT_API_TOKEN: s3cr3t-token",
])
def test_secret_checker_catches_a_literal(text):
    assert literal_secret_problems(text, {}) != []


# --- issue 15: what the compose smoke test (scripts/compose-smoke.sh) found ----------------------

def test_images_give_their_user_a_home_and_stage2_knows_its_vlm_is_shared():
    for role in ("control", "stage1", "stage2", "flower"):
        text = (ROOT / "workers" / role / "Dockerfile").read_text()
        assert "useradd" in text and "--no-create-home" not in text, role
        assert "--create-home" in text, role
    stage2 = environment(resolved_compose()["services"]["stage2"])
    assert int(stage2["ZROACT_STAGE2_WORKERS_PER_VLM"]) >= 1
    assert stage2["ZROACT_VLM_MAX_NUM_SEQS"] == \
        flag_value(as_list(resolved_compose()["services"]["vllm"]["command"]), "--max-num-seqs")


def test_stage1_dockerfile_has_a_cpu_variant_the_smoke_builds():
    text = (ROOT / "workers" / "stage1" / "Dockerfile").read_text()
    assert "ARG DEVICE=gpu" in text and '"/tmp/src[cpu]"' in text
    class Loader(yaml.SafeLoader):  # Compose v2's !reset / !override tags, read as plain values
        pass

    Loader.add_multi_constructor("!", lambda loader, _tag, node: (
        loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
        else loader.construct_mapping(node) if isinstance(node, yaml.MappingNode)
        else loader.construct_scalar(node)))
    override = yaml.load((ROOT / "scripts" / "compose" / "smoke.override.yml").read_text(), Loader)
    build = override["services"]["stage1"]["build"]
    assert build["args"]["DEVICE"] == "cpu" and "dockerfile" not in build  # the shipped file


def test_docs_list_every_service_and_what_down_v_deletes():
    docs = (ROOT / "docs" / "deployment.md").read_text()
    for name in raw_compose()["services"]:
        assert re.search(rf"^\| `{name}` \|", docs, re.M), f"docs/deployment.md: no row for {name}"
    assert "down -v" in docs
    for volume in raw_compose()["volumes"]:
        assert volume in docs, volume


def test_gitignore_keeps_models_and_builds_out():
    lines = (ROOT / ".gitignore").read_text().split()
    assert {"models/", "build/", ".env"} <= set(lines)


def test_entrypoint_names_replicas_that_share_a_hostname_apart(tmp_path):
    """WORKER_UNIQUE_NAME=true (host networking: every replica has the host's hostname): a new
    random suffix at each start, kept where `health` reads it."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for program in ("zroact", "celery"):
        (fake / program).write_text('#!/bin/sh\necho "$0 $*" >&2\n')  # health hides stdout
        (fake / program).chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "WORKER_ROLE": "stage2", "WORKER_UNIQUE_NAME": "true",
           "WORKER_NAME_FILE": str(tmp_path / "name")}
    names = set()
    for _ in range(2):
        out = _entrypoint("-c", "2", env=env).stderr.split()
        name = out[out.index("--name") + 1]
        assert re.fullmatch(rf"stage2@{re.escape(socket.gethostname())}-[0-9a-f]{{8}}", name), out
        assert (tmp_path / "name").read_text() == name + "\n"
        health = _entrypoint("health", env=env).stderr.split()
        assert health[health.index("--destination") + 1] == name
        names.add(name)
    assert len(names) == 2
    plain = _entrypoint(env={**env, "WORKER_UNIQUE_NAME": ""}).stderr.split()
    assert plain[plain.index("--name") + 1] == "stage2@%h"
