"""Fixtures shared by the whole suite: an isolated work dir and real servers on loopback.

    .venv/bin/python -m pytest tests/cluster/test_storage.py

- `_isolated_session_env` (session, autouse): `RAYBOOTH_HOME` points at a temp folder, so no test writes
  into the repo; `MLFLOW_TRACKING_URI`, `MLFLOW_REGISTRY_URI` and `RAY_ADDRESS` are cleared so a developer's
  shell never sends test runs to a real cluster or server. A test that needs one sets it with `monkeypatch`.
- `s3_server` (session): moto's standalone S3 server as a subprocess on 127.0.0.1, with the standard AWS
  variables pointing at it for the whole session; `s3_bucket` (function) is a fresh bucket on it.
- `mlflow_server` (session): a real `mlflow server` process (sqlite backend, artifacts proxied to
  `mlflow_artifacts_root` on the S3 server); its URL.

Servers run in their own process group so teardown ends them and any workers they forked.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# Env a developer's shell may carry that would point tests at real infrastructure.
_CLEARED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "RAY_ADDRESS")
_SERVER_START_TIMEOUT_S = 120.0  # mlflow server on a busy 2-core CI box takes ~10-30 s


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`gpu` tests are deselected (not skipped) where torch sees no CUDA device, as on CI here. On several
    workers (`make test` runs `-n 2`), the shared units (the serving folder, the longest) start first, then
    the files holding `slow` tests, so no long one starts last and leaves the other worker idle."""
    import torch

    if not torch.cuda.is_available():
        gpu = [item for item in items if item.get_closest_marker("gpu")]
        if gpu:
            config.hook.pytest_deselected(items=gpu)
            items[:] = [item for item in items if not item.get_closest_marker("gpu")]
    items.sort(key=variants_last)  # stable: every other file keeps its place
    if getattr(config.option, "numprocesses", None):
        slow_units = {work_unit(item.nodeid) for item in items if item.get_closest_marker("slow")}

        def start_order(item: pytest.Item) -> int:
            unit = work_unit(item.nodeid)
            return 0 if unit in _SHARED_WORK_UNITS else 1 if unit in slow_units else 2

        items.sort(key=start_order)  # stable: the order within each group is kept


# The serving files that run the shared app with other settings, last and in this order: the shared settings
# come back lazily (tests/serving/conftest.py), so chat variants that follow each other restart the chat
# replica once each and the last one restores nothing.
_VARIANTS_LAST = (
    "tests/serving/test_thin_images.py",
    "tests/serving/test_failures.py",
    "tests/serving/test_chat_llm.py",
    "tests/serving/test_chat_qwen.py",
    "tests/serving/test_chat_in_ingress.py",
)


def variants_last(item: pytest.Item) -> int:
    path = item.nodeid.split("::", 1)[0]
    return 1 + _VARIANTS_LAST.index(path) if path in _VARIANTS_LAST else 0


# Test files that share one session fixture too costly to build twice run on one worker: the serving
# tests share one Serve app (tests/serving/conftest.py's SharedServe).
_SHARED_WORK_UNITS = ("tests/serving/",)


def work_unit(nodeid: str) -> str:
    """What one worker runs as a unit under `--dist loadfile`: a test file, or a folder of `_SHARED_WORK_UNITS`."""
    path = nodeid.split("::", 1)[0]
    return next((folder for folder in _SHARED_WORK_UNITS if path.startswith(folder)), path)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadfile` with `work_unit` as the unit, in collection order (set above)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # keep the slow-first order instead of "most tests first"
    return WorkUnitScheduling(config, log)


@pytest.fixture(scope="session", autouse=True)
def _isolated_session_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    home = tmp_path_factory.mktemp("raybooth_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAYBOOTH_HOME", str(home))
        # Ray Train's controller polls its workers every 2 s by default; tiny test trainings finish in a few
        # seconds, so a faster poll saves ~10 s per launch (set before Ray starts: its processes inherit it).
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        # Pollers that only burn CPU here: the dashboard agent scans every Ray process every 5 s for node
        # metrics nobody reads, and Serve's controller loops every 0.1 s. Measured on an idle `raybooth
        # serve` of configs/serve.yaml: 11.0 CPU-s a minute with the defaults, 9.1 with these (and Serve
        # still reacts within a quarter second). The suite is CPU-bound, so that is test time.
        mp.setenv("REPORTER_UPDATE_INTERVAL_MS", "60000")
        mp.setenv("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.25")
        for name in _CLEARED_ENV:
            mp.delenv(name, raising=False)
        yield home


@pytest.fixture(autouse=True)
def _restore_mlflow_env() -> Iterator[None]:
    """`mlflow.set_tracking_uri()` exports MLFLOW_TRACKING_URI to the process env; without this, a test
    that points MLflow at its own server would silently redirect every later test that uses the default."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {name: os.environ.get(name) for name in names}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


# --------------------------------------------------------------------------------------------------
# Subprocess helpers
# --------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (the server may still lose a race; callers retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def port_picker() -> Callable[[], int]:
    """`free_port` for test modules and sub-conftests (which cannot import this file under importlib mode)."""
    return free_port


@pytest.fixture
def tool_call_history() -> list[dict[str, Any]]:
    """An OpenAI conversation in which the assistant called get_weather and the tool answered."""
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'},
    }
    return [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    ]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status < 500
    except (urllib.error.URLError, OSError):
        return False


def _log_tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def _stop(proc: subprocess.Popen[bytes], grace_s: float = 15) -> None:
    """End the server and everything it forked (its own process group), politely first."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def stop_process_group() -> Callable[..., None]:
    """`stop_process_group(proc, grace_s=15)`: SIGTERM a server started in its own process group, then
    SIGKILL what lingers; for tests that start a server process of their own."""
    return _stop


def start_server(
    cmd_for_port: Callable[[int], list[str]], health_path: str, log: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str, float]:
    """Start `cmd_for_port(port)` on a free port and wait until `health_path` answers.

    Returns `(process, base_url, seconds to ready)`. Retries on a new port if the process dies early
    (another process took the port between `free_port()` and the bind).
    """
    last_error = ""
    for _ in range(3):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        with log.open("ab") as out:
            proc = subprocess.Popen(
                cmd_for_port(port), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        while time.monotonic() - started < _SERVER_START_TIMEOUT_S:
            if proc.poll() is not None:
                last_error = f"exited with {proc.returncode}:\n{_log_tail(log)}"
                break
            if _answers(base + health_path):
                return proc, base, time.monotonic() - started
            time.sleep(0.2)
        else:
            _stop(proc)
            last_error = f"did not answer {health_path} in {_SERVER_START_TIMEOUT_S:.0f}s:\n{_log_tail(log)}"
    raise RuntimeError(f"server {cmd_for_port(0)[:4]} failed to start: {last_error}")


# --------------------------------------------------------------------------------------------------
# S3 (moto standalone server)
# --------------------------------------------------------------------------------------------------


@dataclass
class S3Server:
    """A running S3-compatible server on loopback; the AWS_* env points at it while it lives."""

    endpoint: str
    process: subprocess.Popen[bytes]
    buckets: list[str] = field(default_factory=list)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (random name by default) and return its name."""
        name = name or f"raybooth-test-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        self.buckets.append(name)
        return name

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every key under `prefix`, read straight from the server (not through raybooth)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    tmp = tmp_path_factory.mktemp("s3_server")
    proc, endpoint, _ = start_server(
        lambda port: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        "/moto-api/",
        tmp / "moto.log",
    )
    with pytest.MonkeyPatch.context() as mp:
        # Both endpoint variables: botocore prefers the S3-specific one if the developer's shell has it.
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_REGION", "us-east-1")
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
            mp.delenv(name, raising=False)
        # No real ~/.aws config may add an endpoint, a profile or credentials.
        mp.setenv("AWS_CONFIG_FILE", str(tmp / "no-aws-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "no-aws-credentials"))
        try:
            yield S3Server(endpoint=endpoint, process=proc)
        finally:
            _stop(proc)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket name on the session's S3 server."""
    return s3_server.create_bucket()


# --------------------------------------------------------------------------------------------------
# MLflow tracking server
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mlflow_artifacts_root(s3_server: S3Server) -> str:
    """`s3://<bucket>/mlflow`: where the session's `mlflow_server` stores artifacts."""
    return f"s3://{s3_server.create_bucket()}/mlflow"


@dataclass(frozen=True)
class MlflowServerInfo:
    url: str
    startup_s: float


@pytest.fixture(scope="session")
def mlflow_server_info(
    tmp_path_factory: pytest.TempPathFactory, mlflow_artifacts_root: str
) -> Iterator[MlflowServerInfo]:
    tmp = tmp_path_factory.mktemp("mlflow_server")

    def cmd(port: int) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
            "--artifacts-destination", mlflow_artifacts_root,
            "--serve-artifacts",
            "--host", "127.0.0.1",
            "--port", str(port),
            "--workers", "1",  # one worker: the suite shares a small machine
        ]  # fmt: skip

    # The server inherits the AWS_* env of s3_server, so its boto3 writes artifacts to the loopback S3.
    proc, url, startup_s = start_server(cmd, "/health", tmp / "mlflow.log", env=dict(os.environ))
    try:
        yield MlflowServerInfo(url=url, startup_s=startup_s)
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_info: MlflowServerInfo) -> str:
    """URL (`http://127.0.0.1:PORT`) of a real MLflow tracking server with S3 artifacts."""
    return mlflow_server_info.url


# --------------------------------------------------------------------------------------------------
# Ray
# --------------------------------------------------------------------------------------------------

# Logical CPUs for the shared test cluster: more than the 2 real cores so a 2-worker training, a Ray Data
# actor pool and the Serve replicas fit at once; the tiny models leave the cores mostly idle anyway.
TEST_RAY_CPUS = 8
TEST_RAY_ENV: dict[str, str] = {}  # what the suite's embedded Ray started with (Serve's mode, its ports)


def start_test_ray():
    """Start (or reuse) the embedded Ray the suite shares, with Serve in the high-throughput mode that
    `raybooth serve` uses by default. A module that shuts Ray down to run its own cluster (e.g. the 2-node
    `ray.cluster_utils.Cluster` test) calls this again in its teardown."""
    import ray

    from raybooth.cluster.config import ClusterSection
    from raybooth.cluster.runtime import cluster_info, init_ray
    from raybooth.serving.high_throughput import high_throughput_env

    if ray.is_initialized():
        return cluster_info()
    TEST_RAY_ENV.clear()
    TEST_RAY_ENV.update(high_throughput_env())
    return init_ray(ClusterSection(num_cpus=TEST_RAY_CPUS, num_gpus=0), env=TEST_RAY_ENV)


@pytest.fixture
def test_ray_env(ray_cluster) -> dict[str, str]:
    """The variables the shared embedded Ray started with (this conftest's own TEST_RAY_ENV)."""
    return TEST_RAY_ENV


@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server):
    """The embedded Ray shared by the whole session. It depends on `s3_server` so the AWS variables are
    in the environment before Ray starts its workers (workers inherit env at start)."""
    import ray

    info = start_test_ray()
    yield info
    ray.shutdown()


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_sd_path() -> Path:
    """The tiny-sd preset, built once per session into the session work dir exactly as users get it;
    Ray workers started later find it built through the same `resolve_model`."""
    from raybooth.cluster.workdir import default_models_dir
    from raybooth.models.presets import resolve_model

    return Path(resolve_model("tiny-sd", models_dir=default_models_dir()))


@pytest.fixture(scope="session")
def tiny_vlm_path() -> Path:
    from raybooth.cluster.workdir import default_models_dir
    from raybooth.models.presets import resolve_model

    return Path(resolve_model("tiny-vlm", models_dir=default_models_dir()))


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # Tiny models are all overhead: on a shared 2-core box, two intra-op threads make a 32-token
    # generate 5-20x slower while they wait for each other.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
