"""Schema of `raybooth serve` (Ray Serve): deployments, batching, autoscaling, limits and safety policy.

from raybooth.cluster.config import ServeConfig, load_config
cfg = load_config(ServeConfig, "configs/serve.yaml", ["port=8001"])
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from raybooth.cluster.config.base import EngineOptions, JobConfig, Strict, path_mark


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
        json_schema_extra=path_mark("model"),
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


class ChatServeSection(DeploymentSection, BatchingMixin, EngineOptions):
    """The chat deployment (`ChatDeployment`)."""

    scheduler: Literal["continuous", "static"] = Field(
        "continuous",
        description=(
            "continuous: rows join and leave the running batch at every decode step (models/vlm_scheduler.py; "
            "max_batch_size caps the running rows; a request that finds nothing running starts at once, "
            "and batch_wait_timeout_s is how long it waits for company only for a family that admits between "
            "batches). static: `@serve.batch` batches that decode to their end (kept for comparison)."
        ),
    )

    placement: Literal["deployment", "ingress"] = Field(
        "deployment",
        description=(
            "deployment: the engine runs in its own deployment, called by the ingress for every request and "
            "every streamed chunk. ingress: every ingress replica runs an engine of its own (with this "
            "section's CPUs and GPUs added to the ingress's, and ingress.autoscaling its replicas), so a chat "
            "request never leaves the process that holds its HTTP connection (serving/local_handle.py); a "
            "Serve config file then lists no ChatDeployment."
        ),
    )
    max_concurrent_batches: int = Field(
        2, ge=1, description="static only: batches decoding at once (a new batch need not wait)."
    )
    prefill_chunk_tokens: int = Field(
        512,
        ge=0,
        description="continuous only: a text prompt longer than this is prefilled this many tokens per "
        "decode step of the running rows, so they keep streaming (models/chunked_prefill.py); 0: whole.",
    )
    stream_interval: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="continuous only: tokens per streamed chunk once one has shown text (vLLM's "
        "--stream-interval); higher sends fewer messages (each crosses two Serve hops) at the cost of burstier streams. auto: 1 "
        "while up to 3 rows run, then 1 more per 2 running rows, at most 16. A stream that fell behind gets "
        "what it missed in one chunk whatever this is.",
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
    high_throughput: bool = Field(
        True,
        description="Embedded Ray: Ray Serve's high-throughput mode, HAProxy in place of the Python HTTP proxy "
        "and gRPC between deployments (serving/high_throughput.py); a connected cluster uses its nodes' mode.",
    )


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
    max_image_aspect_ratio: float = Field(
        50.0,
        ge=1.0,
        description="Largest long side / short side of a chat image (processors scale the short side up).",
    )
    max_image_resized_pixels: int = Field(
        16_777_216,
        ge=1,
        description="Largest chat image after the model's processor resizes it; checked before it does.",
    )
    max_images_per_request: int = Field(
        4, ge=0, description="Images in one chat request: image_url parts plus the frames of video_url parts."
    )
    max_video_frames: int = Field(
        4, ge=1, description="Frames sampled from one video of a chat request at most; more is refused."
    )
    video_fps: float = Field(1.0, gt=0, le=60, description="Frames sampled per second of a chat video.")
    max_video_bytes: int = Field(
        10 * 1024 * 1024, ge=1, description="Largest decoded video (data: URL) in a chat request."
    )
    max_messages: int = Field(64, ge=1, description="Messages in one chat request.")
    max_tokens: int = Field(
        1024, ge=1, description="Largest max_tokens (max_completion_tokens) a request may ask."
    )
    max_n: int = Field(4, ge=1, description="Largest n for images (and chat).")
    max_steps: int = Field(100, ge=1, description="Largest num_inference_steps.")
    max_image_side: int = Field(1024, ge=8, description="Largest width or height of a generated image.")
    max_prompt_chars: int = Field(4000, ge=1, description="Longest image prompt / negative prompt.")
    max_prompt_bytes: int = Field(
        256 * 1024,
        ge=1,
        description=(
            "Largest chat prompt text (UTF-8 bytes of all messages), refused before tokenizing: ~64K "
            "tokens, more than most context windows, yet quick to tokenize."
        ),
    )
    retry_after_s: int = Field(
        1, ge=0, description="Retry-After (seconds) on every 503 (overloaded, replica_failed)."
    )


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
    chat_model: str = Field(
        "tiny-vlm",
        description="VLM for /v1/chat/completions: preset, path or hub id.",
        json_schema_extra=path_mark("model"),
    )
    chat_model_name: str | None = Field(
        None, description="Model id clients send for chat (default: chat_model's last path part)."
    )
    image_models: list[str] = Field(
        default_factory=list,
        description="Image models: registered names (name, name/version, name@alias) or paths.",
        json_schema_extra=path_mark("model"),
    )
    serve_registry: bool = Field(
        True, description="Also serve (and list) every model in the MLflow registry, not only image_models."
    )
    api_keys_env: str = Field("RAYBOOTH_API_KEYS", description="Env var holding comma-separated API keys.")
    api_keys_file: str | None = Field(
        None, description="File with one API key per line.", json_schema_extra=path_mark("data")
    )
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
