"""`raybooth fleet`: many DreamBooth subjects as independent trainings that share one Ray cluster.

    raybooth fleet --manifest configs/fleet.yaml [max_concurrent=4]

Each subject's config is the manifest's `base` YAML, then its `defaults`, then the subject's own
`overrides`, with `model_name: <model_prefix>-<name>` and the manifest's cluster/storage/tracking.
Every training runs as its own Ray task (zero CPUs itself: the TorchTrainer it launches reserves the
workers' resources), at most `max_concurrent` at a time. A subject that fails, before or during
training, is reported in the summary table and never stops the others; the command exits 1 if any failed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from raybooth.cluster import tracking
from raybooth.cluster.config import (
    DreamBoothConfig,
    FleetConfig,
    build_config,
    deep_merge,
    load_config,
    read_yaml,
)
from raybooth.errors import ConfigError, TrackingError, UserError


@dataclass
class SubjectOutcome:
    name: str
    ok: bool
    model_uri: str | None = None
    run_id: str | None = None
    loss: float | None = None
    seconds: float = 0.0
    error: str | None = None


def _base_path(fleet: FleetConfig, manifest: str | None) -> Path | None:
    """`base:` as written: relative to the current folder, else to the manifest's folder."""
    if not fleet.base:
        return None
    path = Path(fleet.base)
    if not path.is_absolute() and not path.exists() and manifest:
        beside = Path(manifest).parent / path
        if beside.exists():
            return beside
    return path


def subject_configs(fleet: FleetConfig, manifest: str | None) -> list[tuple[str, DreamBoothConfig | str]]:
    """(name, config) per subject, or (name, error message) when that subject's config does not validate."""
    base_file = _base_path(fleet, manifest)
    base = read_yaml(base_file) if base_file else {}
    base.pop("kind", None)
    # Only what the manifest sets: a section it leaves out keeps the base YAML's values.
    shared = {
        k: getattr(fleet, k).model_dump(mode="json", exclude_unset=True)
        for k in ("cluster", "storage", "tracking")
    }
    out: list[tuple[str, DreamBoothConfig | str]] = []
    for subject in fleet.subjects:
        data = deep_merge(deep_merge(deep_merge(base, fleet.defaults), subject.overrides), shared)
        data["model_name"] = f"{fleet.model_prefix}-{subject.name}"
        data.setdefault("run_name", subject.name)
        try:
            out.append(
                (
                    subject.name,
                    build_config(DreamBoothConfig, data, f"{manifest or 'fleet'} subject {subject.name}"),
                )
            )
        except ConfigError as e:
            out.append((subject.name, str(e)))
    return out


def train_subject(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """One subject's whole training; runs inside a Ray task and never raises (the outcome says it all)."""
    from raybooth.pipelines.train import launch_training

    started = time.time()
    try:
        result = launch_training(DreamBoothConfig.model_validate(config))
    except UserError as e:
        return asdict(SubjectOutcome(name, False, seconds=time.time() - started, error=str(e)))
    except Exception as e:  # a crash in one subject is that subject's failure, not the fleet's
        first_line = (str(e).strip().splitlines() or [""])[0]
        return asdict(
            SubjectOutcome(
                name, False, seconds=time.time() - started, error=f"{type(e).__name__}: {first_line}"
            )
        )
    return asdict(
        SubjectOutcome(name, True, result.model_uri, result.run_id, result.loss, time.time() - started)
    )


def run_subjects(fleet: FleetConfig, manifest: str | None = None) -> list[SubjectOutcome]:
    """Train every subject, `max_concurrent` at a time, as Ray tasks; Ray must be initialised."""
    import ray

    # max_retries=0: a training that fails is reported, not started over from scratch (Ray Train already
    # restarts crashed workers from their last checkpoint inside the task).
    remote = ray.remote(num_cpus=0, max_retries=0)(train_subject)
    outcomes: dict[str, SubjectOutcome] = {}
    queue: list[tuple[str, DreamBoothConfig]] = []
    for name, cfg in subject_configs(fleet, manifest):
        if isinstance(cfg, str):
            outcomes[name] = SubjectOutcome(name, False, error=cfg)
        else:
            queue.append((name, cfg))

    # Fail fast, before any training starts, on a tracking store that does not answer (configure also
    # creates a fresh sqlite store's tables once, so trainings starting together do not race on them).
    for uri in {tracking.configure(cfg.tracking) for _, cfg in queue}:
        ok, message = tracking.check_tracking(uri)
        if not ok:
            raise TrackingError(message)

    running: dict[Any, str] = {}
    while queue or running:
        while queue and len(running) < fleet.max_concurrent:
            name, cfg = queue.pop(0)
            running[remote.remote(name, cfg.model_dump(mode="json"))] = name
            print(f"fleet: started {name}", flush=True)
        done, _ = ray.wait(list(running), num_returns=1)
        for ref in done:
            name = running.pop(ref)
            try:
                outcome = SubjectOutcome(**ray.get(ref))
            except Exception as e:  # the task's process itself died
                outcome = SubjectOutcome(name, False, error=f"{type(e).__name__}: {e}")
            outcomes[name] = outcome
            print(
                f"fleet: {name} {'registered ' + (outcome.model_uri or '') if outcome.ok else 'FAILED'}",
                flush=True,
            )
    return [outcomes[s.name] for s in fleet.subjects]


def summary_table(outcomes: list[SubjectOutcome]) -> str:
    """A fixed-width table: one line per subject, the error message for the failed ones."""
    rows = [("subject", "status", "model", "loss", "time", "detail")]
    for o in outcomes:
        rows.append(
            (
                o.name,
                "ok" if o.ok else "FAILED",
                o.model_uri or "-",
                f"{o.loss:.4f}" if o.loss is not None else "-",
                f"{o.seconds:.0f}s",
                f"run {o.run_id}" if o.ok else (o.error or ""),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:5], widths, strict=True)) + "  " + r[5] for r in rows]
    ok = sum(o.ok for o in outcomes)
    return "\n".join([*lines, f"{ok}/{len(outcomes)} subjects registered"])


def run_fleet(manifest: str, overrides: list[str], verbose: bool = False) -> int:
    """CLI entry: load the manifest, train every subject on the cluster, print the summary table."""
    from raybooth.cluster.runtime import ray_session

    fleet = load_config(FleetConfig, manifest, overrides)
    if not fleet.subjects:
        raise UserError(f"{manifest}: no subjects; list them under `subjects:` (name + overrides)")
    with ray_session(fleet.cluster, verbose=verbose):
        outcomes = run_subjects(fleet, manifest)
    print(summary_table(outcomes))
    return 0 if all(o.ok for o in outcomes) else 1
