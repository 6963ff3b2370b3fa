"""infra/mlflow/start_mlflow.sh and infra/aws/ssm_env.py: the tracking server and the secrets the nodes read.

    .venv/bin/python -m pytest tests/infra/test_mlflow_server.py

The server test runs the real script: a real `mlflow server` with a sqlite store and its artifacts
proxied to S3 (the suite's moto server on loopback), then logs an artifact through it.
"""

from __future__ import annotations

import importlib.util
import io
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
START_SCRIPT = REPO / "infra/mlflow/start_mlflow.sh"
SERVER_START_TIMEOUT_S = 120.0  # mlflow's first start migrates the sqlite schema; slow on a busy 2-core box


def _run_script(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(START_SCRIPT)], env=env, capture_output=True, text=True, timeout=30)


def test_refuses_to_start_without_an_artifact_store():
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_ARTIFACTS_DESTINATION"}
    result = _run_script(env)
    assert result.returncode == 2 and "MLFLOW_ARTIFACTS_DESTINATION" in result.stderr


def test_command_serves_artifacts_from_s3_and_never_prints_the_database_password(tmp_path):
    env = dict(
        os.environ,
        MLFLOW_ARTIFACTS_DESTINATION="s3://bucket/mlflow",
        MLFLOW_BACKEND_STORE_URI="postgresql://mlflow:hunter2@db:5432/mlflow",
        MLFLOW_DRY_RUN="1",
    )
    args = _run_script(env).stdout.split("\n")
    assert args[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in args
    assert args[args.index("--artifacts-destination") + 1] == "s3://bucket/mlflow"
    assert args[args.index("--host") + 1] == "0.0.0.0"  # workers on other nodes must reach it
    assert args[args.index("--workers") + 1] == "4"  # a real database takes concurrent writers
    assert "hunter2" not in "".join(args)
    sqlite = _run_script(dict(env, MLFLOW_BACKEND_STORE_URI="", MLFLOW_DATA_DIR=str(tmp_path))).stdout.split(
        "\n"
    )
    assert sqlite[sqlite.index("--workers") + 1] == "1"  # sqlite locks the whole file per write


@pytest.mark.slow
def test_server_proxies_artifacts_to_s3_and_replaces_the_previous_server(s3_server, tmp_path):
    import mlflow

    bucket = s3_server.create_bucket()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Stands in for the MLflow a former `ray up` started (the script only stops processes named mlflow).
    previous = subprocess.Popen(["bash", "-c", 'exec -a "mlflow server (previous)" sleep 300'])
    pid_file = tmp_path / "server.pid"
    pid_file.write_text(str(previous.pid))
    env = dict(
        os.environ,  # carries the AWS_* of the loopback S3 server
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        MLFLOW_ARTIFACTS_DESTINATION=f"s3://{bucket}/mlflow",
        MLFLOW_DATA_DIR=str(tmp_path / "db"),
        MLFLOW_HOST="127.0.0.1",
        MLFLOW_PORT=str(port),
        MLFLOW_PID_FILE=str(pid_file),
    )
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            ["bash", str(START_SCRIPT)], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            assert server.poll() is None, f"start_mlflow.sh exited: {log.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"MLflow did not answer: {log.read_text()[-3000:]}"
            time.sleep(0.5)

        assert previous.wait(timeout=10) is not None  # the old server was stopped...
        assert pid_file.read_text().strip() == str(server.pid)  # ...and this one recorded (exec kept the pid)
        assert (tmp_path / "db" / "mlflow.db").is_file()  # default backend: sqlite in MLFLOW_DATA_DIR

        client = mlflow.MlflowClient(tracking_uri=url)
        experiment = client.create_experiment("infra-test")
        run = client.create_run(experiment)
        artifact = tmp_path / "note.txt"
        artifact.write_text("checkpoint manifest")
        client.log_artifact(run.info.run_id, str(artifact))
        assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # clients go through the server
        keys = s3_server.list_keys(bucket, "mlflow/")
        assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys
    finally:
        if previous.poll() is None:
            previous.kill()
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=15)


# --------------------------------------------------------------------------------------------------
# ssm_env.py: secrets for the nodes, from SSM Parameter Store
# --------------------------------------------------------------------------------------------------


def _ssm_env_module():
    spec = importlib.util.spec_from_file_location("ssm_env", REPO / "infra/aws/ssm_env.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_aws(monkeypatch):
    """In-process fake AWS (moto) with throwaway credentials; no endpoint override may redirect boto3."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL_SSM", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
    from moto import mock_aws

    with mock_aws():
        yield


def _main_output(module, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = module.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_ssm_parameters_become_shell_exports_that_round_trip(fake_aws):
    import boto3

    ssm = boto3.client("ssm")
    tricky = "k1,k2 'quoted' $HOME `x`"
    ssm.put_parameter(Name="/raybooth/ray/RAYBOOTH_API_KEYS", Value=tricky, Type="SecureString")
    ssm.put_parameter(Name="/raybooth/ray/HF_TOKEN", Value="hf_abc", Type="SecureString")
    ssm.put_parameter(Name="/raybooth/ray/not-a-var", Value="x", Type="String")
    ssm.put_parameter(
        Name="/raybooth/mlflow/MLFLOW_BACKEND_STORE_URI", Value="postgresql://u:p@h/db", Type="SecureString"
    )

    code, out, err = _main_output(_ssm_env_module(), ["/raybooth/ray/"])
    assert code == 0 and "not-a-var" in err
    assert "MLFLOW_BACKEND_STORE_URI" not in out  # the MLflow server's secret stays out of the Ray processes
    shell = subprocess.run(
        ["bash", "-c", 'eval "$(cat)"; printf "%s\\n%s" "$RAYBOOTH_API_KEYS" "$HF_TOKEN"'],
        input=out,
        capture_output=True,
        text=True,
        check=True,
    )
    assert shell.stdout == f"{tricky}\nhf_abc"


def test_ssm_without_access_prints_nothing_so_the_node_still_starts(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)  # nothing listens: like a node without network or rights
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    code, out, err = _main_output(_ssm_env_module(), ["/raybooth/ray/", "--region", "us-west-2"])
    assert code == 0 and out.strip() == "" and "no secrets read" in err
