"""The `raybooth` command line: help for every subcommand, one-line errors with exit 2, doctor."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from raybooth.cli import build_parser

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    # mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI for child processes; earlier tests in this
    # process may have pointed it at their own store or server, so each CLI run starts without it.
    inherited = {
        k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    }
    full_env = {**inherited, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "raybooth.cli", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )


def subcommand_names() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_help_lists_every_subcommand():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in subcommand_names():
        assert name in result.stdout
    assert {"doctor", "demo", "build-models", "config"} <= set(subcommand_names())


@pytest.mark.parametrize("name", subcommand_names())
def test_every_subcommand_has_help(name, capsys):
    parser = build_parser()
    with pytest.raises(SystemExit) as info:
        parser.parse_args([name, "--help"])
    assert info.value.code == 0
    assert "usage: raybooth " + name in capsys.readouterr().out


def test_missing_config_is_one_line_exit_2(tmp_path):
    result = run_cli("config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "missing.yaml does not exist" in result.stderr


def test_wrong_type_names_the_key_and_file(tmp_path):
    path = tmp_path / "dreambooth.yaml"
    path.write_text("resolution: big\n")
    result = run_cli("config", str(path))
    assert result.returncode == 2
    assert f"{path}: key resolution" in result.stderr
    assert "Traceback" not in result.stderr


def test_verbose_shows_the_traceback(tmp_path):
    result = run_cli("-v", "config", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "Traceback" in result.stderr


def test_unknown_preset_is_a_clear_error():
    result = run_cli("build-models", "tiny-nope")
    assert result.returncode == 2
    assert "unknown preset 'tiny-nope'" in result.stderr and "tiny-sd" in result.stderr


@pytest.mark.slow
def test_doctor_on_embedded_cluster(tmp_path):
    result = run_cli("doctor", "cluster.num_cpus=2", env={"RAYBOOTH_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "embedded local Ray" in out and "2 CPU(s)" in out and "1 node(s)" in out
    assert "torch 2." in out and "device cpu" in out
    assert f"ok  storage  {tmp_path}/storage" in out and "is writable" in out
    assert f"ok  mlflow   sqlite:///{tmp_path}/mlflow/mlflow.db" in out
    assert "sqlite:///" in out and "tiny-sd" in out and "tiny-vlm" in out


def on_the_session_cluster(ray_cluster) -> list[str]:
    """Doctor overrides that connect to the session's running Ray (as to a remote cluster) instead of
    starting an embedded one: the checks below are about storage and MLflow, not Ray."""
    import ray

    return [f"cluster.address={ray.get_runtime_context().gcs_address}", "cluster.ship_project=false"]


@pytest.mark.slow
def test_doctor_reports_a_dead_mlflow_uri_as_broken(tmp_path, ray_cluster):
    dead = "http://127.0.0.1:9"  # discard port: nothing listens there
    result = run_cli(
        "doctor", *on_the_session_cluster(ray_cluster), f"tracking.tracking_uri={dead}",
        env={"RAYBOOTH_HOME": str(tmp_path)},
    )  # fmt: skip
    assert result.returncode == 2
    bad = [line for line in result.stdout.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and "mlflow" in bad[0] and dead in bad[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_doctor_reports_an_unreachable_s3_endpoint_as_broken(tmp_path, ray_cluster):
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port
    env = {
        "RAYBOOTH_HOME": str(tmp_path),
        "AWS_ENDPOINT_URL": dead,
        "AWS_ENDPOINT_URL_S3": dead,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    result = run_cli(
        "doctor", *on_the_session_cluster(ray_cluster), "storage.root=s3://raybooth-bucket/prefix", env=env
    )
    assert result.returncode == 2
    bad = [line for line in result.stdout.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and "storage" in bad[0] and "s3://raybooth-bucket/prefix" in bad[0]
    assert "Traceback" not in result.stderr


def test_config_applies_overrides_and_prints_the_resolved_values():
    result = run_cli("config", f"{REPO}/configs/dreambooth.yaml", "steps=3", "concepts.0.class_name=cat")
    assert result.returncode == 0, result.stderr
    assert "configs/dreambooth.yaml + steps=3 concepts.0.class_name=cat: DreamBoothConfig" in result.stdout
    assert "\nsteps: 3\n" in result.stdout and "class_name: cat" in result.stdout


def test_config_applies_overrides_to_every_file_and_refuses_a_key_one_lacks():
    result = run_cli("config", f"{REPO}/configs/caption.yaml", f"{REPO}/configs/batch.yaml", "batch_size=3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\nbatch_size: 3\n") == 2
    result = run_cli("config", f"{REPO}/configs/caption.yaml", f"{REPO}/configs/dreambooth.yaml", "prompt=hi")
    assert result.returncode == 2
    assert "configs/dreambooth.yaml + command line: key prompt: unknown key" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_config_without_a_file_says_so():
    result = run_cli("config", "steps=3")
    assert result.returncode == 2 and "no YAML file given" in result.stderr


def test_doctor_lives_beside_the_cli_not_in_cluster():
    import importlib.util

    from raybooth.doctor import run_doctor

    assert callable(run_doctor)
    assert importlib.util.find_spec("raybooth.cluster.doctor") is None
