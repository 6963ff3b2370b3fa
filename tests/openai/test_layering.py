"""`raybooth/openai/` stays Ray-free and below serving/ and pipelines/, which both import it.

.venv/bin/python -m pytest tests/openai/test_layering.py
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "raybooth"
FORBIDDEN = ("ray", "raybooth.serving", "raybooth.pipelines", "fastapi", "starlette")


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_openai_package_imports_no_ray_serving_or_pipelines():
    files = sorted((PACKAGE / "openai").glob("*.py"))
    assert {f.name for f in files} >= {"protocol.py", "errors.py", "chat.py"}
    bad = {
        f"{f.name}: {name}"
        for f in files
        for name in imported_modules(f)
        if any(name == top or name.startswith(top + ".") for top in FORBIDDEN)
    }
    assert not bad, f"raybooth/openai must stay Ray-free and below serving/pipelines: {sorted(bad)}"


def test_models_do_not_reach_up_to_the_openai_surface():
    bad = {
        f"{f.name}: {name}"
        for f in sorted((PACKAGE / "models").glob("*.py"))
        for name in imported_modules(f)
        if name == "raybooth.openai" or name.startswith("raybooth.openai.")
    }
    assert not bad, f"models/ is compute only; it must not import raybooth.openai: {sorted(bad)}"
