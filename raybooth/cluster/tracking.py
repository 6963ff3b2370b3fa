"""MLflow tracking and model registry, with an embedded default and fast failure.

    from raybooth.cluster import tracking
    tracking.configure(cfg.tracking)                    # sqlite under the work dir, or a server
    with tracking.start_run("dogs", run_name="sks-dog") as run:
        tracking.log_params({"lr": 5e-6})
        tracking.log_metrics({"loss": 0.1}, step=10)
        tracking.log_artifacts("/tmp/model", "model")
    version = tracking.register_model(run.info.run_id, "model", "raybooth-dog", alias="latest")
    path = tracking.download_model("raybooth-dog@latest")

Where it tracks: `tracking.tracking_uri`, else `MLFLOW_TRACKING_URI`, else the embedded default
`sqlite:///<work dir>/mlflow/mlflow.db` with artifacts in `<work dir>/mlflow/artifacts` (set on each
experiment we create, so a sqlite store never scatters `./mlruns` into the current folder).

MLflow's HTTP client retries an unreachable server for minutes; `configure` probes `/health` first so
a wrong URI is a `TrackingError` in seconds. Credentials for a server (`MLFLOW_TRACKING_USERNAME`,
`MLFLOW_TRACKING_PASSWORD`, `MLFLOW_TRACKING_TOKEN`) and for its S3 artifacts come from the environment.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from raybooth.cluster.config import TrackingSection
from raybooth.cluster.workdir import default_mlflow_dir
from raybooth.errors import TrackingError

REGISTRATION_TIMEOUT_S = 300  # a remote registry may copy artifacts before a version is READY
_MODEL_REF = re.compile(r"^(?P<name>[^@]+?)(?:@(?P<alias>[^@/]+)|/(?P<version>\d+|latest))?$")

_configured_uri: str | None = None


@dataclass(frozen=True)
class ModelRef:
    """One registered model version, resolved: its name, number and where its artifacts live."""

    name: str
    version: int
    source: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


# --------------------------------------------------------------------------------------------------
# Where to track
# --------------------------------------------------------------------------------------------------


def default_tracking_uri() -> str:
    """The embedded store; its folder is ours to create, so a fresh work dir just works."""
    folder = default_mlflow_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def default_artifacts_dir() -> Path:
    return default_mlflow_dir() / "artifacts"


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _is_local_store(uri: str) -> bool:
    """sqlite / file stores: artifacts would default to ./mlruns, so we set a location ourselves.

    Servers, remote databases and bare words such as `databricks` pick their own artifact root.
    """
    return uri.startswith(("sqlite:", "file:")) or uri.startswith(("/", "."))


def resolve_tracking_uri(section: TrackingSection) -> str:
    """The config's URI, else MLFLOW_TRACKING_URI, else the sqlite store under the work dir."""
    return section.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _init_sqlite_store(uri: str) -> None:
    """Create a sqlite store's tables once, under a file lock.

    Two processes opening a fresh store at once (a fleet's trainings, Ray workers) both run MLflow's
    migrations and one fails with "table ... already exists"; the lock makes the first one create them."""
    path = Path(uri[len("sqlite:///") :])
    path.parent.mkdir(parents=True, exist_ok=True)  # sqlite creates the file but not its folder
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def configure(section: TrackingSection) -> str:
    """Point mlflow's tracking and registry at the configured store; returns the tracking URI."""
    global _configured_uri
    uri = resolve_tracking_uri(section)
    registry = section.registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or uri
    if uri.startswith("sqlite:///") and uri != _configured_uri:
        _init_sqlite_store(uri)
    for u in {uri, registry}:
        if _is_http(u):
            ok, msg = check_tracking(u)
            if not ok:
                raise TrackingError(msg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(registry)
    _configured_uri = uri
    return uri


def _ensure_configured() -> str:
    """Configure the defaults on first use, so mlflow never falls back to ./mlflow.db in the cwd."""
    return _configured_uri or configure(TrackingSection())


def _client() -> MlflowClient:
    _ensure_configured()
    return MlflowClient()


def check_tracking(uri: str, timeout_s: float = 5) -> tuple[bool, str]:
    """`(ok, one-line message)`: an HTTP server must answer /health; a database store must open."""
    if _is_http(uri):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout_s) as resp:
                if resp.status == 200:
                    return True, f"MLflow server {uri} answers"
                reason = f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            reason = f"HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            reason = str(getattr(e, "reason", e))
        return False, (
            f"MLflow tracking server {uri} does not answer ({reason}); start it (`mlflow server`) or fix "
            "tracking.tracking_uri / MLFLOW_TRACKING_URI"
        )
    if uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///") :]).parent
        if not folder.is_dir():
            return (
                False,
                f"MLflow store {uri}: folder {folder} does not exist; create it or fix tracking.tracking_uri",
            )
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # any failure to open the store is what doctor must report
        return False, f"MLflow store {uri} does not open ({type(e).__name__}: {e}); fix tracking.tracking_uri"
    return True, f"MLflow store {uri} opens"


# --------------------------------------------------------------------------------------------------
# Experiments and runs
# --------------------------------------------------------------------------------------------------


def _artifact_location(experiment: str) -> str | None:
    if not _is_local_store(_ensure_configured()):
        return None  # a server (or a remote database) decides where its artifacts go
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)
    return (default_artifacts_dir() / safe).as_uri()


def get_or_create_experiment(name: str) -> str:
    """The id of experiment `name`, created (with a work-dir artifact location) if it is new."""
    client = _client()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(name))
        except MlflowException as e:
            # Another process (a second Ray worker) created it between our get and create.
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise TrackingError(f"cannot create MLflow experiment {name!r}: {e.message}") from e
    if exp.lifecycle_stage == "deleted":
        raise TrackingError(
            f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore`) or set "
            "tracking.experiment to another name"
        )
    return exp.experiment_id


@contextmanager
def start_run(
    experiment: str,
    run_name: str | None = None,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start a new run in `experiment`, or resume `run_id` (e.g. after a job restart); ends it on exit."""
    experiment_id = get_or_create_experiment(experiment)
    if run_id is not None:
        try:
            MlflowClient().get_run(run_id)
        except MlflowException as e:
            raise TrackingError(
                f"MLflow run {run_id!r} not found at {_ensure_configured()}; check the run id (resume=) "
                "or leave it empty to start a new run"
            ) from e
    with mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else experiment_id,
        run_name=run_name,
        tags=tags,
    ) as run:
        yield run


def _active_run() -> mlflow.ActiveRun:
    # mlflow would silently start a run in the Default experiment (artifacts in ./mlruns): refuse.
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no active MLflow run; log inside `with tracking.start_run(...)`")
    return run


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dicts become dotted keys (`tracking.experiment`), as the command line writes them."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_params(params: dict[str, Any]) -> None:
    _active_run()
    mlflow.log_params(_flatten(params))


def log_metrics(metrics: dict[str, float], step: int) -> None:
    _active_run()
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def log_image(image: Any, artifact_file: str) -> None:
    """Log a PIL image (or numpy array) as `artifact_file`, e.g. `validation/step_000100.png`."""
    _active_run()
    mlflow.log_image(image, artifact_file=artifact_file)


def log_artifacts(local_dir: str | os.PathLike[str], artifact_path: str | None = None) -> None:
    _active_run()
    mlflow.log_artifacts(os.fspath(local_dir), artifact_path=artifact_path)


def log_file(path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
    _active_run()
    mlflow.log_artifact(os.fspath(path), artifact_path=artifact_path)


def get_run(run_id: str) -> Run:
    try:
        return _client().get_run(run_id)
    except MlflowException as e:
        raise TrackingError(f"MLflow run {run_id!r} not found at {_ensure_configured()}") from e


# --------------------------------------------------------------------------------------------------
# Model registry
# --------------------------------------------------------------------------------------------------


def _wait_until_ready(client: MlflowClient, name: str, version: str) -> None:
    deadline = time.monotonic() + REGISTRATION_TIMEOUT_S
    while True:
        mv = client.get_model_version(name, version)
        if mv.status == "READY":
            return
        if mv.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise TrackingError(
                f"model {name} version {version} is {mv.status} ({mv.status_message}); check the registry server"
            )
        time.sleep(1)


def register_model(
    run_id: str,
    artifact_path: str,
    name: str,
    alias: str | None = None,
    tags: dict[str, str] | None = None,
) -> int:
    """Register the run's `artifact_path` folder as a new version of `name`; returns the version number."""
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    client = _client()
    get_run(run_id)  # a clear error for a wrong run id, before anything is created
    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise TrackingError(f"cannot create registered model {name!r}: {e.message}") from e
    # The concrete artifact location (not runs:/) is what any later reader of the registry can open.
    source = RunsArtifactRepository.get_underlying_uri(f"runs:/{run_id}/{artifact_path}")
    mv = client.create_model_version(name, source, run_id=run_id, tags=tags, await_creation_for=0)
    _wait_until_ready(client, name, mv.version)
    if alias:
        set_alias(name, alias, int(mv.version))
    return int(mv.version)


def set_alias(name: str, alias: str, version: int) -> None:
    """Point `name@alias` at `version` (moving it if it pointed elsewhere)."""
    try:
        _client().set_registered_model_alias(name, alias, str(version))
    except MlflowException as e:
        raise TrackingError(f"cannot set alias {name}@{alias} -> {version}: {e.message}") from e


def list_registered_models() -> list[str]:
    client = _client()
    names: list[str] = []
    token = None
    while True:
        page = client.search_registered_models(page_token=token)
        names.extend(m.name for m in page)
        token = page.token
        if not token:
            return sorted(names)


def _unknown_model(ref: str, why: str) -> TrackingError:
    known = list_registered_models()
    shown = ", ".join(known[:10]) + (" ..." if len(known) > 10 else "") if known else "none"
    return TrackingError(
        f"model {ref!r}: {why} in the registry at {_ensure_configured()} (registered: {shown}); "
        "use name, name/VERSION or name@ALIAS"
    )


def resolve_model_ref(ref: str) -> ModelRef:
    """Resolve `models:/name/3`, `models:/name@alias`, `models:/name`, `name`, `name/3` or `name@alias`."""
    body = ref[len("models:/") :] if ref.startswith("models:/") else ref
    match = _MODEL_REF.match(body.strip("/"))
    if not match:
        raise TrackingError(f"model reference {ref!r} is malformed; use name, name/VERSION or name@ALIAS")
    name, alias, version = match["name"], match["alias"], match["version"]
    client = _client()
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        elif version and version != "latest":
            mv = client.get_model_version(name, version)
        else:
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise _unknown_model(ref, "no registered versions")
            mv = max(versions, key=lambda v: int(v.version))
    except MlflowException as e:
        raise _unknown_model(ref, "not found") from e
    return ModelRef(name=mv.name, version=int(mv.version), source=mv.source)


def download_model(ref: str, dst_dir: str | os.PathLike[str] | None = None) -> Path:
    """That version's artifacts in a local folder `<dst_dir or work dir/mlflow/models>/<name>/<version>`.

    A version's artifacts never change, so a folder that is already there is the cache hit. The
    download lands in a temp folder beside it and is renamed into place, so a crash mid-way never
    leaves a half model that a later call would trust.
    """
    model = resolve_model_ref(ref)
    root = Path(dst_dir) if dst_dir is not None else default_mlflow_dir() / "models"
    target = root / re.sub(r"[^A-Za-z0-9._-]+", "_", model.name) / str(model.version)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{model.version}.tmp-{uuid.uuid4().hex[:6]}"))
    try:
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.uri, dst_path=str(tmp)))
        except MlflowException as e:
            raise TrackingError(f"cannot download {model.uri} ({model.source}): {e.message}") from e
        try:
            os.rename(got, target)
        except OSError:
            if not target.is_dir():  # not a lost race with another process: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
