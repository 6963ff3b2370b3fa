"""infra/docker/Dockerfile: built on Ray's maintained image at the pinned version, installing from constraints.txt.

    .venv/bin/python -m pytest tests/infra/test_docker.py

There is no Docker engine in CI, so this reads the Dockerfile the way `docker build` would resolve it.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "infra/docker/Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _base_image(text: str, build_args: dict[str, str]) -> str:
    """The FROM image after substituting ARG defaults (global ARGs before FROM) and --build-arg values."""
    args: dict[str, str] = {}
    for word, rest in _instructions(text):
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = build_args.get(name, default)
        if word == "FROM":
            return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0])
    raise AssertionError("Dockerfile has no FROM")


@pytest.mark.parametrize("flavor", ["gpu", "cpu"])
def test_base_is_rays_maintained_image_at_the_pinned_version(flavor, pinned_ray):
    text = DOCKERFILE.read_text()
    build_args = {} if flavor == "gpu" else {"FLAVOR": "cpu"}  # gpu is the default build
    assert _base_image(text, build_args) == f"rayproject/ray:{pinned_ray}-py311-{flavor}"
    assert all("ray-ml" not in rest for word, rest in _instructions(text) if word == "FROM")  # discontinued


def test_installs_torch_and_the_project_from_constraints():
    runs = [rest for word, rest in _instructions(DOCKERFILE.read_text()) if word == "RUN"]
    pip_installs = [r for r in runs if "pip install" in r]
    assert any("torch" in r and "-c constraints.txt" in r for r in pip_installs)
    assert any(re.search(r"pip install .*-c constraints\.txt \.(\s|$)", r) for r in pip_installs)
    assert all("-c constraints.txt" in r for r in pip_installs), "every pip install must honour the pins"
    assert any("download.pytorch.org/whl/cpu" in r for r in runs)  # CPU image gets the CPU-only torch build
    assert any("pip check" in r for r in runs)


def test_copied_files_exist_and_pass_the_dockerignore():
    ignore = (REPO / "infra/docker/Dockerfile.dockerignore").read_text().splitlines()
    allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    copies = [rest.split()[:-1] for word, rest in _instructions(DOCKERFILE.read_text()) if word == "COPY"]
    assert copies
    for sources in copies:
        for source in sources:
            assert (REPO / source).exists(), f"COPY {source}: not in the repo"
            assert any(fnmatch.fnmatch(source, pattern) for pattern in allowed), f"{source} is dockerignored"
