"""The work dir: where embedded defaults live (storage, MLflow store, built model presets).

`RAYBOOTH_HOME` moves it; by default it is `.raybooth/` under the current directory, so a clone of
the repo keeps everything it makes in one ignored folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def work_dir() -> Path:
    """The root of every embedded default, created on first use."""
    root = Path(os.environ.get("RAYBOOTH_HOME", ".raybooth")).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def default_storage_root() -> str:
    return str(work_dir() / "storage")


def default_models_dir() -> Path:
    """Where tiny presets are built once and then loaded with from_pretrained."""
    return work_dir() / "models"


def default_mlflow_dir() -> Path:
    return work_dir() / "mlflow"
