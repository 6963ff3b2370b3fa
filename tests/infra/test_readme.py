"""infra/README.md: the operator's guide names only files that exist and commands this repo provides.

.venv/bin/python -m pytest tests/infra/test_readme.py
"""

from __future__ import annotations

import re
from pathlib import Path

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
