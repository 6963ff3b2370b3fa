"""Loading job configs: YAML file, then `key.sub=value` overrides (list items by index), then validation.

    from raybooth.cluster.config import DreamBoothConfig, load_config
    load_config(DreamBoothConfig, "configs/dreambooth.yaml", ["concepts.0.instance_data=photos/", "steps=2"])

Unknown keys and bad values are `ConfigError`s that name the key and the file they came from.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from raybooth.cluster.config.base import DemoConfig, JobConfig, T
from raybooth.cluster.config.dreambooth import DreamBoothConfig, FleetConfig
from raybooth.cluster.config.inference import BatchConfig, CaptionConfig
from raybooth.cluster.config.serve import ServeConfig
from raybooth.errors import ConfigError

CONFIG_KINDS: dict[str, type[JobConfig]] = {
    "demo": DemoConfig,
    "caption": CaptionConfig,
    "batch": BatchConfig,
    "dreambooth": DreamBoothConfig,
    "fleet": FleetConfig,
    "serve": ServeConfig,
}


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> `{"a": {"b": 1}, "c": "x"}`; values are parsed as YAML scalars/lists.

    A number in the key indexes a list: `concepts.0.class_name=cat` -> `{"concepts": {"0": {...}}}`,
    which `deep_merge` sets into item 0 of the YAML's `concepts`."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"override {pair!r} is not key=value (example: steps=100 or tracking.experiment=dogs)"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: value {raw!r} is not valid YAML: {e}") from e
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {key}: {part} was already set to a value, cannot set a sub-key")
            node = child
        node[parts[-1]] = value
    return tree


def deep_merge(base: dict[str, Any], extra: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Merge `extra` into a copy of `base`; dicts merge key by key, anything else replaces.

    A dict of index keys (`{"0": {...}}`, from `concepts.0.instance_data=x`) merged onto a list sets into
    that item; the index one past the end appends an item; further past is a ConfigError naming the key.
    """
    out = dict(base)
    for key, value in extra.items():
        here = f"{where}{key}"
        current = out.get(key)
        if (
            isinstance(value, dict)
            and _is_index_tree(value)
            and (current is None or isinstance(current, list))
        ):
            out[key] = _merge_into_list(list(current or []), value, here)
        elif isinstance(value, dict) and (current is None or isinstance(current, dict)):
            out[key] = deep_merge(current or {}, value, f"{here}.")  # index trees deeper down become lists
        else:
            out[key] = value
    return out


def _is_index_tree(node: dict[Any, Any]) -> bool:
    return bool(node) and all(isinstance(k, int) or (isinstance(k, str) and k.isdigit()) for k in node)


def _merge_into_list(items: list[Any], indexed: dict[Any, Any], where: str) -> list[Any]:
    for index in sorted(indexed, key=int):
        i, value = int(index), indexed[index]
        if i > len(items):
            raise ConfigError(
                f"override {where}.{i}: {where} has {len(items)} item(s), so the index can be at most "
                f"{len(items)} (which appends one); use {where}.{len(items)}"
            )
        if i == len(items):
            items.append(deep_merge({}, value, f"{where}.{i}.") if isinstance(value, dict) else value)
        elif isinstance(value, dict) and isinstance(items[i], dict):
            items[i] = deep_merge(items[i], value, f"{where}.{i}.")
        else:
            items[i] = value
    return items


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file (and line, when YAML knows it)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist (pass an existing YAML, e.g. one under configs/)")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {p}{where} is not valid YAML: {getattr(e, 'problem', e)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of keys, not a {type(data).__name__}")
    return data


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: `source: key a.b: message (got value)`."""
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<top level>"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; README lists every key)"
        got = item.get("input")
        shown = (
            ""
            if item["type"] in ("extra_forbidden", "missing") or isinstance(got, dict)
            else f" (got {got!r})"
        )
        lines.append(f"{source}: key {key}: {msg}{shown}")
    return "; ".join(lines)


def build_config(cls: type[T], data: dict[str, Any], source: str) -> T:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from e


def config_kind_for(path: str | os.PathLike[str], data: dict[str, Any]) -> str:
    """Which schema a YAML uses: its `kind:` key, else its file stem (`caption.yaml` -> `caption`)."""
    kind = data.get("kind") or Path(path).stem
    if kind not in CONFIG_KINDS:
        raise ConfigError(
            f"config file {path}: no job schema named {kind!r}; set `kind:` to one of {sorted(CONFIG_KINDS)}"
        )
    return kind


def config_data(
    path: str | os.PathLike[str] | None, overrides: list[str] | None = None
) -> tuple[dict[str, Any], str]:
    """The YAML tree of `path` (optional) with `key=value` overrides merged in, and a source for errors."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        data = read_yaml(path)
        data.pop("kind", None)
        source = str(path)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
        source = f"{source} + command line" if path is not None else "command line"
    return data, source


def load_config(
    cls: type[T], path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None
) -> T:
    """Load `path` (optional) into `cls`, then apply `key=value` overrides; errors name the key."""
    return build_config(cls, *config_data(path, overrides))


def load_any_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> JobConfig:
    """Load a YAML under the schema its `kind:`/file name says, then apply `key=value` overrides; used by
    `raybooth config`, the every-YAML test and doctor."""
    kind = config_kind_for(path, read_yaml(path))
    return build_config(CONFIG_KINDS[kind], *config_data(path, overrides))
