"""Typed config: YAML + key=value overrides, errors that name the key, and every YAML in the repo loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raybooth.cluster.config import (
    CONFIG_KINDS,
    DreamBoothConfig,
    load_any_config,
    load_config,
    parse_overrides,
)
from raybooth.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_overrides_nest_and_parse_yaml_scalars():
    tree = parse_overrides(["steps=50", "tracking.experiment=dogs", "validation_prompts=[a, b]", "seed="])
    assert tree == {
        "steps": 50,
        "tracking": {"experiment": "dogs"},
        "validation_prompts": ["a", "b"],
        "seed": None,
    }


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["steps"])


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "db.yaml"
    path.write_text("steps: 5\nlearning_rate: 1.0e-4\ntracking:\n  experiment: a\n")
    cfg = load_config(DreamBoothConfig, path, ["steps=7", "tracking.experiment=b"])
    assert cfg.steps == 7 and cfg.learning_rate == 1e-4 and cfg.tracking.experiment == "b"


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("stepz: 5\n", [], "key stepz: unknown key"),
        ("steps: many\n", [], "key steps: Input should be a valid integer"),
        ("", ["tracking.experimnt=x"], "key tracking.experimnt: unknown key"),
        ("mixed_precision: fp8\n", [], "key mixed_precision"),
        ("steps: [1\n", [], "line 2 is not valid YAML"),
        ("- a\n- b\n", [], "must hold a mapping"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, overrides, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(DreamBoothConfig, path, overrides)
    assert str(path) in str(info.value) or "command line" in str(info.value)


def test_missing_config_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(DreamBoothConfig, tmp_path / "nope.yaml")


def test_unknown_kind_lists_the_known_ones(tmp_path):
    path = tmp_path / "whatever.yaml"
    path.write_text("kind: nonsense\n")
    with pytest.raises(ConfigError, match="no job schema named 'nonsense'"):
        load_any_config(path)


def repo_job_yamls() -> list[Path]:
    """configs/*.yaml plus any YAML under infra/ that declares a raybooth job with a top-level `kind:`."""
    found = sorted((REPO / "configs").glob("*.yaml"))
    for path in sorted((REPO / "infra").rglob("*.yaml")):
        docs = list(yaml.safe_load_all(path.read_text()))  # k8s manifests hold several documents
        data = docs[0] if len(docs) == 1 else None
        if isinstance(data, dict) and data.get("kind") in CONFIG_KINDS:
            found.append(path)
    return found


def test_configs_folder_covers_every_job():
    stems = {p.stem for p in (REPO / "configs").glob("*.yaml")}
    assert {"demo", "caption", "batch", "dreambooth", "fleet", "serve"} <= stems


@pytest.mark.parametrize("path", repo_job_yamls(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_repo_yaml_loads_against_its_schema(path):
    data = yaml.safe_load(path.read_text())
    expected = CONFIG_KINDS[data.get("kind") or path.stem]
    assert type(load_any_config(path)) is expected
