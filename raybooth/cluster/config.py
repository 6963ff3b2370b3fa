"""Typed config for every raybooth job.

Each job reads one YAML under `configs/` (e.g. `configs/caption.yaml`) into a pydantic model, then
applies `key.sub=value` overrides from the command line:

    raybooth train --config configs/dreambooth.yaml steps=20 tracking.experiment=dogs

Unknown keys and bad values are `ConfigError`s that name the key and the file they came from.
The sections shared by every job (`cluster`, `storage`, `tracking`) are defined once here; each job's
own schema lives next to it in this module so one test can load every YAML in the repo.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from raybooth.errors import ConfigError


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
    namespace: str = Field("raybooth", description="Ray namespace, so named actors of two projects never collide.")
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
    )


class TrackingSection(Strict):
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI. Empty: MLFLOW_TRACKING_URI, else a sqlite store under the work dir.",
    )
    registry_uri: str | None = Field(None, description="MLflow registry URI (default: the tracking URI).")
    experiment: str = Field("raybooth", description="MLflow experiment that runs are logged to.")


class JobConfig(Strict):
    """Every job config carries where to run, where to store and where to track."""

    cluster: ClusterSection = Field(default_factory=ClusterSection)
    storage: StorageSection = Field(default_factory=StorageSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)


class DemoConfig(JobConfig):
    """`raybooth demo`: the main job end to end on the embedded defaults."""

    images: int = Field(8, ge=1, le=1000, description="How many sample images the demo draws and captions.")
    seed: int = Field(0, description="Seed for the sample images and every model built on the way.")


T = TypeVar("T", bound=JobConfig)


# --------------------------------------------------------------------------------------------------
# Batch inference (Ray Data): captioning and OpenAI-format batch requests
# --------------------------------------------------------------------------------------------------


class InferenceJobConfig(JobConfig):
    input: str | None = Field(None, description="Input: folder, glob, parquet file/folder or s3:// prefix.")
    output: str | None = Field(None, description="Output folder/file, local or s3://.")
    model: str = Field("tiny-vlm", description="VLM: a preset name, a local path or a hub id.")
    batch_size: int = Field(8, ge=1, description="Max rows per model batch (the token budget caps it further).")
    max_batch_tokens: int = Field(
        8192, ge=16, description="Token budget per batch: rows are packed until their padded length reaches it."
    )
    replicas: str = Field("1:1", pattern=r"^\d+:\d+$", description="MIN:MAX model replicas (actor pool autoscaling).")
    num_gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per model replica (0 on CPU machines).")
    max_new_tokens: int = Field(32, ge=1, le=8192, description="Tokens to generate per row at most.")
    max_image_pixels: int = Field(
        25_000_000, ge=1, description="Images over this many pixels are refused (decompression-bomb guard)."
    )
    max_image_bytes: int = Field(32 * 1024 * 1024, ge=1, description="Image files over this size are refused.")
    seed: int = Field(0, description="Seed for sampling when a request does not give one.")


class CaptionConfig(InferenceJobConfig):
    """`raybooth caption`: one caption per image, written as parquet."""

    prompt: str = Field("Describe the image.", description="Instruction sent with every image.")
    image_column: str | None = Field(
        None, description="Parquet input: column with image bytes or paths (default: guessed: image, bytes, path)."
    )


class BatchConfig(InferenceJobConfig):
    """`raybooth batch`: OpenAI Batch API JSONL in, OpenAI batch output JSONL out."""

    max_tokens_cap: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")


# --------------------------------------------------------------------------------------------------
# DreamBooth (Ray Train) and fleets
# --------------------------------------------------------------------------------------------------


class ConceptConfig(Strict):
    instance_data: str = Field(..., description="Folder or s3:// prefix with 3-5 photos of the subject.")
    class_name: str = Field("dog", description="What the subject is, e.g. dog; fills {class} in prompts.")
    instance_prompt: str = Field(
        "a photo of sks {class}", description="Prompt for the subject's photos; must contain the identifier."
    )
    identifier: str = Field("sks", description="Rare token that will mean this subject.")
    class_prompt: str = Field("a photo of {class}", description="Prompt for prior-preservation class images.")
    num_class_images: int = Field(8, ge=0, description="Class images for prior preservation (0: none).")


class DreamBoothConfig(JobConfig):
    """`raybooth train`: fine-tune Stable Diffusion on one or more concepts."""

    base_model: str = Field("tiny-sd", description="Base Stable Diffusion: preset, local path or hub id.")
    concepts: list[ConceptConfig] = Field(default_factory=list, description="Subjects to learn (one or more).")
    with_prior_preservation: bool = Field(True, description="Add the class-image loss (the DreamBooth paper's).")
    prior_loss_weight: float = Field(1.0, ge=0, description="Weight of the class-half loss.")
    resolution: int = Field(32, ge=8, description="Training resolution in pixels; divisible by 8.")
    center_crop: bool = Field(True, description="Center crop (else random crop) after resizing.")
    random_flip: bool = Field(False, description="Randomly flip instance images horizontally.")
    steps: int = Field(20, ge=1, description="Optimizer steps.")
    learning_rate: float = Field(5e-6, gt=0, description="UNet learning rate.")
    text_encoder_lr: float | None = Field(
        None, description="Text encoder learning rate; null freezes the text encoder."
    )
    batch_size: int = Field(1, ge=1, description="Instance images per worker per step (class images match it).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    mixed_precision: str = Field("no", pattern="^(no|fp16|bf16)$", description="no | fp16 | bf16.")
    train_mode: str = Field("full", pattern="^(full|lora)$", description="full (UNet + text encoder) or lora.")
    lora_rank: int = Field(4, ge=1, description="LoRA rank (train_mode: lora).")
    lora_alpha: int = Field(4, ge=1, description="LoRA alpha (train_mode: lora).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in the UNet.")
    cache_latents: bool = Field(False, description="Encode images with the VAE once (speed; same results).")
    snr_gamma: float | None = Field(None, description="Min-SNR loss weighting gamma (null: off).")
    noise_offset: float = Field(0.0, ge=0, description="Noise offset (0: off).")
    checkpoint_every: int = Field(10, ge=1, description="Steps between checkpoints.")
    checkpoints_to_keep: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    validation_prompts: list[str] = Field(default_factory=list, description="Prompts sampled at validation.")
    validation_every: int = Field(0, ge=0, description="Steps between validation images (0: only at the end).")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks).")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker (0: CPU training).")
    max_failures: int = Field(2, ge=0, description="Worker failures Ray Train recovers from by itself.")
    seed: int = Field(0, description="Seed for weights, noise, data order and class images.")
    run_name: str | None = Field(None, description="Ray Train run name (default: derived from the model name).")
    model_name: str = Field("raybooth-subject", description="Registered MLflow model name.")
    resume: str | None = Field(None, description="MLflow run id or checkpoint URI to continue from.")


class FleetSubject(Strict):
    name: str = Field(..., description="Subject name; the registered model is <model_prefix>-<name>.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="DreamBooth keys for this subject.")


class FleetConfig(JobConfig):
    """`raybooth fleet`: N independent DreamBooth trainings sharing the cluster."""

    base: str | None = Field(None, description="DreamBooth YAML every subject starts from.")
    defaults: dict[str, Any] = Field(default_factory=dict, description="DreamBooth keys for every subject.")
    subjects: list[FleetSubject] = Field(default_factory=list, description="The subjects to train.")
    max_concurrent: int = Field(2, ge=1, description="Trainings that run at the same time.")
    model_prefix: str = Field("raybooth", description="Prefix of every registered model name.")


# --------------------------------------------------------------------------------------------------
# Serving (Ray Serve)
# --------------------------------------------------------------------------------------------------


class ServeConfig(JobConfig):
    """`raybooth serve`: the OpenAI-compatible HTTP app."""

    host: str = Field("127.0.0.1", description="Bind address; anything but loopback needs API keys.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    chat_model: str = Field("tiny-vlm", description="VLM for /v1/chat/completions: preset, path or hub id.")
    image_models: list[str] = Field(
        default_factory=list, description="Image models: registered names (name, name/version, name@alias) or paths."
    )
    api_keys_env: str = Field("RAYBOOTH_API_KEYS", description="Env var holding comma-separated API keys.")
    api_keys_file: str | None = Field(None, description="File with one API key per line.")


CONFIG_KINDS: dict[str, type[JobConfig]] = {
    "demo": DemoConfig,
    "caption": CaptionConfig,
    "batch": BatchConfig,
    "dreambooth": DreamBoothConfig,
    "fleet": FleetConfig,
    "serve": ServeConfig,
}


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=x"]` -> `{"a": {"b": 1}, "c": "x"}`; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {pair!r} is not key=value (example: steps=100 or tracking.experiment=dogs)")
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


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Merge `extra` into a copy of `base`; dicts merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


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
        shown = "" if item["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
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


def load_config(cls: type[T], path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None) -> T:
    """Load `path` (optional) into `cls`, then apply `key=value` overrides; errors name the key."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        data = read_yaml(path)
        data.pop("kind", None)
        source = str(path)
    if overrides:
        data = deep_merge(data, parse_overrides(overrides))
        source = f"{source} + command line" if path is not None else "command line"
    return build_config(cls, data, source)


def load_any_config(path: str | os.PathLike[str]) -> JobConfig:
    """Load a YAML under the schema its `kind:`/file name says; used by the every-YAML test and `submit`."""
    data = read_yaml(path)
    kind = config_kind_for(path, data)
    data.pop("kind", None)
    return build_config(CONFIG_KINDS[kind], data, str(path))
