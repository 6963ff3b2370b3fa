"""Remote jobs against a real Ray head on loopback: a tiny caption job submitted through the CLI, followed
and finished; status, logs, and the bad-input errors.

    .venv/bin/python -m pytest tests/infra/test_jobs.py

The head is started once per module with `ray start --head --block` in its own temp dir, with every
port chosen free, so it never meets another Ray on this machine; teardown stops exactly the processes
it started (the `ray start` process tree and anything whose command line names its temp dir). It has
2 logical CPUs: a caption job needs one for its decode task beside the one of its model replica.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pyarrow.dataset as pads
import pytest
import requests

from raybooth.cluster import job_api, jobs
from raybooth.errors import ConfigError, UserError
from raybooth.samples import write_sample_images

REPO = Path(__file__).resolve().parents[2]
HEAD_START_TIMEOUT_S = 90.0  # a cold `ray start` on a busy 2-core box takes 10-30 s
JOB_TIMEOUT_S = 60.0
# Submit + runtime env upload + a driver that imports torch, loads tiny-vlm and runs Ray Data: ~20-40 s
# alone, several times that while other test runs share the 2 cores.
CAPTION_JOB_TIMEOUT_S = 300
CLI_TIMEOUT_S = 60  # status / logs / an error: one process start and a few HTTP calls

_RAY_PORT_FLAGS = (
    "port",
    "node-manager-port",
    "object-manager-port",
    "ray-client-server-port",
    "dashboard-port",
    "dashboard-agent-grpc-port",
    "dashboard-agent-listen-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)


def _free_port_range(size: int) -> int:
    """First port of `size` consecutive ports that are free now (for Ray's worker ports)."""
    for _ in range(50):
        base = random.randint(30000, 60000 - size)
        try:
            socks = []
            for port in range(base, base + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range for Ray workers")


def _distinct_ports(port_picker: Callable[[], int], taken: range) -> dict[str, int]:
    """One free port per flag in `_RAY_PORT_FLAGS`, none twice and none inside `taken` (the worker range).

    Ray refuses to start when two of its components share a port, and a port the OS hands out as free can
    also fall inside the worker range chosen a moment before."""
    ports: dict[str, int] = {}
    for flag in _RAY_PORT_FLAGS:
        for _ in range(100):
            port = port_picker()
            if port not in taken and port not in ports.values():
                ports[flag] = port
                break
        else:
            raise RuntimeError(f"no free port for --{flag} outside {taken} after 100 tries")
    return ports


def _logs(temp_dir: str, chars: int = 1500) -> str:
    """Tails of the head's own logs, for a start that failed."""
    root = Path(temp_dir)
    files = [root / "ray-start.log", *sorted((root / "session_latest" / "logs").glob("*.err"))]
    files += sorted((root / "session_latest" / "logs").glob("dashboard*.log"))
    return "\n".join(
        f"--- {f.name}\n{f.read_text(errors='replace')[-chars:]}" for f in files if f.stat().st_size
    )


def _stop_head(proc: subprocess.Popen[bytes], temp_dir: str) -> None:
    """SIGTERM our processes only (the `ray start --block` process tree and whatever names our temp dir),
    all at once, then kill what is left.

    All at once: `ray start --block` alone stops its node one process at a time, and after a Ray Data job
    (detached actors) that took over 20 s. The raylet and GCS may linger on SIGTERM: they are killed after 5 s."""
    ours = {proc.pid}
    try:
        ours |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(temp_dir in arg for arg in p.info["cmdline"] or []):
            ours.add(p.info["pid"])
    procs = []
    for pid in ours:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)  # a throwaway head needs no graceful drain
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


HEAD_START_ATTEMPTS = 3  # a port found free can be taken by another process before Ray binds it


def _start_head(port_picker: Callable[[], int]) -> tuple[subprocess.Popen[bytes], str, str]:
    """Start one head on freshly chosen ports; (process, temp dir, dashboard URL) once the dashboard answers.

    Raises `_PortRace` when `ray start` quit over a port (a race with another process on this machine),
    which the caller retries on new ports, and RuntimeError for anything else."""
    temp_dir = tempfile.mkdtemp(prefix="rbinfra-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    workers = _free_port_range(40)
    ports = _distinct_ports(port_picker, taken=range(workers, workers + 40))
    cmd = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--temp-dir={temp_dir}", "--num-cpus=2", "--num-gpus=0",  # a decode task beside the model actor
        "--object-store-memory=200000000",  # 200 MB: the caption job moves a few 64 px images
        "--disable-usage-stats",
        f"--min-worker-port={workers}", f"--max-worker-port={workers + 39}",
        *(f"--{flag}={port}" for flag, port in ports.items()),
    ]  # fmt: skip
    env = dict(os.environ)
    env["PATH"] = (
        f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # job entrypoints use this venv
    )
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(name, None)
    # Ray turns token auth on when ~/.ray/auth_token exists, and another Ray user on this machine may
    # replace that file at any time; this private head does without it.
    env["RAY_AUTH_MODE"] = "disabled"
    log = Path(temp_dir) / "ray-start.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                logs = _logs(temp_dir)
                error = _PortRace if "port" in log.read_text(errors="replace").lower() else RuntimeError
                raise error(f"ray start exited with {proc.returncode}:\n{logs}")
            try:
                if requests.get(f"{url}/api/version", timeout=1).status_code < 500:
                    return proc, temp_dir, url
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Ray dashboard did not answer in {HEAD_START_TIMEOUT_S:.0f}s:\n{_logs(temp_dir)}"
                )
            time.sleep(0.5)
    except BaseException:
        _stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise


class _PortRace(RuntimeError):
    """`ray start` quit because a port it was given was in use by the time it bound it."""


@pytest.fixture(scope="module")
def ray_head(port_picker: Callable[[], int]) -> Iterator[str]:
    """Dashboard URL (http://127.0.0.1:PORT) of a single-node Ray head that only this module uses."""
    for attempt in range(1, HEAD_START_ATTEMPTS + 1):
        try:
            proc, temp_dir, url = _start_head(port_picker)
            break
        except _PortRace:
            if attempt == HEAD_START_ATTEMPTS:
                raise
    try:
        yield url
    finally:
        _stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _cli(*args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """`raybooth <args>` as the user runs it: its own process, this environment (RAYBOOTH_HOME included)."""
    return subprocess.run(
        [sys.executable, "-m", "raybooth.cli", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=timeout,
    )


def _one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.slow
def test_caption_job_submitted_followed_and_finished_through_the_cli(
    ray_head, tiny_vlm_path, tmp_path, monkeypatch
):
    # tiny_vlm_path: the preset is built once into the session RAYBOOTH_HOME; the job on this machine is
    # given that same (absolute) RAYBOOTH_HOME, so it finds the preset built instead of building its own.
    write_sample_images(tmp_path / "imgs", 6, size=64)
    # The user's project dir: shipped as the working dir, and relative paths are read from here.
    monkeypatch.chdir(tmp_path)
    result = _cli(
        "submit", "caption", "--address", ray_head, "--follow",
        "--input", "imgs", "--output", "out", "--max-new-tokens", "4",
        timeout=CAPTION_JOB_TIMEOUT_S,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    job_id = result.stdout.splitlines()[0]
    assert job_id.startswith("raysubmit_"), output
    # The followed logs end with the caption job's own summary, then the final status line.
    assert "raybooth caption: 6 rows (0 failed), 0 already done and skipped" in result.stdout, output
    assert result.stdout.rstrip().endswith(f"job {job_id}: SUCCEEDED"), output

    # Relative data paths were resolved on this machine: the job ran inside Ray's copy of the working
    # dir, yet read tmp_path/imgs and wrote tmp_path/out.
    rows = pads.dataset(tmp_path / "out", format="parquet").to_table().to_pylist()
    assert len(rows) == 6, rows
    assert sorted(Path(r["path"]).name for r in rows) == [f"img_{i:05d}.png" for i in range(6)]
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows]
    assert all(isinstance(r["caption"], str) and r["caption"] for r in rows), rows
    assert all(r["model"] == "tiny-vlm" and r["completion_tokens"] == 4 for r in rows), rows

    status = _cli("status", job_id, "--address", ray_head)
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.startswith(f"{job_id}: SUCCEEDED"), status.stdout

    logs = _cli("logs", job_id, "--address", ray_head)
    assert logs.returncode == 0, logs.stdout + logs.stderr
    assert "raybooth caption: 6 rows (0 failed)" in logs.stdout, logs.stdout
    assert "SUCCEEDED" not in logs.stdout  # the stored logs are the job's own, not the follow's status line

    entrypoint = job_api.describe_job(ray_head, job_id).entrypoint
    assert entrypoint.startswith(f"raybooth caption --input {tmp_path / 'imgs'} --output {tmp_path / 'out'}")
    # A cluster on this machine shares the submitter's work dir (built presets, storage, MLflow store).
    from ray.job_submission import JobSubmissionClient

    job_env = JobSubmissionClient(ray_head).get_job_info(job_id).runtime_env["env_vars"]
    assert job_env["RAYBOOTH_HOME"] == str(Path(os.environ["RAYBOOTH_HOME"]).resolve())
    assert tiny_vlm_path.is_relative_to(job_env["RAYBOOTH_HOME"])


@pytest.mark.slow
def test_cli_names_an_unknown_job_id_in_one_line(ray_head):
    line = _one_line_error(_cli("status", "raysubmit_doesnotexist", "--address", ray_head))
    assert line.startswith("raybooth status: error:") and "'raysubmit_doesnotexist'" in line, line


def test_cli_submit_to_a_closed_port_is_one_line_and_exit_2(tmp_path, monkeypatch, port_picker):
    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{port_picker()}"  # nothing listens there
    result = _cli("submit", "caption", "--address", url, "--input", "imgs", "--output", "out")
    line = _one_line_error(result)
    assert line.startswith("raybooth submit: error:") and url in line and "does not answer" in line, line
    assert result.stdout == ""  # no job id printed for a job that was never submitted


@pytest.mark.slow
def test_submitted_job_runs_the_shipped_project_and_streams_its_logs(ray_head, tmp_path, monkeypatch):
    (tmp_path / "data.txt").write_text("from the working dir\n")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-the-submitter")
    script = (
        "import os, pathlib, raybooth; "
        "print('RAYBOOTH_FROM', raybooth.__file__); "
        "print('WORKING_DIR_FILE', pathlib.Path('data.txt').read_text().strip()); "
        "print('MLFLOW_ENV', os.environ.get('MLFLOW_EXPERIMENT_NAME')); "
        "print('EXTRA_ENV', os.environ.get('RAYBOOTH_TEST_EXTRA'))"
    )
    job_id = jobs.submit_entrypoint(
        ray_head,
        f'python -c "{script}"',
        working_dir=tmp_path,
        env={"RAYBOOTH_TEST_EXTRA": "explicit"},
    )
    assert job_id.startswith("raysubmit_")

    logs = "".join(job_api.follow_logs(ray_head, job_id))  # returns when the job ends

    assert job_api.job_status(ray_head, job_id) == "SUCCEEDED", logs
    lines = dict(
        line.split(" ", 1) for line in logs.splitlines() if line.split(" ", 1)[0].isupper() and " " in line
    )
    # The package came from the runtime env's py_modules copy, not this checkout's editable install.
    assert "runtime_resources" in lines["RAYBOOTH_FROM"] and str(REPO) not in lines["RAYBOOTH_FROM"], logs
    assert lines["WORKING_DIR_FILE"] == "from the working dir"
    assert lines["MLFLOW_ENV"] == "from-the-submitter"  # MLFLOW_* of the submitter travels with the job
    assert lines["EXTRA_ENV"] == "explicit"
    summary = job_api.describe_job(ray_head, job_id)
    assert summary.status == "SUCCEEDED" and "python -c" in summary.entrypoint
    assert "RAYBOOTH_FROM" in job_api.job_logs(ray_head, job_id)


@pytest.mark.slow
def test_job_for_a_cluster_on_this_machine_gets_paths_it_can_resolve(ray_head, tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "caption.yaml").write_text("prompt: Describe the image.\n")
    (tmp_path / "images").mkdir()
    monkeypatch.chdir(tmp_path)  # submitted from the project dir, which is what gets shipped by default
    job_id = jobs.submit_job(
        ray_head,
        "caption",
        [
            "--config",
            str(tmp_path / "configs" / "caption.yaml"),
            "--input",
            "images",
            "--output=out",
            "seed=3",
        ],
    )
    try:
        entrypoint = job_api.describe_job(ray_head, job_id).entrypoint
        # The config is read from the shipped copy of the working dir (relative); data paths on this machine
        # become absolute, because the job runs inside Ray's copy of the working dir, not in tmp_path.
        expected = [
            "raybooth",
            "caption",
            "--config",
            "configs/caption.yaml",
            "--input",
            str(tmp_path / "images"),
        ]
        assert entrypoint.split()[:6] == expected
        # rebuilt from the parsed args (flags, then overrides), so `--output=out` comes back as two tokens
        assert f"--output {tmp_path / 'out'}" in entrypoint and entrypoint.endswith("seed=3")
    finally:
        job_api.stop_job(ray_head, job_id)
    assert job_api.wait_for_job(ray_head, job_id, timeout_s=JOB_TIMEOUT_S) in (
        "STOPPED",
        "FAILED",
        "SUCCEEDED",
    )


@pytest.mark.slow
def test_unknown_job_id_is_a_user_error(ray_head):
    with pytest.raises(UserError, match="no job 'raysubmit_doesnotexist'"):
        job_api.job_status(ray_head, "raysubmit_doesnotexist")
    with pytest.raises(UserError, match="no job"):
        job_api.follow_logs(ray_head, "raysubmit_doesnotexist")


@pytest.mark.slow
def test_config_errors_are_found_before_anything_is_uploaded(ray_head, tmp_path):
    config = tmp_path / "dreambooth.yaml"
    config.write_text(
        "concepts: [{instance_data: s3://bucket/rex}]\nstorage: {root: s3://bucket/run}\nstepz: 3\n"
    )
    with pytest.raises(ConfigError, match="stepz"):
        jobs.submit_job(ray_head, "train", ["--config", str(config)], working_dir=tmp_path)


def test_address_that_refuses_connections_fails_fast(port_picker):
    url = f"http://127.0.0.1:{port_picker()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(UserError, match="does not answer"):
        job_api.job_status(url, "raysubmit_x")
    assert time.monotonic() - started < 5


def test_address_that_accepts_but_never_answers_fails_within_the_timeout(monkeypatch):
    monkeypatch.setattr(job_api, "CONNECT_TIMEOUT_S", 1.0)
    with socket.socket() as silent:  # the kernel completes the handshake; nobody ever replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(UserError, match=r"no reply in 1s"):
            jobs.submit_entrypoint(url, "echo hi")
        assert time.monotonic() - started < 5


def test_local_photos_for_a_remote_cluster_are_refused_with_an_s3_hint(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    config = tmp_path / "dreambooth.yaml"
    config.write_text(f"concepts: [{{instance_data: {photos}}}]\nstorage: {{root: s3://bucket/run}}\n")
    # A TEST-NET-2 address: certainly not this machine, so the check runs before any connection attempt.
    with pytest.raises(UserError) as err:
        jobs.submit_job("http://198.51.100.7:8265", "train", ["--config", str(config)], working_dir=tmp_path)
    message = str(err.value)
    assert "concepts.0.instance_data" in message and str(photos) in message and "s3://" in message
    assert "\n" not in message  # one line for the CLI


def test_remote_training_needs_shared_storage(tmp_path):
    config = tmp_path / "dreambooth.yaml"
    config.write_text("concepts: [{instance_data: s3://bucket/rex}]\n")
    with pytest.raises(UserError, match="storage.root is unset"):
        jobs.submit_job("http://198.51.100.7:8265", "train", ["--config", str(config)], working_dir=tmp_path)


def test_caption_flags_and_fleet_overrides_are_checked_too(tmp_path):
    with pytest.raises(UserError, match=r"input=images/ is a path on this machine.*e\.g\. --input s3://"):
        jobs.submit_job(
            "198.51.100.7", "caption", ["--input", "images/", "--output", "s3://b/out"], working_dir=tmp_path
        )
    manifest = tmp_path / "fleet.yaml"
    manifest.write_text(
        "storage: {root: s3://bucket/fleet}\n"
        "subjects:\n"
        "  - {name: rex, overrides: {concepts: [{instance_data: s3://bucket/rex}]}}\n"
        "  - {name: tom, overrides: {concepts: [{instance_data: ./tom}]}}\n"
    )
    with pytest.raises(UserError, match=r"subjects\.1\.overrides\.concepts\.0\.instance_data=\./tom"):
        jobs.submit_job("198.51.100.7", "fleet", ["--manifest", str(manifest)], working_dir=tmp_path)


def test_config_outside_the_shipped_working_dir_is_refused(tmp_path):
    shipped = tmp_path / "project"
    shipped.mkdir()
    config = tmp_path / "elsewhere.yaml"
    config.write_text("concepts: [{instance_data: s3://b/rex}]\nstorage: {root: s3://b/run}\n")
    with pytest.raises(UserError, match="outside the directory shipped"):
        jobs.submit_job("198.51.100.7", "train", ["--config", str(config)], working_dir=shipped)


def test_not_a_job_subcommand():
    with pytest.raises(UserError, match="does not run as a job"):
        jobs.submit_job("http://127.0.0.1:1", "serve", [])


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://head:8265", "http://head:8265"),
        ("head", "http://head:8265"),
        ("10.0.0.5:9000", "http://10.0.0.5:9000"),
        ("ray://head:10001", "http://head:8265"),
        ("https://ray.example.com/", "https://ray.example.com:8265"),
    ],
)
def test_jobs_api_url(given, expected):
    assert job_api.jobs_api_url(given) == expected


def test_jobs_api_url_without_one_names_the_flag(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address is not a Jobs API URL
    with pytest.raises(UserError, match="--address"):
        job_api.jobs_api_url(None)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265")
    assert job_api.jobs_api_url(None) == "http://head:8265"


def test_forwarded_env_drops_what_only_this_machine_understands():
    environ = {
        "AWS_ACCESS_KEY_ID": "AKIA...",
        "AWS_PROFILE": "laptop-sso",
        "AWS_SHARED_CREDENTIALS_FILE": "/home/me/.aws/credentials",
        "MLFLOW_TRACKING_URI": "http://localhost:5000",
        "MLFLOW_EXPERIMENT_NAME": "dogs",
        "HOME": "/home/me",
    }
    remote = jobs.forwarded_env(environ, remote=True)
    assert remote == {"AWS_ACCESS_KEY_ID": "AKIA...", "MLFLOW_EXPERIMENT_NAME": "dogs"}
    local = jobs.forwarded_env(environ, remote=False)
    assert set(local) == {k for k in environ if k != "HOME"}
    assert jobs.forwarded_env({"MLFLOW_TRACKING_URI": "http://10.0.0.5:5000"}, remote=True) == {
        "MLFLOW_TRACKING_URI": "http://10.0.0.5:5000"
    }


def test_working_dir_package_leaves_out_envs_caches_and_the_shipped_package(tmp_path):
    from ray._private.runtime_env.packaging import (
        create_package,  # what the Jobs SDK zips the working dir with
    )

    for name in ("raybooth/__init__.py", ".venv/bin/python", ".raybooth/storage/x", "a/__pycache__/m.pyc"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "caption.yaml").write_text("prompt: hi\n")
    (tmp_path / "lib" / "raybooth").mkdir(parents=True)  # only the top-level package dir is excluded
    (tmp_path / "lib" / "raybooth" / "keep.py").write_text("x")
    package = tmp_path.parent / f"{tmp_path.name}.zip"
    create_package(str(tmp_path), package, include_gitignore=True, excludes=jobs.WORKING_DIR_EXCLUDES)
    files = sorted(n for n in zipfile.ZipFile(package).namelist() if not n.endswith("/"))
    assert files == ["configs/caption.yaml", "lib/raybooth/keep.py"]


def test_flag_values_are_applied_like_the_cli_and_never_read_as_overrides():
    args = [
        "--input",
        "s3://b/images",
        "--output",
        "s3://b/out",
        "--prompt",
        "style=terse",
        "--batch-size",
        "32",
    ]
    assert jobs.cluster_path_problems("caption", args) == []
    # parsed by the CLI's own argparse definitions, so the same one-line error the CLI would give
    with pytest.raises(UserError, match="--batch-size: invalid int value: 'many'"):
        jobs.cluster_path_problems("caption", [*args[:6], "--batch-size", "many"])
    with pytest.raises(UserError, match="unrecognized arguments: --batch-sise"):
        jobs.cluster_path_problems("caption", [*args[:6], "--batch-sise", "3"])


def test_train_without_config_checks_the_clis_default_file(tmp_path):
    remote = "http://198.51.100.7:8265"
    with pytest.raises(ConfigError, match="pass --config"):
        jobs.submit_job(remote, "train", ["storage.root=s3://b/run"], working_dir=tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "dreambooth.yaml").write_text("concepts: [{instance_data: photos/rex}]\n")
    with pytest.raises(UserError, match="concepts.0.instance_data=photos/rex"):
        jobs.submit_job(remote, "train", ["storage.root=s3://b/run"], working_dir=tmp_path)
