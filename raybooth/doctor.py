"""`raybooth doctor`: what raybooth would use, and whether each part works.

    raybooth doctor [--config configs/caption.yaml] [tracking.tracking_uri=http://mlflow:5000]

Prints one line per check (Ray and its cluster resources, torch and its device, the storage root, the
MLflow tracking URI, the model presets) and exits 2 when any check fails, each failure with its fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raybooth.cluster.config import JobConfig, build_config, deep_merge, load_any_config, parse_overrides
from raybooth.cluster.workdir import default_models_dir


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def load_sections(config: str | None, overrides: list[str]) -> JobConfig:
    """Doctor only needs the shared sections; any job YAML (or none) provides them."""
    base = load_any_config(config).model_dump(include={"cluster", "storage", "tracking"}) if config else {}
    data = deep_merge(base, parse_overrides(overrides))
    return build_config(JobConfig, data, f"{config or 'defaults'} + command line")


def check_ray(cfg: JobConfig, verbose: bool) -> Check:
    from raybooth.cluster.runtime import ray_session
    from raybooth.errors import UserError

    try:
        with ray_session(cfg.cluster, verbose=verbose) as info:
            where = "embedded local Ray" if info.embedded else f"cluster at {info.address}"
            return Check(
                "ray",
                True,
                f"Ray {info.ray_version}, {where}: {info.nodes} node(s), {info.cpus:g} CPU(s), {info.gpus:g} GPU(s)",
            )
    except UserError as e:
        return Check("ray", False, str(e))


def check_torch() -> Check:
    import torch

    from raybooth.models.device import pick_device

    device = pick_device("auto")
    extra = f" ({torch.cuda.get_device_name(0)})" if device.type == "cuda" else ""
    return Check("torch", True, f"torch {torch.__version__}, device {device}{extra}")


def check_storage(cfg: JobConfig) -> Check:
    from raybooth.cluster.storage import check_writable, storage_root

    root = storage_root(cfg.storage)
    ok, message = check_writable(root)
    return Check("storage", ok, f"{root}: {message}")


def check_mlflow(cfg: JobConfig) -> Check:
    from raybooth.cluster.tracking import check_tracking, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking)
    ok, message = check_tracking(uri)
    return Check("mlflow", ok, f"{uri}: {message}")


def check_presets(build: bool) -> Check:
    from raybooth.models.presets import build_preset, preset_status

    parts = []
    for status in preset_status(default_models_dir()):
        if build and not status["built"] and status["name"] != "sd15-arch":
            build_preset(status["name"], Path(status["path"]))
            status["built"] = True
        state = f"built at {status['path']}" if status["built"] else "not built (raybooth build-models)"
        parts.append(f"{status['name']} [{status['kind']}] {state}")
    return Check("models", True, "; ".join(parts))


def run_doctor(config: str | None, overrides: list[str], build: bool = False, verbose: bool = False) -> int:
    cfg = load_sections(config, overrides)
    checks = [
        check_ray(cfg, verbose),
        check_torch(),
        check_storage(cfg),
        check_mlflow(cfg),
        check_presets(build),
    ]
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{'ok ' if c.ok else 'BAD'} {c.name:<{width}}  {c.detail}")
    broken = [c.name for c in checks if not c.ok]
    if broken:
        print(f"raybooth doctor: {len(broken)} check(s) failed: {', '.join(broken)} (fix shown on each line)")
        return 2
    return 0
