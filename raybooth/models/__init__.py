"""Ray-free compute cores: building and loading Stable Diffusion and VLMs, devices and precision.

Nothing under `raybooth.models` imports Ray, so GPU benchmarks run this code on a bare machine, and
nothing imports `raybooth.cluster` either: paths (where presets are built) and filesystems come in as
arguments (tests/test_layers.py keeps it so).

    from pathlib import Path
    from raybooth.models import load_sd_pipeline, load_vlm
    models = Path(".raybooth/models")                   # where presets are built (the jobs' work dir)
    pipe = load_sd_pipeline("tiny-sd", models_dir=models)   # a preset, a local folder or a hub id
    model, processor = load_vlm("tiny-vlm", device="cpu", models_dir=models)

The names below are imported on first use (PEP 562): importing diffusers and transformers takes
seconds, and `raybooth doctor` or `from raybooth.models.presets import resolve_model` need neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from raybooth.models.quantization import quiet_torchao_import_noise

# diffusers and transformers import torchao whenever it is installed, and its import logs lines no user can
# act on; filtered before either is imported (stdlib only, so this stays cheap).
quiet_torchao_import_noise()

_EXPORTS: dict[str, str] = {
    # presets.py: names, building, resolving (stdlib only)
    "PRESETS": "presets",
    "Preset": "presets",
    "build_preset": "presets",
    "resolve_model": "presets",
    "preset_status": "presets",
    # loaders.py: from_pretrained for every kind of reference
    "SDComponents": "loaders",
    "load_sd_pipeline": "loaders",
    "load_sd_components": "loaders",
    "load_vlm": "loaders",
    # device.py: device choice and mixed-precision plans
    "PrecisionPlan": "device",
    "pick_device": "device",
    "resolve_precision": "device",
    "autocast": "device",
    "make_grad_scaler": "device",
}

__all__ = [
    "PRESETS",
    "PrecisionPlan",
    "Preset",
    "SDComponents",
    "autocast",
    "build_preset",
    "load_sd_components",
    "load_sd_pipeline",
    "load_vlm",
    "make_grad_scaler",
    "pick_device",
    "preset_status",
    "resolve_model",
    "resolve_precision",
]

if TYPE_CHECKING:
    from raybooth.models.device import (
        PrecisionPlan,
        autocast,
        make_grad_scaler,
        pick_device,
        resolve_precision,
    )
    from raybooth.models.loaders import SDComponents, load_sd_components, load_sd_pipeline, load_vlm
    from raybooth.models.presets import PRESETS, Preset, build_preset, preset_status, resolve_model


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value
