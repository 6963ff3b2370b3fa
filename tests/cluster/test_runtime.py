"""The Ray runtime's pass-through env: what workers inherit from the process that starts a job."""

from __future__ import annotations

import pytest

from raybooth.cluster.runtime import passthrough_env, project_runtime_env


def test_passthrough_env_forwards_storage_tracking_and_raybooth_variables_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    monkeypatch.setenv("RAYBOOTH_HOME", "/somewhere")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    env = passthrough_env()
    assert env["AWS_ACCESS_KEY_ID"] == "k" and env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:1"
    assert env["RAYBOOTH_HOME"] == "/somewhere"
    assert "UNRELATED_SECRET" not in env


def test_project_runtime_env_ships_the_package_with_the_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    env = project_runtime_env(ship_project=True)
    assert env["env_vars"]["AWS_REGION"] == "us-east-1"
    assert env["py_modules"] and env["py_modules"][0].endswith("/raybooth")
    assert "py_modules" not in project_runtime_env(ship_project=False)


def test_passthrough_env_leaves_the_raw_api_keys_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAYBOOTH_API_KEYS", "raw-key")
    monkeypatch.setenv("RAYBOOTH_SERVE_KEYS", "other-raw-key")  # a serve config's own api_keys_env
    monkeypatch.setenv("RAYBOOTH_HOME", "/somewhere")
    env = passthrough_env(secret_env=["RAYBOOTH_SERVE_KEYS"])
    assert env["RAYBOOTH_HOME"] == "/somewhere"
    assert "RAYBOOTH_API_KEYS" not in env and "RAYBOOTH_SERVE_KEYS" not in env
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    shipped = project_runtime_env(ship_project=False, secret_env=["RAYBOOTH_SERVE_KEYS"])["env_vars"]
    assert not {"RAYBOOTH_API_KEYS", "RAYBOOTH_SERVE_KEYS"} & set(shipped)


_WORKER_ENV_SCRIPT = """
import json, os, ray
from raybooth.cluster.config import ClusterSection
from raybooth.cluster.runtime import ray_session

@ray.remote(num_cpus=0)
def worker_env():
    return {k: v for k, v in os.environ.items() if k.startswith("RAYBOOTH_")}

# As `raybooth serve` starts its Ray: the serve config's api_keys_env named as a secret.
with ray_session(ClusterSection(num_cpus=1, num_gpus=0), secret_env=["RAYBOOTH_SERVE_KEYS"]):
    seen = ray.get(worker_env.remote())
    driver = {k: os.environ.get(k) for k in ("RAYBOOTH_API_KEYS", "RAYBOOTH_SERVE_KEYS")}
print(json.dumps({"worker": seen, "driver": driver}))
"""


@pytest.mark.slow
def test_a_ray_worker_never_sees_the_raw_api_keys(tmp_path) -> None:
    """An embedded Ray's workers inherit the starting process's environment as well as the runtime env."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "RAYBOOTH_API_KEYS": "raw-key-1", "RAYBOOTH_SERVE_KEYS": "raw-key-2"}
    env["RAYBOOTH_HOME"] = str(tmp_path)  # a worker must still get the ordinary RAYBOOTH_* variables
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", _WORKER_ENV_SCRIPT], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["worker"].get("RAYBOOTH_HOME") == str(tmp_path)
    assert not {"RAYBOOTH_API_KEYS", "RAYBOOTH_SERVE_KEYS"} & set(report["worker"]), report["worker"]
    assert "raw-key" not in json.dumps(report["worker"])
    # The driver keeps them: the app builder reads them there and hands the ingress only digests.
    assert report["driver"] == {"RAYBOOTH_API_KEYS": "raw-key-1", "RAYBOOTH_SERVE_KEYS": "raw-key-2"}
