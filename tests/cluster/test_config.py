"""Typed config: YAML + key=value overrides, errors that name the key, and every YAML in the repo loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from raybooth.cluster.config import (
    CONFIG_KINDS,
    PATH_KINDS,
    BatchConfig,
    CaptionConfig,
    DreamBoothConfig,
    ServeConfig,
    field_path_kind,
    load_any_config,
    load_config,
    marked_paths,
    parse_overrides,
)
from raybooth.cluster.config.base import _model_in
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


# --------------------------------------------------------------------------------------------------
# List items by index in overrides
# --------------------------------------------------------------------------------------------------

TWO_CONCEPTS = "concepts:\n  - {instance_data: photos/rex, class_name: dog}\n  - {instance_data: photos/tom, class_name: cat}\n"


def test_an_index_in_an_override_sets_into_that_list_item(tmp_path):
    path = tmp_path / "db.yaml"
    path.write_text(TWO_CONCEPTS)
    cfg = load_config(
        DreamBoothConfig, path, ["concepts.1.instance_data=s3://b/tom", "concepts.0.identifier=zwx"]
    )
    assert [c.instance_data for c in cfg.concepts] == ["photos/rex", "s3://b/tom"]
    assert [c.class_name for c in cfg.concepts] == ["dog", "cat"]  # the rest of each item is the YAML's
    assert cfg.concepts[0].resolved_instance_prompt == "a photo of zwx dog"


def test_the_index_after_the_last_item_appends_one(tmp_path):
    path = tmp_path / "db.yaml"
    path.write_text(TWO_CONCEPTS)
    cfg = load_config(
        DreamBoothConfig, path, ["concepts.2.instance_data=photos/max", "concepts.2.class_name=cow"]
    )
    assert [(c.instance_data, c.class_name) for c in cfg.concepts][2] == ("photos/max", "cow")
    # no concepts in the YAML at all: index 0 creates the list
    assert (
        load_config(DreamBoothConfig, None, ["concepts.0.instance_data=p"]).concepts[0].instance_data == "p"
    )


def test_an_index_past_the_end_names_the_key_and_the_highest_index(tmp_path):
    path = tmp_path / "db.yaml"
    path.write_text(TWO_CONCEPTS)
    with pytest.raises(ConfigError, match=r"override concepts\.5: concepts has 2 item\(s\).*use concepts\.2"):
        load_config(DreamBoothConfig, path, ["concepts.5.instance_data=x"])


def test_index_overrides_reach_nested_lists_of_sections():
    cfg = load_config(
        ServeConfig, None, ["safety.categories.0.name=violence", "safety.categories.0.phrases=[gore]"]
    )
    assert cfg.safety.categories[0].name == "violence" and cfg.safety.categories[0].phrases == ["gore"]


# --------------------------------------------------------------------------------------------------
# Path marks: each path-valued field is marked once, in its schema
# --------------------------------------------------------------------------------------------------

# String fields whose description mentions a path but whose value is not one.
NOT_PATHS = {
    ("CaptionConfig", "image_column"),  # a parquet column name
    ("ServeConfig", "chat_model_name"),  # the model id clients send
}
PATH_WORDS = re.compile(r"path|s3://|folder|\buri\b|\bfile\b|hub id|yaml", re.IGNORECASE)


def all_schemas() -> list[type]:
    seen: list[type] = []

    def walk(cls: type) -> None:
        if cls in seen:
            return
        seen.append(cls)
        for info in cls.model_fields.values():
            sub = _model_in(info.annotation)
            if sub is not None:
                walk(sub)

    for cls in CONFIG_KINDS.values():
        walk(cls)
    return seen


def test_every_field_that_holds_a_path_is_marked_with_its_kind():
    unmarked = []
    for cls in all_schemas():
        for name, info in cls.model_fields.items():
            holds_text = "str" in str(info.annotation)
            path_like = PATH_WORDS.search(info.description or "") and (cls.__name__, name) not in NOT_PATHS
            if holds_text and path_like and field_path_kind(info) not in PATH_KINDS:
                unmarked.append(f"{cls.__name__}.{name}")
    assert not unmarked, f"path-valued fields without json_schema_extra=path_mark(...): {unmarked}"
    kinds = {
        f"{cls.__name__}.{n}": field_path_kind(i)
        for cls in all_schemas()
        for n, i in cls.model_fields.items()
    }
    assert kinds["StorageSection.root"] == "data" and kinds["ConceptConfig.instance_data"] == "data"
    assert (
        kinds["DreamBoothConfig.base_model"] == "model"
        and kinds["TrackingSection.tracking_uri"] == "tracking"
    )
    assert kinds["FleetConfig.base"] == "config" and kinds["ServeConfig.image_models"] == "model"


def test_marked_paths_walk_sections_and_list_items():
    cfg = load_config(
        DreamBoothConfig, None, ["concepts.0.instance_data=a", "concepts.1.instance_data=s3://b/c"]
    )
    found = {key: (kind, value) for key, kind, value in marked_paths(DreamBoothConfig, cfg.model_dump())}
    assert found["concepts.0.instance_data"] == ("data", "a")
    assert found["concepts.1.instance_data"] == ("data", "s3://b/c")
    assert found["base_model"] == ("model", "tiny-sd")
    assert "storage.root" not in found  # empty values are not paths
    serve = {key for key, _, _ in marked_paths(ServeConfig, {"image_models": ["x", "y"]})}
    assert serve == {"image_models.0", "image_models.1"}


def test_the_config_package_keeps_every_name_importable():
    import raybooth.cluster.config as config

    for name in config.__all__:
        assert getattr(config, name) is not None
    assert config.IngressSection.__module__ == "raybooth.cluster.config.serve"


@pytest.mark.parametrize("schema, file, prefix", [
    (BatchConfig, "batch.yaml", ""), (CaptionConfig, "caption.yaml", ""), (ServeConfig, "serve.yaml", "chat."),
])  # fmt: skip
def test_speculative_is_set_from_the_command_line_and_bounded(schema, file, prefix):
    overrides = [f"{prefix}speculative.draft_model=tiny-llm", f"{prefix}speculative.num_tokens=3"]
    cfg = load_config(schema, str(REPO / "configs" / file), overrides)
    section = cfg.chat if prefix else cfg
    assert (section.speculative.draft_model, section.speculative.num_tokens) == ("tiny-llm", 3)
    with pytest.raises(ConfigError, match="speculative.num_tokens"):
        load_config(
            schema, str(REPO / "configs" / file), [*overrides[:1], f"{prefix}speculative.num_tokens=0"]
        )
    with pytest.raises(ConfigError, match="draft_model"):
        load_config(schema, str(REPO / "configs" / file), [f"{prefix}speculative.num_tokens=2"])
