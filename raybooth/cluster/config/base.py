"""Config basics every job schema stands on: the strict base model, path marks, and the shared sections.

    from raybooth.cluster.config.base import JobConfig, marked_paths
    list(marked_paths(JobConfig, {"storage": {"root": "s3://b/run"}}))   # [("storage.root", "data", "s3://b/run")]

A field whose value names a file, folder or server is marked once, where it is declared:
`Field(..., json_schema_extra=path_mark("data"))`. Kinds: `data` (read or written by the job: local folder
or s3://), `model` (a preset name, hub id, registry URI or local folder), `tracking` (an MLflow URI),
`config` (a YAML shipped with the job's working dir). `cluster/job_paths.py` and the CLI read the marks instead of
keeping their own lists of path keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

PathKind = Literal["data", "model", "tracking", "config"]
PATH_KINDS: tuple[str, ...] = ("data", "model", "tracking", "config")


def path_mark(kind: PathKind) -> dict[str, Any]:
    """The `json_schema_extra` of a path-valued field (shows as `"path": kind` in the JSON schema too)."""
    if kind not in PATH_KINDS:
        raise ValueError(f"path kind {kind!r} is not one of {PATH_KINDS}")
    return {"path": kind}


def field_path_kind(info: FieldInfo) -> str | None:
    """The path kind a field is marked with, or None when its value is not a path."""
    extra = info.json_schema_extra
    return extra.get("path") if isinstance(extra, dict) else None  # type: ignore[return-value]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config model inside a field's type (`Section`, `list[Section]`, `Section | None`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def marked_paths(schema: type[BaseModel], data: Any, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """(dotted key, path kind, value) for every non-empty string in a marked field of `data` (a dump or
    YAML tree read as `schema`), nested sections and list items included: `concepts.0.instance_data`,
    `image_models.1`. Keys the schema does not know are skipped (validation reports them)."""
    if not isinstance(data, dict):
        return
    for name, value in data.items():
        info = schema.model_fields.get(str(name))
        if info is None:
            continue
        key = f"{prefix}{name}"
        kind = field_path_kind(info)
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        sub = _model_in(info.annotation)
        for i, item in items:
            item_key = key if i is None else f"{key}.{i}"
            if kind is not None and isinstance(item, str) and item:
                yield item_key, kind, item
            elif sub is not None:
                yield from marked_paths(sub, item, f"{item_key}.")


class Strict(BaseModel):
    """Base for every config model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------------------------------
# Sections shared by every job
# --------------------------------------------------------------------------------------------------


class ClusterSection(Strict):
    address: str | None = Field(
        None,
        description="Ray address to connect to (`ray://host:10001`, `auto`, `host:6379`). Empty: the "
        "RAY_ADDRESS environment variable, else an embedded local Ray started for this job.",
    )
    num_cpus: int | None = Field(
        None, ge=1, description="Embedded Ray only: logical CPUs to offer (default: the machine's cores)."
    )
    num_gpus: int | None = Field(
        None, ge=0, description="Embedded Ray only: GPUs to offer (default: those torch can see)."
    )
    namespace: str = Field(
        "raybooth", description="Ray namespace, so named actors of two projects never collide."
    )
    ship_project: bool = Field(
        True,
        description="On a remote cluster, upload this checkout of raybooth to the workers via runtime_env "
        "py_modules (turn off when the cluster image already has the same version installed).",
    )


class StorageSection(Strict):
    root: str | None = Field(
        None,
        description="Where jobs write data and checkpoints: a local folder or `s3://bucket/prefix`. "
        "Empty: `<work dir>/storage`. A multi-node cluster needs s3:// (or a shared NFS path).",
        json_schema_extra=path_mark("data"),
    )


class TrackingSection(Strict):
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI. Empty: MLFLOW_TRACKING_URI, else a sqlite store under the work dir.",
        json_schema_extra=path_mark("tracking"),
    )
    registry_uri: str | None = Field(
        None,
        description="MLflow registry URI (default: the tracking URI).",
        json_schema_extra=path_mark("tracking"),
    )
    experiment: str = Field("raybooth", description="MLflow experiment that runs are logged to.")


class SpeculativeSection(Strict):
    """Speculative decoding (`models/speculative.py`): a small draft model proposes `num_tokens` tokens per
    row, the served model checks them in one forward pass; greedy output is unchanged, sampled output keeps
    the served model's distribution. The draft must share the served model's tokenizer."""

    draft_model: str = Field(
        description="Draft causal LM: a preset name, a local path or a hub id, with the served model's tokenizer.",
        json_schema_extra=path_mark("model"),
    )
    num_tokens: int = Field(4, ge=1, le=16, description="Tokens the draft proposes per row per step (k).")


class EngineOptions(Strict):
    """How the generation engine loads and decodes: the same keys in the batch jobs and the chat route."""

    quantization: Literal["int8"] | None = Field(
        None,
        description="int8: the model's linear weights stored in int8 with per-channel scales (torchao, "
        "weight-only; about a quarter of their fp32 memory, on CPU and CUDA); empty: weights as loaded.",
    )
    speculative: SpeculativeSection | None = Field(
        None, description="Speculative decoding: {draft_model, num_tokens}; empty: off."
    )


class JobConfig(Strict):
    """Every job config carries where to run, where to store and where to track."""

    cluster: ClusterSection = Field(default_factory=ClusterSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)


class DemoConfig(JobConfig):
    """`raybooth demo`: the main job end to end on the embedded defaults."""

    images: int = Field(8, ge=1, le=1000, description="How many sample images the demo draws and captions.")
    seed: int = Field(0, description="Seed for the sample images and every model built on the way.")
    base_model: str = Field(
        "tiny-sd",
        description="Diffusion model the demo subject is trained on and served from: tiny-sd, tiny-sdxl, "
        "tiny-sd3, tiny-flux, or a folder / hub id of one of those families.",
        json_schema_extra=path_mark("model"),
    )


T = TypeVar("T", bound=JobConfig)
