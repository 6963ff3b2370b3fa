"""Remote jobs: run a raybooth command on a Ray cluster through the Ray Jobs API, then follow it.

    raybooth submit train --address http://head:8265 --config configs/dreambooth.yaml steps=200
    raybooth logs raysubmit_XXXX --address http://head:8265
    raybooth status raysubmit_XXXX --address http://head:8265

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

import asyncio
import ipaddress
import logging
import os
import shlex
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import requests
from pydantic import ValidationError

import raybooth
from raybooth.cluster.config import (
    BatchConfig,
    CaptionConfig,
    DreamBoothConfig,
    FleetConfig,
    JobConfig,
    format_validation_error,
    load_config,
    read_yaml,
)
from raybooth.cluster.workdir import work_dir
from raybooth.errors import ConfigError, UserError

logger = logging.getLogger(__name__)

# The subcommands that run as a Ray job, and the schema each one's config is checked against.
JOB_SCHEMAS: dict[str, type[JobConfig]] = {
    "train": DreamBoothConfig,
    "fleet": FleetConfig,
    "caption": CaptionConfig,
    "batch": BatchConfig,
}
JOB_SUBCOMMANDS = tuple(JOB_SCHEMAS)

# The Jobs API listens on the head's dashboard port.
DEFAULT_DASHBOARD_PORT = 8265
# A head that has not answered in this long is down or unreachable; waiting longer only delays the error.
CONNECT_TIMEOUT_S = 5.0
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

# Flags of the job subcommands whose values are files or data locations (the rest pass through untouched).
_CONFIG_FLAGS = ("--config", "--manifest")
# The config file a subcommand reads when none is given (raybooth/cli.py); it must travel with the job too.
_DEFAULT_CONFIG = {
    "train": ("--config", "configs/dreambooth.yaml"),
    "fleet": ("--manifest", "configs/fleet.yaml"),
}
_DATA_FLAGS = {"--input": "input", "--output": "output", "--model": "model"}
# Config keys whose values are read or written as paths, by how to tell a local one (see _is_machine_local).
_DATA_KEYS = {"input", "output", "instance_data", "root", "api_keys_file"}
_MODEL_KEYS = {"model", "base_model", "chat_model", "image_models", "resume"}
_TRACKING_KEYS = {"tracking_uri", "registry_uri"}
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


@dataclass(frozen=True)
class JobSummary:
    """What `raybooth status` prints about one job."""

    job_id: str
    status: str  # PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED
    message: str
    entrypoint: str
    start_time_ms: int | None
    end_time_ms: int | None


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

    `args` are the subcommand's own arguments (`--config x.yaml steps=20`, `--input s3://... --output ...`).
    The config is validated here first; on a cluster that is not this machine, local paths in it are
    refused with a hint to use s3://. `env` adds variables on top of the forwarded AWS_*/MLFLOW_* ones.
    """
    if subcommand not in JOB_SCHEMAS:
        raise UserError(f"`{subcommand}` does not run as a job; submit one of: {', '.join(JOB_SUBCOMMANDS)}")
    url = resolve_address(address)
    wd = _working_dir(working_dir)
    args = _with_default_config(subcommand, list(args), wd)
    flags = _value_flags(args)
    config_path = next((flags[f][1] for f in _CONFIG_FLAGS if f in flags), None)
    config, extra_configs = _load_job_config(subcommand, flags, _overrides(args), wd)
    for flag in _CONFIG_FLAGS:  # the cluster reads the copy in the shipped working dir
        if flag in flags:
            _replace_flag_value(args, flags[flag], _inside_working_dir(flags[flag][1], wd, flag))

    client = None
    remote = not _host_is_this_machine(urlsplit(url).hostname or "")
    if not remote:  # loopback may still be a port-forward to a remote head: ask the cluster where it runs
        client = _connect(url)
        remote = not _cluster_runs_here(url)
    if remote:
        problems = _local_path_problems(subcommand, config, extra_configs)
        if problems:
            notes = "; ".join(note for _, note in problems)
            key = problems[0][0]
            flag = next((f for f, field in _DATA_FLAGS.items() if field == key and f in flags), None)
            example = f"{flag} s3://<bucket>/<prefix>" if flag else f"{key}=s3://<bucket>/<prefix>"
            raise UserError(
                f"{subcommand} on the cluster at {url}: {notes}; the cluster cannot see files on this "
                f"machine, so put them on shared storage and pass an s3:// URI (e.g. {example})"
            )
    else:  # same machine: make local data paths absolute, since the job runs inside its working dir copy
        for flag in ("--input", "--output"):
            if flag in flags and _is_machine_local(flags[flag][1], "data"):
                _replace_flag_value(args, flags[flag], str(Path(flags[flag][1]).expanduser().resolve()))

    entrypoint = shlex.join(["raybooth", subcommand, *args])
    job_env = _job_env(remote=remote, extra=env)
    logger.info("submitting %s to %s (config %s)", entrypoint, url, config_path or "defaults")
    return _submit(client or _connect(url), url, entrypoint, wd, ship_project, job_env, submission_id)


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
    url = resolve_address(address)
    client = _connect(url)
    remote = not (_host_is_this_machine(urlsplit(url).hostname or "") and _cluster_runs_here(url))
    job_env = _job_env(remote=remote, extra=env)
    return _submit(client, url, entrypoint, _working_dir(working_dir), ship_project, job_env, submission_id)


def cluster_path_problems(subcommand: str, args: Sequence[str]) -> list[str]:
    """Validate a job command's config and list every path in it that a multi-node cluster could not read.

    `args` as for submit_job; paths are judged as they are written (a RayJob entrypoint names files inside
    the image). Raises ConfigError for an invalid config; an empty list means the command is cluster-safe.
    """
    if subcommand not in JOB_SCHEMAS:
        raise UserError(f"`{subcommand}` does not run as a job; use one of: {', '.join(JOB_SUBCOMMANDS)}")
    args = list(args)
    config, extra_configs = _load_job_config(subcommand, _value_flags(args), _overrides(args), None)
    return [note for _, note in _local_path_problems(subcommand, config, extra_configs)]


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
            or (
                key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI") and _is_machine_local(value, "tracking")
            )
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
# Following a job
# --------------------------------------------------------------------------------------------------


def job_status(address: str | None, job_id: str) -> str:
    """The job's status: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    return describe_job(address, job_id).status


def describe_job(address: str | None, job_id: str) -> JobSummary:
    """Status, message and entrypoint of one job (for `raybooth status`)."""
    url = resolve_address(address)
    info = _job_info(_connect(url), url, job_id)
    return JobSummary(
        job_id=info.submission_id or info.job_id or job_id,
        status=str(getattr(info.status, "value", info.status)),
        message=info.message or "",
        entrypoint=info.entrypoint,
        start_time_ms=info.start_time,
        end_time_ms=info.end_time,
    )


def job_logs(address: str | None, job_id: str) -> str:
    """Everything the job's driver printed so far."""
    url = resolve_address(address)
    client = _connect(url)
    _job_info(client, url, job_id)
    return client.get_job_logs(job_id)


def follow_logs(address: str | None, job_id: str) -> Iterator[str]:
    """Stream the job's log chunks (each ends in a newline) until the job finishes.

    The address and job id are checked when this is called, so a bad one raises before iteration starts.
    """
    url = resolve_address(address)
    client = _connect(url)
    _job_info(client, url, job_id)
    return _tail(client, url, job_id)


def _tail(client: Any, url: str, job_id: str) -> Iterator[str]:
    # tail_job_logs is an async generator over a websocket; drive it from a private loop so callers
    # (the CLI, tests) can use a plain for-loop.
    loop = asyncio.new_event_loop()
    stream = client.tail_job_logs(job_id)
    try:
        while True:
            try:
                chunk = loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
            except RuntimeError as e:
                raise UserError(
                    f"the log stream of job {job_id} from {url} broke off ({e}); "
                    f"run `raybooth logs {job_id} --address {url}` again"
                ) from e
            yield chunk
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()


def wait_for_job(
    address: str | None, job_id: str, *, timeout_s: float | None = None, poll_s: float = 1.0
) -> str:
    """Block until the job reaches a terminal status and return it (SUCCEEDED, FAILED or STOPPED)."""
    url = resolve_address(address)
    client = _connect(url)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = _job_info(client, url, job_id).status
        if status.is_terminal():
            return str(status.value)
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status.value} after {timeout_s:.0f}s")
        time.sleep(poll_s)


def stop_job(address: str | None, job_id: str) -> bool:
    """Ask the cluster to stop the job; False if it had already finished."""
    url = resolve_address(address)
    client = _connect(url)
    _job_info(client, url, job_id)
    return bool(client.stop_job(job_id))


def _job_info(client: Any, url: str, job_id: str) -> Any:
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise UserError(
                f"there is no job {job_id!r} on the Ray cluster at {url} "
                f"(list its jobs with `ray job list --address {url}`)"
            ) from e
        raise


# --------------------------------------------------------------------------------------------------
# Reaching the cluster
# --------------------------------------------------------------------------------------------------


def resolve_address(address: str | None) -> str:
    """The Jobs API URL: `http://head:8265` as given, `head` or `head:8265` with http:// added,
    `ray://head:10001` mapped to the dashboard port; empty: RAY_API_SERVER_ADDRESS, else an http RAY_ADDRESS."""
    if not address:
        for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            value = os.environ.get(var, "")
            if value.startswith(("http://", "https://")):
                address = value
                break
        else:
            raise UserError(
                "no Ray cluster address: pass --address http://<head>:8265 (or set RAY_API_SERVER_ADDRESS)"
            )
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        address = f"http://{urlsplit(address).hostname}:{DEFAULT_DASHBOARD_PORT}"
    elif "://" not in address:
        address = f"http://{address}"
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"address {address!r} is not a Ray dashboard URL; pass e.g. http://<head>:8265")
    try:
        port = parts.port
    except ValueError as e:
        raise UserError(f"address {address!r} has a bad port; pass e.g. http://<head>:8265") from e
    if port is None:
        address = f"{parts.scheme}://{parts.netloc}:{DEFAULT_DASHBOARD_PORT}{parts.path}"
    return address


@contextmanager
def _explicit_address_only() -> Iterator[None]:
    # Ray's clients replace the address they are given with RAY_ADDRESS / RAY_API_SERVER_ADDRESS when set;
    # `--address` must win, so hide those two while a client is built.
    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _connect(url: str, *, timeout_s: float | None = None) -> Any:
    """A JobSubmissionClient for `url`, after a bounded check that something answers there."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    timeout_s = CONNECT_TIMEOUT_S if timeout_s is None else timeout_s

    hint = f"check the address: the Jobs API is on the head's dashboard port ({DEFAULT_DASHBOARD_PORT})"
    try:
        reply = requests.get(f"{url}/api/version", timeout=timeout_s)
    except requests.Timeout as e:
        raise UserError(
            f"the Ray cluster at {url} does not answer (no reply in {timeout_s:.0f}s); {hint}"
        ) from e
    except requests.RequestException as e:
        raise UserError(f"the Ray cluster at {url} does not answer ({type(e).__name__}); {hint}") from e
    if reply.status_code == 404:
        raise UserError(f"{url} answers but is not a Ray dashboard (no /api/version); {hint}")
    try:
        with _explicit_address_only():
            return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError, AuthenticationError) as e:
        raise UserError(f"cannot use the Ray Jobs API at {url}: {e}") from e


def _local_addresses() -> set[str]:
    return {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}


def _host_is_this_machine(host: str) -> bool:
    """True when `host` is loopback or one of this machine's own addresses (no network round trip for IPs)."""
    if not host:
        return False
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        resolved = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError):
        return False
    local = _local_addresses()
    return all(ipaddress.ip_address(ip.split("%")[0]).is_loopback or ip in local for ip in resolved)


def _cluster_runs_here(url: str) -> bool:
    """True when every alive node of the cluster is this machine (a loopback URL can be a port-forward)."""
    from ray.util.state import list_nodes

    try:
        with _explicit_address_only():
            nodes = list_nodes(
                address=url, filters=[("state", "=", "ALIVE")], timeout=10, raise_on_missing_output=False
            )
    except Exception as e:  # state API missing or slow: the address itself is local, trust that
        logger.debug("could not list the nodes of %s (%s); treating it as this machine", url, e)
        return True
    local = _local_addresses()
    return all(node.node_ip in local or ipaddress.ip_address(node.node_ip).is_loopback for node in nodes)


# --------------------------------------------------------------------------------------------------
# Config and path checks
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


def _value_flags(args: Sequence[str]) -> dict[str, tuple[int, str, bool]]:
    """`--flag value` / `--flag=value` -> (index of the token holding the value, value, written inline?).

    A `--flag` followed by a token that is not itself an option takes it as its value, so a value with
    `=` in it (`--prompt "x=y"`) is never mistaken for a config override.
    """
    found: dict[str, tuple[int, str, bool]] = {}
    i = 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name.startswith("--") and eq:
            found[name] = (i, value, True)
        elif name.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("-"):
            found[name] = (i + 1, args[i + 1], False)
            i += 1
        i += 1
    return found


def _overrides(args: Sequence[str]) -> list[str]:
    """The bare `key=value` tokens (config overrides), skipping the values of known flags."""
    taken = {index for index, _, inline in _value_flags(args).values() if not inline}
    return [a for i, a in enumerate(args) if i not in taken and "=" in a and not a.startswith("-")]


def _with_default_config(subcommand: str, args: list[str], wd: Path) -> list[str]:
    """`args` naming the config explicitly: the CLI's default file, resolved in the working dir that is shipped."""
    if subcommand not in _DEFAULT_CONFIG or any(f in _value_flags(args) for f in _CONFIG_FLAGS):
        return args
    flag, default = _DEFAULT_CONFIG[subcommand]
    if not (wd / default).is_file():
        raise ConfigError(
            f"{subcommand}: no {flag} given and the default {default} is not in {wd}; pass {flag} <file>"
        )
    return [flag, str(wd / default), *args]


def _replace_flag_value(args: list[str], flag: tuple[int, str, bool], new_value: str) -> None:
    index, _, inline = flag
    args[index] = f"{args[index].partition('=')[0]}={new_value}" if inline else new_value


def _load_job_config(
    subcommand: str, flags: dict[str, tuple[int, str, bool]], overrides: list[str], wd: Path | None
) -> tuple[JobConfig, dict[str, dict[str, Any]]]:
    """The job's config as the cluster will read it, plus any YAML it includes (a fleet's `base`).

    With a working dir, included files must lie inside it (they are shipped with it)."""
    path = next((flags[f][1] for f in _CONFIG_FLAGS if f in flags), None)
    config = load_config(JOB_SCHEMAS[subcommand], path, overrides or None)
    for flag, (_, value, _) in flags.items():  # as the CLI does: `--batch-size 32` sets batch_size
        field = flag[2:].replace("-", "_")
        if flag not in _CONFIG_FLAGS and field in type(config).model_fields:
            try:
                setattr(config, field, value)
            except ValidationError as e:
                raise ConfigError(format_validation_error(e, "command line")) from e
    extra: dict[str, dict[str, Any]] = {}
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


def _is_machine_local(value: str, kind: str) -> bool:
    """Whether `value` names something only this machine can read. kind: data | model | tracking."""
    parts = urlsplit(value)
    scheme = parts.scheme.lower() if len(parts.scheme) > 1 else ""  # "C:" is a drive, not a scheme
    if kind == "tracking":
        if scheme in ("", "file", "sqlite"):
            return True
        host = (parts.hostname or "").lower()
        return scheme in ("http", "https") and (
            host in _LOOPBACK_NAMES or (_is_ip(host) and ipaddress.ip_address(host).is_loopback)
        )
    if kind == "model":  # preset names, hub ids (org/name) and registry URIs are not paths
        if scheme:
            return scheme == "file"
        return value.startswith(("/", "./", "../", "~")) or Path(value).expanduser().exists()
    return scheme in ("", "file")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _path_kind(field: str, is_storage_root: bool) -> str | None:
    """How to judge a config field's value as a path (see _is_machine_local); None: not a path."""
    if field in _DATA_KEYS and (field != "root" or is_storage_root):
        return "data"
    if field in _MODEL_KEYS:
        return "model"
    if field in _TRACKING_KEYS:
        return "tracking"
    return None


def _string_leaves(node: Any, prefix: str = "", leaf: str = "") -> Iterator[tuple[str, str, str]]:
    """(dotted key, field name, value) for every string in a config tree; list items keep their field name."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _string_leaves(value, f"{prefix}{key}.", str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _string_leaves(value, f"{prefix}{i}.", leaf)
    elif isinstance(node, str):
        yield prefix.rstrip("."), leaf, node


def _local_path_problems(
    subcommand: str, config: JobConfig, extra_configs: Mapping[str, dict[str, Any]]
) -> list[tuple[str, str]]:
    """(key, note) for every path-valued field that names this machine's files, or shared storage missing."""
    trees = {"": config.model_dump(), **{f"{name}.": tree for name, tree in extra_configs.items()}}
    problems: list[tuple[str, str]] = []
    shared_storage = False
    for prefix, tree in trees.items():
        for key, field, value in _string_leaves(tree):
            is_storage_root = key.endswith("storage.root")
            kind = _path_kind(field, is_storage_root)
            if kind is None or not value:
                continue
            if _is_machine_local(value, kind):
                problems.append((f"{prefix}{key}", f"{prefix}{key}={value} is a path on this machine"))
            elif is_storage_root:
                shared_storage = True
    if subcommand in ("train", "fleet") and not shared_storage:
        note = "storage.root is unset (checkpoints would stay on one node's disk; Ray Train needs shared storage)"
        problems.append(("storage.root", note))
    return problems
