"""Remote jobs: run a raybooth command on a Ray cluster through the Ray Jobs API, then follow it.

    raybooth submit train --address http://head:8265 --config configs/dreambooth.yaml steps=200
    raybooth submit train --address http://head:8265 --instance-data s3://b/photos/rex --class-name dog

Following a submitted job (status, logs, stop) is `job_api.py`; which paths a remote cluster cannot read
is `job_paths.py`; the job subcommands' flags and schemas are the table in `job_commands.py`, which the CLI
reads too, so a job's argv is parsed here exactly as `raybooth <job>` will parse it on the cluster.

What travels with a job (its runtime env):
- `working_dir`: the directory you submit from (default: the current one) minus .git, .venv, .raybooth,
  the `raybooth/` package and whatever .gitignore lists, so `--config configs/x.yaml` names the same
  file on the cluster as here;
- `py_modules`: this checkout's `raybooth` package (`ship_project=True`), so the cluster runs the code you
  have rather than the copy baked into its image; the image still provides every dependency;
- `env_vars`: the AWS_* and MLFLOW_* variables of the submitting shell, read at submit time and never
  written to a file. They do show in the dashboard's job details: on a shared cluster give the nodes an
  IAM role / Kubernetes Secret instead and leave these unset.

Everything that can be checked here is checked before anything is uploaded: the config is validated
against its schema and, for a cluster on other machines, every path-valued field must be a URI the
cluster can read (s3://...), not a folder on this machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import raybooth
from raybooth.cluster.config import FleetConfig, JobConfig, field_path_kind, read_yaml
from raybooth.cluster.job_api import cluster_runs_here, connect, host_is_this_machine, jobs_api_url
from raybooth.cluster.job_commands import (
    JOB_SUBCOMMANDS,
    flag_dest,
    given_flags,
    job_command,
    load_job_config,
    parse_job_args,
)
from raybooth.cluster.job_paths import NEEDS_SHARED_STORAGE, is_machine_local, local_path_problems
from raybooth.cluster.workdir import work_dir
from raybooth.errors import ConfigError, UserError

__all__ = ["JOB_SUBCOMMANDS", "cluster_path_problems", "forwarded_env", "submit_entrypoint", "submit_job"]

logger = logging.getLogger(__name__)

# Environment of the submitting shell that a job needs on the cluster (S3 access, MLflow server).
FORWARDED_ENV_PREFIXES = ("AWS_", "MLFLOW_")
# These name files on the submitting machine; on another machine they only break boto3's credential chain.
_MACHINE_FILE_ENV = {
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CA_BUNDLE",
}
# Never uploaded with the working dir: environments, caches, VCS data, and the package itself (it travels
# as py_modules when ship_project is on, and must not sneak in through the working dir when it is off).
WORKING_DIR_EXCLUDES = [
    ".git",
    ".venv",
    ".raybooth",
    "/raybooth/",
    "**/__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
]


# --------------------------------------------------------------------------------------------------
# Submitting
# --------------------------------------------------------------------------------------------------


def submit_job(
    address: str | None,
    subcommand: str,
    args: Sequence[str] = (),
    *,
    ship_project: bool = True,
    env: Mapping[str, str] | None = None,
    working_dir: str | os.PathLike[str] | None = None,
    submission_id: str | None = None,
) -> str:
    """Run `raybooth <subcommand> <args...>` as a Ray job on the cluster at `address`; return its id.

    `args` are the subcommand's own arguments (`--config x.yaml steps=20`, `--input s3://... --output ...`),
    parsed with the CLI's own definitions. The config is validated here first; on a cluster that is not
    this machine, local paths in it are refused with a hint to use s3://. `env` adds variables on top of
    the forwarded AWS_*/MLFLOW_* ones.
    """
    cmd = job_command(subcommand)
    url = jobs_api_url(address)
    wd = _working_dir(working_dir)
    parsed = parse_job_args(subcommand, list(args))
    _config_in_working_dir(subcommand, parsed, wd)
    config, extra_configs = _load_job_config(subcommand, parsed, wd)

    client = None
    remote = not host_is_this_machine(urlsplit(url).hostname or "")
    if not remote:  # loopback may still be a port-forward to a remote head: ask the cluster where it runs
        client = connect(url)
        remote = not cluster_runs_here(url)
    if remote:
        problems = local_path_problems(
            config, extra_configs, shared_storage_needed=subcommand in NEEDS_SHARED_STORAGE
        )
        if problems:
            notes = "; ".join(note for _, note in problems)
            key = problems[0][0]
            flag = next(
                (f.flag for f in cmd.flags if f.key == key and f.flag in given_flags(subcommand, parsed)),
                None,
            )
            example = f"{flag} s3://<bucket>/<prefix>" if flag else f"{key}=s3://<bucket>/<prefix>"
            raise UserError(
                f"{subcommand} on the cluster at {url}: {notes}; the cluster cannot see files on this "
                f"machine, so put them on shared storage and pass an s3:// URI (e.g. {example})"
            )
    else:  # same machine: make local data paths of flags absolute, the job runs inside its working dir copy
        for flag in _data_flags(subcommand):
            value = getattr(parsed, flag_dest(flag))
            if value is not None and is_machine_local(value, "data"):
                setattr(parsed, flag_dest(flag), str(Path(value).expanduser().resolve()))

    entrypoint = shlex.join(["raybooth", subcommand, *_job_argv(subcommand, parsed)])
    job_env = _job_env(remote=remote, extra=env)
    logger.info("submitting %s to %s (config %s)", entrypoint, url, parsed.config or "defaults")
    return _submit(client or connect(url), url, entrypoint, wd, ship_project, job_env, submission_id)


def submit_entrypoint(
    address: str | None,
    entrypoint: str,
    *,
    ship_project: bool = True,
    env: Mapping[str, str] | None = None,
    working_dir: str | os.PathLike[str] | None = None,
    submission_id: str | None = None,
) -> str:
    """Run any shell command as a Ray job with raybooth's runtime env (no config checks); return its id."""
    url = jobs_api_url(address)
    client = connect(url)
    remote = not (host_is_this_machine(urlsplit(url).hostname or "") and cluster_runs_here(url))
    job_env = _job_env(remote=remote, extra=env)
    return _submit(client, url, entrypoint, _working_dir(working_dir), ship_project, job_env, submission_id)


def cluster_path_problems(subcommand: str, args: Sequence[str]) -> list[str]:
    """Validate a job command's config and list every path in it that a multi-node cluster could not read.

    `args` as for submit_job; paths are judged as they are written (a RayJob entrypoint names files inside
    the image). Raises ConfigError for an invalid config; an empty list means the command is cluster-safe.
    """
    parsed = parse_job_args(subcommand, list(args))
    config, extra_configs = _load_job_config(subcommand, parsed, None)
    problems = local_path_problems(
        config, extra_configs, shared_storage_needed=subcommand in NEEDS_SHARED_STORAGE
    )
    return [note for _, note in problems]


def forwarded_env(environ: Mapping[str, str], *, remote: bool) -> dict[str, str]:
    """The AWS_*/MLFLOW_* variables a job inherits from the submitting shell.

    For a cluster on other machines, variables that only make sense here are dropped: AWS profile and
    credential-file names, and an MLflow URI that is a local file/sqlite store or a loopback server.
    """
    out: dict[str, str] = {}
    for key, value in environ.items():
        if not key.startswith(FORWARDED_ENV_PREFIXES):
            continue
        if remote and (
            key in _MACHINE_FILE_ENV
            or (key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI") and is_machine_local(value, "tracking"))
        ):
            logger.info("not forwarding %s to a remote cluster: it names something on this machine", key)
            continue
        out[key] = value
    return out


def _job_env(*, remote: bool, extra: Mapping[str, str] | None) -> dict[str, str]:
    env = forwarded_env(os.environ, remote=remote)
    if not remote:
        # The job's cwd is a copy of the working dir inside Ray's session folder; keep the embedded
        # defaults (storage, MLflow store, built presets) in the submitter's work dir instead.
        env.setdefault("RAYBOOTH_HOME", str(work_dir()))
    env.update(extra or {})
    return env


def _runtime_env(working_dir: Path, *, ship_project: bool, env_vars: Mapping[str, str]) -> dict[str, Any]:
    runtime_env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "excludes": list(WORKING_DIR_EXCLUDES),
        "env_vars": dict(env_vars),
    }
    if ship_project:
        runtime_env["py_modules"] = [str(Path(raybooth.__file__).resolve().parent)]
    return runtime_env


def _submit(
    client: Any,
    url: str,
    entrypoint: str,
    working_dir: Path,
    ship_project: bool,
    env_vars: Mapping[str, str],
    submission_id: str | None,
) -> str:
    runtime_env = _runtime_env(working_dir, ship_project=ship_project, env_vars=env_vars)
    try:
        return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id)
    except (RuntimeError, ValueError, OSError) as e:  # HTTP 4xx/5xx, package too large, unreadable file
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"the Ray cluster at {url} did not accept the job: {first_line}") from e


# --------------------------------------------------------------------------------------------------
# The job's argv and config
# --------------------------------------------------------------------------------------------------


def _working_dir(working_dir: str | os.PathLike[str] | None) -> Path:
    wd = Path(working_dir or os.getcwd()).expanduser().resolve()
    if not wd.is_dir():
        raise UserError(f"working dir {wd} is not a directory")
    return wd


def _inside_working_dir(path: str, wd: Path, what: str) -> str:
    """`path` relative to the shipped working dir (posix), or a UserError when it lies outside it."""
    resolved = Path(path).expanduser().resolve()
    try:
        return resolved.relative_to(wd).as_posix()
    except ValueError:
        raise UserError(
            f"{what} {path} is outside the directory shipped to the cluster ({wd}); "
            f"submit from a directory that contains it"
        ) from None


def _data_flags(subcommand: str) -> list[Any]:
    """The job's flags whose config key is a `data` path (read from the schema's mark)."""
    cmd = job_command(subcommand)
    out = []
    for flag in cmd.flags:
        if "." not in flag.key and field_path_kind(cmd.schema.model_fields[flag.key]) == "data":
            out.append(flag)
    return out


def _config_in_working_dir(subcommand: str, parsed: argparse.Namespace, wd: Path) -> None:
    """Point the config flag at the copy inside the shipped working dir (the CLI's default file included)."""
    cmd = job_command(subcommand)
    if parsed.config is None:
        return
    if parsed.config == cmd.default_config and not (wd / cmd.default_config).is_file():
        raise ConfigError(
            f"{subcommand}: no {cmd.config_flag} given and the default {cmd.default_config} is not in {wd}; "
            f"pass {cmd.config_flag} <file>"
        )
    path = wd / parsed.config if parsed.config == cmd.default_config else Path(parsed.config)
    parsed.config = str(path)
    parsed.shipped_config = _inside_working_dir(str(path), wd, cmd.config_flag)


def _job_argv(subcommand: str, parsed: argparse.Namespace) -> list[str]:
    """The argv the cluster runs: config flag, the given flags, then the overrides."""
    cmd = job_command(subcommand)
    argv: list[str] = []
    config = getattr(parsed, "shipped_config", None) or parsed.config
    if config is not None:
        argv += [cmd.config_flag, config]
    for flag, value in given_flags(subcommand, parsed).items():
        argv += [flag, str(value)]
    return [*argv, *parsed.overrides]


def _load_job_config(
    subcommand: str, parsed: argparse.Namespace, wd: Path | None
) -> tuple[JobConfig, dict[str, dict[str, Any]]]:
    """The job's config as the cluster will read it, plus any YAML it includes (a fleet's `base`).

    With a working dir, included files must lie inside it (they are shipped with it)."""
    config = load_job_config(subcommand, parsed)
    extra: dict[str, dict[str, Any]] = {}
    path = parsed.config
    if isinstance(config, FleetConfig) and config.base and path is not None:
        # The job resolves `base` from its cwd (the shipped working dir); also accept it next to the manifest.
        candidates = [(wd or Path.cwd()) / Path(config.base).expanduser(), Path(path).parent / config.base]
        base = next((c for c in candidates if c.is_file()), None)
        if base is None:
            raise ConfigError(f"fleet manifest {path}: base {config.base!r} does not exist")
        if wd is not None:
            _inside_working_dir(str(base), wd, "fleet base config")
        extra["base"] = read_yaml(base)
    return config, extra
