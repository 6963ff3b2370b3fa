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
