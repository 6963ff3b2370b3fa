"""Which paths in a job's config a cluster on other machines could not read, judged by the path marks
the config schemas put on their fields (`Field(json_schema_extra=path_mark("data"))`, config/base.py).

    from raybooth.cluster.config import DreamBoothConfig, load_config
    from raybooth.cluster.job_paths import local_path_problems
    cfg = load_config(DreamBoothConfig, "configs/dreambooth.yaml")
    local_path_problems(cfg)   # [("concepts.0.instance_data", "concepts.0.instance_data=examples/... is a path on this machine"), ...]

Kinds: `data` is local unless it has a URI scheme (s3://, gs://, ...); `model` is local only when it looks
like a filesystem path (preset names, hub ids and registry URIs are not); `tracking` is local for file and
sqlite stores and loopback servers; `config` files travel with the job's working dir and are not checked.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from raybooth.cluster.config import DreamBoothConfig, FleetConfig, JobConfig, marked_paths
from raybooth.cluster.job_api import LOOPBACK_NAMES

# Subcommands whose job writes checkpoints from several workers: they need storage every node shares.
NEEDS_SHARED_STORAGE = ("train", "fleet")


def is_machine_local(value: str, kind: str) -> bool:
    """Whether `value` names something only this machine can read. kind: data | model | tracking."""
    parts = urlsplit(value)
    scheme = parts.scheme.lower() if len(parts.scheme) > 1 else ""  # "C:" is a drive, not a scheme
    if kind == "tracking":
        if scheme in ("", "file", "sqlite"):
            return True
        host = (parts.hostname or "").lower()
        return scheme in ("http", "https") and (
            host in LOOPBACK_NAMES or (_is_ip(host) and ipaddress.ip_address(host).is_loopback)
        )
    if kind == "model":  # preset names, hub ids (org/name) and registry URIs are not paths
        if scheme:
            return scheme == "file"
        return value.startswith(("/", "./", "../", "~")) or Path(value).expanduser().exists()
    return scheme in ("", "file")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def local_path_problems(
    config: JobConfig,
    extra_configs: Mapping[str, dict[str, Any]] | None = None,
    *,
    shared_storage_needed: bool = False,
) -> list[tuple[str, str]]:
    """(key, note) for every marked path that names this machine's files, plus a missing shared storage root.

    `extra_configs` are DreamBooth YAML trees the job also reads, by key prefix (a fleet's `base`); a fleet's
    `defaults` and each subject's `overrides` are DreamBooth keys too and are judged as such."""
    trees: list[tuple[type, Any, str]] = [(type(config), config.model_dump(), "")]
    if isinstance(config, FleetConfig):
        trees.append((DreamBoothConfig, config.defaults, "defaults."))
        for i, subject in enumerate(config.subjects):
            trees.append((DreamBoothConfig, subject.overrides, f"subjects.{i}.overrides."))
    for name, tree in (extra_configs or {}).items():
        trees.append((DreamBoothConfig, tree, f"{name}."))
    problems: list[tuple[str, str]] = []
    shared_storage = False
    for schema, tree, prefix in trees:
        for key, kind, value in marked_paths(schema, tree, prefix):
            if kind == "config":
                continue
            if is_machine_local(value, kind):
                problems.append((key, f"{key}={value} is a path on this machine"))
            elif key.endswith("storage.root"):
                shared_storage = True
    if shared_storage_needed and not shared_storage:
        note = "storage.root is unset (checkpoints would stay on one node's disk; Ray Train needs shared storage)"
        problems.append(("storage.root", note))
    return problems
