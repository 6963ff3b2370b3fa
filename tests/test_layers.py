"""Dependencies point one way: cluster/ <- models/ <- openai/ <- pipelines/, serving/ <- the CLI.

    .venv/bin/python -m pytest tests/test_layers.py

Every `import` in the package is read with `ast`, including the ones inside functions (the package
defers heavy imports there, and a deferred import is still a dependency). A rule names, for each layer,
the raybooth layers (and third-party packages) it must never import:

- `cluster/` is what every job stands on: typed config, Ray runtime, storage, tracking. It knows nothing
  of models, the OpenAI surface, the jobs or the apps.
- `models/` is plain PyTorch compute: no Ray (the GPU benchmarks run it on a machine without Ray), and no
  cluster config or storage (paths and filesystems come in as arguments).
- `openai/` is the Ray-free OpenAI surface shared by the chat route and the batch job.
- `pipelines/` (Ray Data / Train jobs) and `serving/` (Ray Serve apps) never import each other.
- Only the top-level entry points (`cli`, `demo`, `doctor`) may import everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raybooth"

ENTRY_POINTS = {"cli", "demo", "doctor"}
# layer -> the raybooth layers (first path part under raybooth/) it must not import; "*": none at all.
FORBIDDEN: dict[str, set[str]] = {
    "errors": {"*"},
    "cluster": {"models", "openai", "pipelines", "serving", *ENTRY_POINTS},
    "models": {"cluster", "openai", "pipelines", "serving", *ENTRY_POINTS},
    "openai": {"pipelines", "serving", *ENTRY_POINTS},
    "pipelines": {"serving", *ENTRY_POINTS},
    "serving": {"pipelines", *ENTRY_POINTS},
}
# layer -> third-party packages it must not import (models/ and openai/ run where Ray is not installed).
FORBIDDEN_PACKAGES: dict[str, set[str]] = {
    "models": {"ray"},
    "openai": {"ray", "fastapi", "starlette"},
}


def layer_of(module: str) -> str | None:
    """`raybooth.models.chat` -> `models`; `ray.serve` -> `ray` (third-party: its top-level package)."""
    parts = module.split(".")
    if parts[0] == "raybooth":
        return parts[1] if len(parts) > 1 else None
    return parts[0]


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import statement in `source`, wherever it sits."""
    found: list[tuple[int, str]] = []
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            # `from raybooth import cli` imports raybooth.cli, not raybooth itself.
            if target == "raybooth":
                found += [(node.lineno, f"raybooth.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, target))
    return found


def violations(source: str, module: str) -> list[str]:
    """Every import in `source` (the module named `module`) that its layer's rule forbids."""
    layer = layer_of(module) or ""
    problems = []
    for line, target in imported_modules(source, module):
        target_layer = layer_of(target)
        if target.startswith("raybooth."):
            forbidden = FORBIDDEN.get(layer, set())
            broken = target_layer != layer and ("*" in forbidden or target_layer in forbidden)
        else:
            broken = target_layer in FORBIDDEN_PACKAGES.get(layer, set())
        if broken:
            problems.append(f"{module}:{line} imports {target} ({layer}/ must not import {target_layer})")
    return problems


def package_modules() -> list[tuple[str, Path]]:
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1] + ["__init__"]
        modules.append((".".join(parts), path))
    return modules


def test_every_layer_imports_only_what_lies_below_it():
    problems = [p for module, path in package_modules() for p in violations(path.read_text(), module)]
    assert not problems, "layer rule broken:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("raybooth.models.safety", "from raybooth.cluster.config import SafetySection\n"),
        ("raybooth.models.vlm_engine", "def f():\n    import ray\n"),
        ("raybooth.cluster.doctor", "def f():\n    from raybooth.models.presets import build_preset\n"),
        ("raybooth.pipelines.batch", "from raybooth.serving.protocol import APIError\n"),
        ("raybooth.openai.chat", "from ray import serve\n"),
        ("raybooth.openai.errors", "from fastapi import Request\n"),
        ("raybooth.models.decoding", "from raybooth.openai.protocol import ChatCompletionRequest\n"),
        ("raybooth.errors", "from raybooth.cluster.workdir import work_dir\n"),
        ("raybooth.models.images", "from ..cluster import storage\n"),
        ("raybooth.cluster.runtime", "from raybooth import demo\n"),
    ],
)
def test_the_rule_catches_a_forbidden_import(module, source):
    assert violations(source, module), f"{source!r} in {module} should break the layer rule"


def test_the_rule_allows_imports_within_a_layer_and_downwards():
    assert not violations("from raybooth.models.decoding import SamplingParams\n", "raybooth.models.chat")
    assert not violations("from raybooth.cluster import storage\n", "raybooth.pipelines.caption")
    assert not violations("import torch\nfrom raybooth.errors import UserError\n", "raybooth.models.loaders")


# Processes that start often import only what they use: the ingress replica (one per app, restarted by every
# redeploy) answers HTTP and never runs a model, and a VLM replica never draws an image.
LIGHT_IMPORTS = {
    "raybooth.serving.ingress": ("diffusers", "xgrammar"),
    "raybooth.serving.chat_deployment": ("diffusers", "mlflow"),
    "raybooth.pipelines.inference": ("diffusers", "mlflow"),
}


@pytest.mark.parametrize("module", sorted(LIGHT_IMPORTS))
def test_often_started_processes_import_no_heavy_library_they_do_not_use(module):
    import subprocess
    import sys

    heavy = LIGHT_IMPORTS[module]
    code = f"import sys, {module}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"importing {module} loads {out.stdout.strip()}"
