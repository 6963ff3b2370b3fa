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
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
    """What `raybooth caption` and `raybooth batch` share: input/output, model, packing and replicas."""

    input: str | None = Field(None, description="Input: folder, glob, parquet file/folder or s3:// prefix.")
    output: str | None = Field(None, description="Output folder/file, local or s3://.")
    model: str = Field("tiny-vlm", description="VLM: a preset name, a local path or a hub id.")
    device: str = Field(
        "auto", description="Device of each replica: auto (CUDA when the replica has a GPU), cpu, cuda."
    )
    dtype: str | None = Field(
        None, description="Weights dtype (fp32, fp16, bf16); empty: the checkpoint's own."
    )
    batch_size: int = Field(
        8, ge=1, description="Max rows per model batch (the token budget caps it further)."
    )
    max_batch_tokens: int = Field(
        8192,
        ge=16,
        description="Token budget per batch: rows are packed until their padded length reaches it.",
    )
    packing: Literal["token_budget", "fifo"] = Field(
        "token_budget",
        description="token_budget: sort rows by image count and length and cut batches by the budget; "
        "fifo: arrival order, batch_size rows (the baseline, for comparison).",
    )
    pack_window: int = Field(
        64,
        ge=1,
        description="Rows a replica receives per call and packs into batches; larger packs tighter but holds "
        "more decoded rows in memory.",
    )
    replicas: str = Field(
        "1:1", pattern=r"^\d+:\d+$", description="MIN:MAX model replicas (actor pool autoscaling)."
    )
    num_gpus_per_replica: float = Field(0.0, ge=0, description="GPUs per model replica (0 on CPU machines).")
    num_cpus_per_replica: float = Field(1.0, gt=0, description="CPUs reserved per model replica.")
    max_prepare_tasks: int | None = Field(
        None,
        ge=1,
        description="CPU tasks decoding and tokenizing at once at most (each worker process loads the "
        "processor once); empty: as many as there are free CPUs.",
    )
    max_new_tokens: int = Field(32, ge=1, le=8192, description="Tokens to generate per row at most.")
    max_image_pixels: int = Field(
        25_000_000, ge=1, description="Images over this many pixels are refused (decompression-bomb guard)."
    )
    max_image_bytes: int = Field(
        32 * 1024 * 1024, ge=1, description="Image files over this size are refused."
    )
    seed: int = Field(0, description="Seed for sampling when a request does not give one.")
    limit: int | None = Field(
        None,
        ge=1,
        description="Process at most this many not-yet-done rows, then stop (a trial; rerun for the rest).",
    )

    @field_validator("replicas")
    @classmethod
    def _replicas_ordered(cls, value: str) -> str:
        low, high = (int(v) for v in value.split(":"))
        if low < 1 or high < low:
            raise ValueError(f"replicas {value!r} must be MIN:MAX with 1 <= MIN <= MAX, e.g. 1:4")
        return value

    def replica_range(self) -> tuple[int, int]:
        low, high = (int(v) for v in self.replicas.split(":"))
        return low, high


class CaptionConfig(InferenceJobConfig):
    """`raybooth caption`: one caption per image, written as parquet."""

    prompt: str = Field("Describe the image.", description="Instruction sent with every image.")
    temperature: float = Field(
        0.0,
        ge=0.0,
        le=2.0,
        description="Sampling temperature; 0 is greedy, so a rerun gives the same captions.",
    )
    image_column: str | None = Field(
        None,
        description="Parquet input: column with image bytes or paths (default: guessed: image, bytes, path).",
    )


class BatchConfig(InferenceJobConfig):
    """`raybooth batch`: OpenAI Batch API JSONL in, OpenAI batch output JSONL out."""

    max_new_tokens: int = Field(64, ge=1, le=8192, description="max_tokens of a request that gives none.")
    max_tokens_cap: int = Field(1024, ge=1, description="Largest max_tokens a request may ask for.")


# --------------------------------------------------------------------------------------------------
# DreamBooth (Ray Train) and fleets
# --------------------------------------------------------------------------------------------------


class ConceptConfig(Strict):
    """One subject to learn: its photos, the prompts that name it, and its class for prior preservation."""

    instance_data: str = Field(..., description="Folder or s3:// prefix with 3-5 photos of the subject.")
    class_name: str = Field("dog", description="What the subject is, e.g. dog; fills {class} in prompts.")
    instance_prompt: str = Field(
        "a photo of sks {class}",
        description="Prompt for the subject's photos; must contain the identifier (`{identifier}` may stand for it).",
    )
    identifier: str = Field(
        "sks", pattern=r"^\S+$", description="Rare token that will mean this subject (one word, no spaces)."
    )
    class_prompt: str = Field("a photo of {class}", description="Prompt for prior-preservation class images.")
    num_class_images: int = Field(8, ge=0, description="Class images for prior preservation (0: none).")

    def render(self, template: str) -> str:
        return template.replace("{class}", self.class_name).replace("{identifier}", self.identifier)

    @property
    def resolved_instance_prompt(self) -> str:
        return self.render(self.instance_prompt)

    @property
    def resolved_class_prompt(self) -> str:
        return self.render(self.class_prompt)

    @model_validator(mode="after")
    def _prompt_names_the_subject(self) -> ConceptConfig:
        prompt = self.resolved_instance_prompt
        if self.identifier not in re.findall(r"[^\s,.;:!?]+", prompt):
            raise ValueError(
                f"instance_prompt {prompt!r} does not contain the identifier {self.identifier!r}; write it as a "
                f"word in the prompt, e.g. 'a photo of {self.identifier} {self.class_name}'"
            )
        return self


class DreamBoothConfig(JobConfig):
    """`raybooth train`: fine-tune Stable Diffusion on one or more concepts."""

    base_model: str = Field("tiny-sd", description="Base Stable Diffusion: preset, local path or hub id.")
    concepts: list[ConceptConfig] = Field(
        default_factory=list, description="Subjects to learn (one or more)."
    )
    with_prior_preservation: bool = Field(
        True, description="Add the class-image loss (the DreamBooth paper's)."
    )
    prior_loss_weight: float = Field(1.0, ge=0, description="Weight of the class-half loss.")
    resolution: int = Field(32, ge=8, description="Training resolution in pixels; divisible by 8.")
    center_crop: bool = Field(True, description="Center crop (else random crop) after resizing.")
    random_flip: bool = Field(False, description="Randomly flip instance images horizontally.")
    steps: int = Field(20, ge=1, description="Optimizer steps (in total, also when resuming).")
    learning_rate: float = Field(5e-6, gt=0, description="UNet learning rate.")
    text_encoder_lr: float | None = Field(
        None, gt=0, description="Text encoder learning rate; null freezes the text encoder."
    )
    lr_warmup_steps: int = Field(0, ge=0, description="Steps of linear learning-rate warm-up, then constant.")
    adam_weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay (diffusers' default).")
    batch_size: int = Field(
        1, ge=1, description="Instance images per worker per step (class images match it)."
    )
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    mixed_precision: str = Field("no", pattern="^(no|fp16|bf16)$", description="no | fp16 | bf16.")
    train_mode: str = Field(
        "full", pattern="^(full|lora)$", description="full (UNet + text encoder) or lora."
    )
    lora_rank: int = Field(4, ge=1, description="LoRA rank (train_mode: lora).")
    lora_alpha: int = Field(4, ge=1, description="LoRA alpha (train_mode: lora).")
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory in the UNet.")
    cache_latents: bool = Field(
        False,
        description="Encode images with the VAE once, and prompts once when the text encoder is frozen "
        "(speed; the same results up to float rounding). Needs center_crop.",
    )
    snr_gamma: float | None = Field(None, gt=0, description="Min-SNR loss weighting gamma (null: off).")
    noise_offset: float = Field(0.0, ge=0, description="Noise offset (0: off).")
    sample_steps: int = Field(25, ge=1, description="Denoising steps for class images and validation images.")
    sample_guidance_scale: float = Field(
        7.5, ge=0, description="Guidance scale for class and validation images."
    )
    checkpoint_every: int = Field(10, ge=1, description="Steps between checkpoints.")
    checkpoints_to_keep: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    log_checkpoints_to_mlflow: bool = Field(
        True,
        description="Also upload each checkpoint to the MLflow run's artifacts (off: only its URI is logged).",
    )
    validation_prompts: list[str] = Field(default_factory=list, description="Prompts sampled at validation.")
    validation_every: int = Field(
        0, ge=0, description="Steps between validation images (0: only at the end)."
    )
    export_fp16: bool = Field(
        True, description="Save the final model in fp16 (half the size; what serving loads)."
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers (DDP ranks).")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs per worker (0: CPU training).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    max_failures: int = Field(2, ge=0, description="Worker failures Ray Train recovers from by itself.")
    seed: int = Field(0, description="Seed for weights, noise, data order and class images.")
    run_name: str | None = Field(None, description="MLflow run name (default: the model name).")
    model_name: str = Field(
        "raybooth-subject",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Registered MLflow model name.",
    )
    resume: str | None = Field(None, description="MLflow run id or checkpoint URI to continue from.")

    @property
    def train_text_encoder(self) -> bool:
        return self.text_encoder_lr is not None

    @model_validator(mode="after")
    def _consistent(self) -> DreamBoothConfig:
        if self.resolution % 8:
            lower = self.resolution - self.resolution % 8
            raise ValueError(
                f"resolution {self.resolution} is not divisible by 8 (the VAE downsamples by 8); use {lower} or {lower + 8}"
            )
        if self.cache_latents and not self.center_crop:
            raise ValueError(
                "cache_latents needs center_crop: true (random crops change every step); set one of them"
            )
        if self.with_prior_preservation:
            for i, concept in enumerate(self.concepts):
                if concept.num_class_images < 1:
                    raise ValueError(
                        f"concepts.{i}.num_class_images is 0 but with_prior_preservation is true; "
                        "ask for class images (e.g. 100) or set with_prior_preservation: false"
                    )
        return self


class FleetSubject(Strict):
    name: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Subject name; the registered model is <model_prefix>-<name>.",
    )
    overrides: dict[str, Any] = Field(default_factory=dict, description="DreamBooth keys for this subject.")


class FleetConfig(JobConfig):
    """`raybooth fleet`: N independent DreamBooth trainings sharing the cluster."""

    base: str | None = Field(None, description="DreamBooth YAML every subject starts from.")
    defaults: dict[str, Any] = Field(default_factory=dict, description="DreamBooth keys for every subject.")
    subjects: list[FleetSubject] = Field(default_factory=list, description="The subjects to train.")
    max_concurrent: int = Field(2, ge=1, description="Trainings that run at the same time.")
    model_prefix: str = Field("raybooth", description="Prefix of every registered model name.")

    @model_validator(mode="after")
    def _unique_names(self) -> FleetConfig:
        names = [s.name for s in self.subjects]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"subject names must be unique (each is a registered model); repeated: {dupes}")
        return self


# --------------------------------------------------------------------------------------------------
# Serving (Ray Serve)
# --------------------------------------------------------------------------------------------------


class AutoscalingSection(Strict):
    """Ray Serve `autoscaling_config` for one deployment (replicas follow the ongoing requests)."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle (0 lets Serve scale to zero).")
    max_replicas: int = Field(
        1, ge=1, description="Upper bound; each replica holds its own copy of the model."
    )
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at start (default: min_replicas).")
    target_ongoing_requests: float = Field(
        2.0,
        gt=0,
        description="Ongoing requests per replica Serve aims for; batching deployments want ~max_batch_size.",
    )
    upscale_delay_s: float = Field(
        30.0, ge=0, description="How long load must stay high before adding a replica."
    )
    downscale_delay_s: float = Field(
        600.0, ge=0, description="How long load must stay low before removing one."
    )

    @model_validator(mode="after")
    def _min_le_max(self) -> AutoscalingSection:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas}); raise max_replicas"
            )
        return self

    def to_serve(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class DeploymentSection(Strict):
    """Resources and queueing of one Serve deployment (the Serve YAML may override them)."""

    num_cpus: float = Field(
        0.5,
        ge=0,
        description="Logical CPUs Ray reserves per replica (placement only: torch's threads are not capped "
        "by it); 0.5 lets ingress + image + chat fit a 2-core laptop's embedded Ray.",
    )
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (0 on CPU machines).")
    max_ongoing_requests: int = Field(16, ge=1, description="Requests a replica works on at once.")
    max_queued_requests: int = Field(
        64,
        ge=-1,
        description="Requests a caller queues for this deployment before answering 503 (-1: unbounded).",
    )
    autoscaling: AutoscalingSection = Field(default_factory=AutoscalingSection)


class BatchingMixin(Strict):
    max_batch_size: int = Field(8, ge=1, description="Most requests `@serve.batch` puts in one model batch.")
    batch_wait_timeout_s: float = Field(
        0.05,
        ge=0,
        description="How long the first request of a batch waits for company (latency vs throughput).",
    )
    max_concurrent_batches: int = Field(1, ge=1, description="Batches a replica runs at once.")

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> BatchingMixin:
        need = self.max_batch_size * self.max_concurrent_batches
        ongoing = getattr(self, "max_ongoing_requests", need)
        if ongoing < need:
            raise ValueError(
                f"max_ongoing_requests ({ongoing}) < max_batch_size * max_concurrent_batches ({need}): batches "
                f"could never fill; set max_ongoing_requests >= {need}"
            )
        return self


class ImageServeSection(DeploymentSection, BatchingMixin):
    """The text-to-image deployment (`ImageDeployment`)."""

    max_ongoing_requests: int = Field(16, ge=1, description="Requests a replica works on at once.")
    max_models_per_replica: int = Field(
        4,
        ge=1,
        description="Subjects a replica keeps loaded (`@serve.multiplexed`, least recently used evicted).",
    )
    registry_poll_s: float = Field(
        30.0, gt=0, description="How often a replica re-resolves its loaded models' aliases in MLflow."
    )
    lora_base_model: str = Field(
        "tiny-sd",
        description="Base model for LoRA subjects whose artifact does not name one (raybooth_lora.json).",
    )
    batch_invariant: bool = Field(
        True,
        description=(
            "Each image is byte-identical to its single-request result for the same seed, whatever it was "
            "batched with (per-row kernels, models/batch_invariance.py). false: faster batches whose images "
            "equal the single-request ones only up to float rounding."
        ),
    )
    device: str | None = Field(None, description="cpu | cuda | mps (default: the best one available).")
    dtype: str = Field("auto", pattern="^(auto|float32|float16|bfloat16)$", description="auto: fp16 on GPU.")
    default_steps: int = Field(25, ge=1, description="num_inference_steps when a request does not give one.")
    default_guidance_scale: float = Field(
        7.5, ge=0, description="guidance_scale when a request does not give one."
    )
    default_size: str = Field(
        "512x512", pattern=r"^\d+x\d+$", description="size when a request does not give one."
    )


class ChatServeSection(DeploymentSection, BatchingMixin):
    """The chat deployment (`ChatDeployment`)."""

    max_concurrent_batches: int = Field(
        2, ge=1, description="Batches decoding at once (a new batch need not wait)."
    )
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="How long a batch waits for more callers.")
    device: str | None = Field(None, description="cpu | cuda | mps (default: the best one available).")
    dtype: str = Field(
        "auto", pattern="^(auto|float32|float16|bfloat16)$", description="auto: bf16/fp16 on GPU."
    )
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request does not give one.")


class IngressSection(DeploymentSection):
    """The FastAPI ingress (`Ingress`): cheap, so many requests per replica."""

    num_cpus: float = Field(
        0.1, ge=0, description="CPUs per ingress replica (it only validates, routes and awaits)."
    )
    max_ongoing_requests: int = Field(256, ge=1, description="Requests one ingress replica holds at once.")
    max_queued_requests: int = Field(512, ge=-1, description="Queued at the proxy before it answers 503.")
    request_timeout_s: float = Field(300.0, gt=0, description="A request still running after this gets 504.")


class LimitsSection(Strict):
    """Request limits; a request over one gets a 4xx naming the limit."""

    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="Largest HTTP body (413 above).")
    max_image_bytes: int = Field(
        10 * 1024 * 1024, ge=1, description="Largest decoded image in a chat request."
    )
    max_image_pixels: int = Field(
        16_777_216,
        ge=1,
        description="Largest image (width*height) in a chat request; a decompression-bomb guard.",
    )
    max_images_per_request: int = Field(4, ge=0, description="image_url parts in one chat request.")
    max_messages: int = Field(64, ge=1, description="Messages in one chat request.")
    max_tokens: int = Field(
        1024, ge=1, description="Largest max_tokens (max_completion_tokens) a request may ask."
    )
    max_n: int = Field(4, ge=1, description="Largest n for images (and chat).")
    max_steps: int = Field(100, ge=1, description="Largest num_inference_steps.")
    max_image_side: int = Field(1024, ge=8, description="Largest width or height of a generated image.")
    max_prompt_chars: int = Field(4000, ge=1, description="Longest image prompt / negative prompt.")


class SafetyCategory(Strict):
    name: str = Field(
        ..., min_length=1, description="Category named in the block explanation, e.g. violence."
    )
    phrases: list[str] = Field(
        default_factory=list, description="Whole-word phrases, matched case-insensitively."
    )
    patterns: list[str] = Field(
        default_factory=list, description="Python regular expressions (case-insensitive)."
    )
    weight: float = Field(1.0, gt=0, description="Score each match adds to the category.")
    threshold: float | None = Field(
        None, gt=0, description="Score that blocks (default: the policy's threshold)."
    )
    applies_to: list[Literal["prompt", "output"]] = Field(
        default_factory=lambda: ["prompt", "output"],
        description="Check prompts (both routes), chat output, or both (e.g. a leak pattern only on output).",
    )

    @field_validator("patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"pattern {p!r} is not a valid regular expression: {e}") from e
        return patterns


class SafetySection(Strict):
    """Safety policy on prompts (both routes) and on chat output as it streams."""

    enabled: bool = Field(True, description="Turn the whole policy off (e.g. for a benchmark).")
    threshold: float = Field(1.0, gt=0, description="Default score at which a category blocks.")
    check_output: bool = Field(True, description="Also check chat output while it is generated.")
    stream_holdback_chars: int = Field(
        32,
        ge=0,
        description="Streamed text held back so a pattern split across tokens is caught before it is sent.",
    )
    categories: list[SafetyCategory] = Field(default_factory=list, description="The categories checked.")


class ServeConfig(JobConfig):
    """`raybooth serve`: the OpenAI-compatible HTTP app."""

    host: str = Field("127.0.0.1", description="Bind address; anything but loopback needs API keys.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    chat_model: str = Field("tiny-vlm", description="VLM for /v1/chat/completions: preset, path or hub id.")
    chat_model_name: str | None = Field(
        None, description="Model id clients send for chat (default: chat_model's last path part)."
    )
    image_models: list[str] = Field(
        default_factory=list,
        description="Image models: registered names (name, name/version, name@alias) or paths.",
    )
    serve_registry: bool = Field(
        True, description="Also serve (and list) every model in the MLflow registry, not only image_models."
    )
    api_keys_env: str = Field("RAYBOOTH_API_KEYS", description="Env var holding comma-separated API keys.")
    api_keys_file: str | None = Field(None, description="File with one API key per line.")
    ingress: IngressSection = Field(default_factory=IngressSection)
    image: ImageServeSection = Field(default_factory=ImageServeSection)
    chat: ChatServeSection = Field(default_factory=ChatServeSection)
    limits: LimitsSection = Field(default_factory=LimitsSection)
    safety: SafetySection = Field(default_factory=SafetySection)

    @model_validator(mode="after")
    def _n_fits_a_batch(self) -> ServeConfig:
        if self.limits.max_n > self.image.max_batch_size:
            raise ValueError(
                f"limits.max_n ({self.limits.max_n}) > image.max_batch_size ({self.image.max_batch_size}): a "
                "request's images always run in one batch; lower limits.max_n or raise image.max_batch_size"
            )
        return self


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


def load_config(
    cls: type[T], path: str | os.PathLike[str] | None = None, overrides: list[str] | None = None
) -> T:
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
