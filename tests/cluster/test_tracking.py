"""MLflow tracking + registry on the embedded sqlite store and on a real `mlflow server` with S3 artifacts.

.venv/bin/python -m pytest tests/cluster/test_tracking.py
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from raybooth.cluster import storage, tracking
from raybooth.cluster.config import TrackingSection
from raybooth.cluster.workdir import work_dir
from raybooth.errors import TrackingError


def unique(prefix: str) -> str:
    """Names shared by the session's store must not collide between tests."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def embedded() -> Iterator[str]:
    """The default store (sqlite under the session's work dir), configured for this test."""
    uri = tracking.configure(TrackingSection())
    yield uri
    while mlflow.active_run():  # a failed test must not leave a run for the next one
        mlflow.end_run()


def make_model_dir(root: Path, payload: bytes) -> Path:
    model = root / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "weights.bin").write_bytes(payload)
    (model / "config.json").write_text('{"preset": "tiny-sd"}')
    return model


def test_default_uri_is_sqlite_under_work_dir(embedded: str) -> None:
    assert embedded == f"sqlite:///{work_dir() / 'mlflow' / 'mlflow.db'}"
    assert mlflow.get_tracking_uri() == embedded and mlflow.get_registry_uri() == embedded
    assert tracking.resolve_tracking_uri(TrackingSection(tracking_uri="http://h:5000")) == "http://h:5000"
    ok, msg = tracking.check_tracking(embedded)
    assert ok, msg


def test_env_uri_is_used_when_config_is_empty(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    assert tracking.resolve_tracking_uri(TrackingSection()) == f"sqlite:///{tmp_path}/other.db"


def test_run_params_metrics_image_artifacts(embedded: str, tmp_path: Path) -> None:
    experiment = unique("exp")
    model_dir = make_model_dir(tmp_path, b"w" * 64)
    note = tmp_path / "note.txt"
    note.write_text("hello")
    with tracking.start_run(experiment, run_name="sks-dog", tags={"subject": "dog"}) as run:
        tracking.log_params({"lr": 5e-6, "tracking": {"experiment": experiment}})
        for step in range(3):
            tracking.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        tracking.log_image(Image.new("RGB", (8, 8), (255, 0, 0)), "validation/step_0.png")
        tracking.log_artifacts(model_dir, "model")
        tracking.log_file(note, "notes")
    run_id = run.info.run_id

    got = tracking.get_run(run_id)
    assert got.info.run_name == "sks-dog" and got.data.tags["subject"] == "dog"
    assert got.data.params == {"lr": "5e-06", "tracking.experiment": experiment}
    history = mlflow.MlflowClient().get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]

    # Artifacts live under the work dir, not in ./mlruns of the current folder.
    artifacts = Path(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="", dst_path=str(tmp_path / "a"))
    )
    assert (artifacts / "model" / "unet" / "weights.bin").read_bytes() == b"w" * 64
    assert (artifacts / "notes" / "note.txt").read_text() == "hello"
    assert Image.open(artifacts / "validation" / "step_0.png").getpixel((0, 0)) == (255, 0, 0)
    artifact_root = Path(got.info.artifact_uri.removeprefix("file://"))
    assert artifact_root.is_relative_to(work_dir() / "mlflow" / "artifacts")
    assert (artifact_root / "model" / "config.json").is_file()
    assert not (Path.cwd() / "mlruns").exists()


def test_resume_run_by_id(embedded: str) -> None:
    experiment = unique("resume")
    with tracking.start_run(experiment) as first:
        tracking.log_metrics({"loss": 2.0}, step=0)
    with tracking.start_run(experiment, run_id=first.info.run_id) as again:
        assert again.info.run_id == first.info.run_id
        tracking.log_metrics({"loss": 1.0}, step=1)
    history = mlflow.MlflowClient().get_metric_history(first.info.run_id, "loss")
    assert [m.step for m in history] == [0, 1]
    assert tracking.get_run(first.info.run_id).info.status == "FINISHED"


def test_missing_run_id_is_tracking_error(embedded: str) -> None:
    with pytest.raises(TrackingError, match="deadbeef"), tracking.start_run(unique("x"), run_id="deadbeef"):
        pass
    assert mlflow.active_run() is None


def test_logging_outside_a_run_is_refused(embedded: str) -> None:
    with pytest.raises(RuntimeError, match="start_run"):
        tracking.log_params({"a": 1})


def test_register_alias_resolve_and_download(embedded: str, tmp_path: Path) -> None:
    name = unique("raybooth-dog")
    runs = []
    for i in range(2):
        with tracking.start_run(unique("reg")) as run:
            tracking.log_artifacts(make_model_dir(tmp_path / str(i), bytes([i]) * 16), "model")
        runs.append(run.info.run_id)
    assert tracking.register_model(runs[0], "model", name, alias="champion", tags={"subject": "dog"}) == 1
    assert tracking.register_model(runs[1], "model", name) == 2
    assert name in tracking.list_registered_models()

    expected = {
        f"models:/{name}/1": 1,
        f"models:/{name}@champion": 1,
        f"models:/{name}": 2,  # latest
        name: 2,
        f"{name}/1": 1,
        f"{name}@champion": 1,
    }
    for ref, version in expected.items():
        model = tracking.resolve_model_ref(ref)
        assert (model.name, model.version) == (name, version), ref
    assert tracking.resolve_model_ref(name).source != tracking.resolve_model_ref(f"{name}/1").source

    tracking.set_alias(name, "champion", 2)
    assert tracking.resolve_model_ref(f"{name}@champion").version == 2

    path = tracking.download_model(f"{name}/1")
    assert path == work_dir() / "mlflow" / "models" / name / "1"
    assert (path / "unet" / "weights.bin").read_bytes() == bytes([0]) * 16
    assert [p.name for p in path.parent.iterdir()] == ["1"]  # no temp folders left behind
    # Cached: a second call does not touch the registry (the marker we drop would be overwritten).
    (path / "cache-marker").write_text("kept")
    assert tracking.download_model(f"models:/{name}/1") == path
    assert (path / "cache-marker").read_text() == "kept"

    other = tracking.download_model(f"{name}@champion", dst_dir=tmp_path / "cache")
    assert other == tmp_path / "cache" / name / "2"
    assert (other / "unet" / "weights.bin").read_bytes() == bytes([1]) * 16


@pytest.mark.parametrize("ref", ["no-such-model", "models:/no-such-model/1", "no-such-model@prod"])
def test_unknown_model_refs(embedded: str, ref: str) -> None:
    with pytest.raises(TrackingError, match="no-such-model"):
        tracking.resolve_model_ref(ref)


def test_unknown_version_and_alias_of_a_known_model(embedded: str, tmp_path: Path) -> None:
    name = unique("known")
    with tracking.start_run(unique("reg")) as run:
        tracking.log_artifacts(make_model_dir(tmp_path, b"x"), "model")
    tracking.register_model(run.info.run_id, "model", name)
    for ref in (f"{name}/7", f"{name}@nope"):
        with pytest.raises(TrackingError, match=ref.replace("/", ".")):
            tracking.resolve_model_ref(ref)


def test_dead_http_uri_fails_fast() -> None:
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
        started = time.monotonic()
        ok, msg = tracking.check_tracking(dead)
        assert not ok and dead in msg and "MLFLOW_TRACKING_URI" in msg
        with pytest.raises(TrackingError, match="does not answer"):
            tracking.configure(TrackingSection(tracking_uri=dead))
        assert time.monotonic() - started < 5


def test_sqlite_store_in_missing_folder_is_reported(tmp_path: Path) -> None:
    ok, msg = tracking.check_tracking(f"sqlite:///{tmp_path}/missing/mlflow.db")
    assert not ok and "does not exist" in msg


@pytest.mark.slow
def test_tracking_server_with_s3_artifacts(
    mlflow_server: str, mlflow_artifacts_root: str, s3_server, tmp_path: Path
) -> None:
    """A real `mlflow server` proxies artifacts to the loopback S3: run, artifact and model round-trip."""
    assert tracking.check_tracking(mlflow_server) == (True, f"MLflow server {mlflow_server} answers")
    try:
        assert tracking.configure(TrackingSection(tracking_uri=mlflow_server)) == mlflow_server
        payload = bytes(range(256)) * 8
        name = unique("served-dog")
        with tracking.start_run(unique("server"), run_name="remote") as run:
            tracking.log_params({"steps": 3})
            tracking.log_metrics({"loss": 0.5}, step=3)
            tracking.log_artifacts(make_model_dir(tmp_path, payload), "model")
        run_id = run.info.run_id
        assert tracking.get_run(run_id).data.metrics == {"loss": 0.5}

        # The artifact went through the server into the S3 bucket...
        keys = storage.list_files(mlflow_artifacts_root)
        assert any(k.endswith(f"{run_id}/artifacts/model/unet/weights.bin") for k in keys), keys
        bucket = mlflow_artifacts_root.split("/")[2]
        assert any(k.endswith("model/unet/weights.bin") for k in s3_server.list_keys(bucket))

        # ...and comes back byte for byte, directly and through the registry.
        back = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path="model/unet/weights.bin", dst_path=str(tmp_path / "back")
        )
        assert Path(back).read_bytes() == payload
        assert tracking.register_model(run_id, "model", name, alias="prod") == 1
        assert tracking.resolve_model_ref(f"models:/{name}@prod").version == 1
        path = tracking.download_model(f"{name}@prod", dst_dir=tmp_path / "models")
        assert (path / "unet" / "weights.bin").read_bytes() == payload
        assert name in tracking.list_registered_models()
    finally:
        tracking.configure(TrackingSection())  # later tests get the embedded store back
