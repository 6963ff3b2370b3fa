"""infra/README.md names only files that exist and commands this repo provides; README.md's first
`raybooth train` line runs as printed on a fresh clone.

.venv/bin/python -m pytest tests/infra/test_readme.py
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "infra/README.md").read_text()


def test_every_repo_path_in_the_readme_exists():
    paths = set(
        re.findall(r"(?<![\w/.-])((?:infra|raybooth|configs|tests)/[\w./-]*\w|ray_cluster\.yaml)", README)
    )
    assert "ray_cluster.yaml" in paths and "infra/serve/serve_config.yaml" in paths
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"infra/README.md names files that do not exist: {missing}"


def test_the_readme_covers_the_whole_way_to_a_running_cluster():
    for step in (
        "ray up ray_cluster.yaml",
        "raybooth submit",
        "serve deploy infra/serve/serve_config.yaml",
        "kubectl apply -f infra/k8s/",
        "python -m raybooth.cluster.kuberay sync",
        "max_workers",  # how to scale a launcher group
        "maxReplicas",  # how to scale a KubeRay group
    ):
        assert step in README, f"infra/README.md does not show `{step}`"
    for place in ("dashboard", "MLflow UI", "logs"):
        assert place in README


# --------------------------------------------------------------------------------------------------
# README.md: the first `raybooth train` line runs as printed on a fresh clone
# --------------------------------------------------------------------------------------------------

MAIN_README = (REPO / "README.md").read_text()


def first_train_line() -> list[str]:
    section = MAIN_README.split("## DreamBooth", 1)[1]
    line = next(x for x in section.splitlines() if x.startswith("raybooth train "))
    return shlex.split(line.split("#", 1)[0])


def test_the_readme_train_line_resolves_to_photos_that_ship_with_the_repo(monkeypatch):
    from PIL import Image

    from raybooth.cli import build_parser
    from raybooth.cluster.job_commands import load_job_config

    monkeypatch.chdir(REPO)  # as a user runs it: from the clone's root
    argv = first_train_line()
    args = build_parser().parse_args(argv[1:])
    cfg = load_job_config("train", args)
    (concept,) = cfg.concepts
    photos = sorted((REPO / concept.instance_data).glob("*.png"))
    assert 3 <= len(photos) <= 5, f"{concept.instance_data} should hold 3-5 example photos"
    for photo in photos:
        assert photo.stat().st_size < 8 * 1024  # tiny: they live in git
        with Image.open(photo) as image:
            assert image.size[0] >= cfg.resolution
    assert not concept.instance_data.startswith(".raybooth")  # not a folder only `raybooth demo` creates
    assert cfg.steps <= 5  # a fresh clone on 2 CPUs finishes it in minutes


@pytest.mark.slow
def test_the_readme_train_line_trains_and_registers_a_model(tmp_path, tiny_sd_path):
    # Run exactly as printed, from the repo root; only the work dir moves so the test leaves no trace. The
    # session's tiny-sd build is linked into it (building it is `raybooth demo`'s test on a fresh work dir).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env["RAYBOOTH_HOME"] = str(tmp_path)
    shutil.copytree(tiny_sd_path, tmp_path / "models" / tiny_sd_path.name, copy_function=os.link)
    argv = first_train_line()
    result = subprocess.run(
        [sys.executable, "-m", "raybooth.cli", *argv[1:]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "raybooth train: 2 steps" in result.stdout
    assert "registered model:  models:/raybooth-subject/1" in result.stdout
