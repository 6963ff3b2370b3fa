"""`make demo` end to end: the demo command runs every stage on a fresh work dir and prints its summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs_every_stage_and_prints_where_everything_went(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "RAY_ADDRESS"))}
    env["RAYBOOTH_HOME"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "raybooth.cli", "demo", "--config", "configs/demo.yaml", "images=4"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    summary = out[out.index("raybooth demo finished") :]
    for what in ("model tiny-sd", "sample images", "captions", "mlflow run", "dreambooth", "serve",
                 "images.generate", "chat.completions"):  # fmt: skip
        assert what in summary, what
    # Each stage left its results where the summary says.
    images = sorted((tmp_path / "storage" / "demo" / "images").glob("*.png"))
    assert len(images) == 4
    captions = pq.read_table(tmp_path / "storage" / "demo" / "captions").to_pylist()
    assert len(captions) == 4 and all(row["error"] is None and row["caption"] for row in captions)
    assert "models:/raybooth-demo-subject/1" in summary
    assert (tmp_path / "mlflow" / "mlflow.db").is_file()
    assert "64x64 PNG" in summary and "tokens)" in summary


def test_the_demo_refuses_a_base_model_that_is_no_diffusion_pipeline_before_starting_ray(capsys):
    import ray

    from raybooth.cli import main

    was_up = ray.is_initialized()
    assert main(["demo", "--config", str(REPO / "configs/demo.yaml"), "base_model=tiny-vlm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "tiny-vlm" in err, err
    assert ray.is_initialized() == was_up  # refused before the demo's Ray step
