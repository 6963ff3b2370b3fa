"""The Ray runtime every job runs on.

    ray_session(cfg.cluster, verbose=args.verbose)   # connect or start, then ray.shutdown() at the end

Which cluster: `cluster.address` in the job's YAML, else the `RAY_ADDRESS` environment variable, else an
embedded local Ray started with this machine's resources. On a remote cluster the project is shipped to
the workers through the runtime env (`py_modules`), and the AWS_* / MLFLOW_* variables of this process go
with it, so workers reach the same storage and tracking server without any secret written to a file.
The serving API keys never go: `RAYBOOTH_API_KEYS` (or the `secret_env` names, e.g. the serve config's
`api_keys_env`) is left out of the runtime env and hidden while an embedded Ray starts its processes,
so only the digests the ingress gets as arguments reach a worker.

    with ray_session(cfg.cluster, secret_env=[cfg.api_keys_env]): ...
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from raybooth.cluster.config import ClusterSection
from raybooth.cluster.workdir import work_dir
from raybooth.errors import UserError

# Variables a worker needs to reach storage and tracking; forwarded, never written anywhere.
PASSTHROUGH_PREFIXES = ("AWS_", "MLFLOW_", "RAYBOOTH_", "HF_")
# Never forwarded, whatever the caller names: the serving keys' default variable (see serving/auth.py).
SECRET_ENV_VARS = ("RAYBOOTH_API_KEYS",)
# Embedded Ray's object store: big enough for image batches, small enough to leave RAM to the models.
EMBEDDED_OBJECT_STORE_BYTES = 2 * 1024**3


@dataclass
class ClusterInfo:
    address: str  # "embedded" or the address connected to
    embedded: bool
    nodes: int
    cpus: float
    gpus: float
    ray_version: str


def resolve_address(section: ClusterSection) -> str | None:
    """The address to connect to, or None for an embedded local Ray."""
    return section.address or os.environ.get("RAY_ADDRESS") or None


def passthrough_env(secret_env: Iterable[str] = ()) -> dict[str, str]:
    """AWS_* / MLFLOW_* / RAYBOOTH_* / HF_* variables of this process, for the workers' runtime env, less
    the secrets (SECRET_ENV_VARS and `secret_env`)."""
    hidden = {*SECRET_ENV_VARS, *secret_env}
    return {k: v for k, v in os.environ.items() if k.startswith(PASSTHROUGH_PREFIXES) and k not in hidden}


@contextlib.contextmanager
def hidden_env(names: Iterable[str]) -> Iterator[None]:
    """Remove `names` from os.environ for the block: an embedded Ray's raylet (and so every worker it
    spawns) inherits the environment of the process that starts it."""
    saved = {name: os.environ.pop(name) for name in {*names} if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def added_env(env: Mapping[str, str]) -> Iterator[None]:
    """`env` in os.environ for the block (an embedded Ray's processes start with it), as it was after."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, for a server this process is about to start."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def project_runtime_env(ship_project: bool, secret_env: Iterable[str] = ()) -> dict:
    """Runtime env for a remote cluster: this checkout of raybooth plus the pass-through variables.

    Inside a submitted job (`raybooth submit`, a RayJob) the job's own runtime env already applies to this
    driver and every worker it starts, and Ray refuses a `ray.init` runtime env that repeats any of its
    fields or variables: then only what the job's env lacks is added."""
    env: dict = {"env_vars": passthrough_env(secret_env)}
    if ship_project:
        import raybooth

        env["py_modules"] = [str(Path(raybooth.__file__).parent)]
    job_config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray for the driver of a job
    if job_config:
        job_env = json.loads(job_config).get("runtime_env") or {}
        job_vars = job_env.get("env_vars") or {}
        env["env_vars"] = {k: v for k, v in env["env_vars"].items() if k not in job_vars}
        env = {k: v for k, v in env.items() if k not in job_env and v}
    return env


def _check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """Fail in seconds, with the fix, when a GCS address does not answer (ray.init would hang for minutes)."""
    if address in ("auto", "local"):
        return  # Ray finds a local cluster itself and errors quickly when there is none
    target = address.removeprefix("ray://")
    parsed = urlparse(f"//{target}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise UserError(
            f"Ray address {address!r} is not host:port (example: 10.0.0.5:6379 or ray://head:10001)"
        )
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise UserError(
            f"Ray cluster at {address} does not answer ({e.strerror or e}); start it with `ray up ray_cluster.yaml` "
            "or unset RAY_ADDRESS / cluster.address to use an embedded local Ray"
        ) from e


def quiet_ray_logging(verbose: bool) -> None:
    """Ray and Ray Data print a lot by default; keep the terminal to our own output unless -v."""
    level = logging.INFO if verbose else logging.WARNING
    for name in ("ray", "ray.data", "ray.train", "ray.serve", "ray.tune"):
        logging.getLogger(name).setLevel(level)
    if not verbose:
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def init_ray(
    section: ClusterSection,
    verbose: bool = False,
    secret_env: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
) -> ClusterInfo:
    """Connect to the configured cluster or start an embedded one; idempotent within a process. The
    `secret_env` variables (and SECRET_ENV_VARS) reach no worker. `env`: variables every process of an
    embedded Ray starts with (Ray's own switches, such as Serve's high-throughput mode); a connected
    cluster has its nodes' environment."""
    import ray

    quiet_ray_logging(verbose)
    if ray.is_initialized():
        return cluster_info()
    address = resolve_address(section)
    common = dict(
        namespace=section.namespace,
        logging_level=logging.INFO if verbose else logging.WARNING,
        log_to_driver=verbose,
    )
    if address:
        _check_reachable(address)
        ray.init(address=address, runtime_env=project_runtime_env(section.ship_project, secret_env), **common)
    else:
        num_gpus = section.num_gpus
        if num_gpus is None:
            import torch

            num_gpus = torch.cuda.device_count()
        secrets = [*SECRET_ENV_VARS, *secret_env]
        with hidden_env(secrets), added_env(env or {}):
            ray.init(
                # "local" always starts a new instance; None would attach to any `ray start` cluster on this
                # machine, which is not what "embedded" promises.
                address="local",
                num_cpus=section.num_cpus or os.cpu_count(),
                num_gpus=num_gpus,
                object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
                include_dashboard=False,
                # Workers start in Ray's own folder: give them the absolute work dir so they find the same
                # storage root, MLflow store and built presets as this process.
                runtime_env={"env_vars": {**passthrough_env(secrets), "RAYBOOTH_HOME": str(work_dir())}},
                **common,
            )
    info = cluster_info()
    info.address = address or "embedded"
    info.embedded = not address
    return info


def cluster_info() -> ClusterInfo:
    """Resources of the cluster this process is connected to."""
    import ray

    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return ClusterInfo(
        address=ray.get_runtime_context().gcs_address,
        embedded=False,
        nodes=len(nodes),
        cpus=resources.get("CPU", 0.0),
        gpus=resources.get("GPU", 0.0),
        ray_version=ray.__version__,
    )


@contextlib.contextmanager
def ray_session(
    section: ClusterSection,
    verbose: bool = False,
    secret_env: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[ClusterInfo]:
    """Init Ray for one CLI command and shut it down afterwards (unless it was already up)."""
    import ray

    was_up = ray.is_initialized()
    info = init_ray(section, verbose=verbose, secret_env=secret_env, env=env)
    try:
        yield info
    finally:
        if not was_up:
            ray.shutdown()
