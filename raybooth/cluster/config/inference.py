"""Schemas of the batch inference jobs (Ray Data): `raybooth caption` and `raybooth batch`.

from raybooth.cluster.config import CaptionConfig, load_config
cfg = load_config(CaptionConfig, "configs/caption.yaml", ["batch_size=16"])
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from raybooth.cluster.config.base import EngineOptions, JobConfig, path_mark


class InferenceJobConfig(JobConfig, EngineOptions):
    """What `raybooth caption` and `raybooth batch` share: input/output, model, batching and replicas."""

    input: str | None = Field(
        None,
        description="Input: folder, glob, parquet file/folder or s3:// prefix.",
        json_schema_extra=path_mark("data"),
    )
    output: str | None = Field(
        None, description="Output folder/file, local or s3://.", json_schema_extra=path_mark("data")
    )
    model: str = Field(
        "tiny-vlm",
        description="VLM: a preset name, a local path or a hub id.",
        json_schema_extra=path_mark("model"),
    )
    device: str = Field(
        "auto", description="Device of each replica: auto (CUDA when the replica has a GPU), cpu, cuda."
    )
    dtype: str | None = Field(
        None, description="Weights dtype (fp32, fp16, bf16); empty: the checkpoint's own."
    )
    scheduler: Literal["continuous", "static"] = Field(
        "continuous",
        description="continuous: each replica's rows go through its continuous-batching scheduler "
        "(models/vlm_scheduler.py): up to batch_size rows decode together and a finished row's slot is "
        "refilled by a waiting row at the next step. static: rows are packed (`packing`) into batches that "
        "each decode to their slowest row (kept for comparison, benchmarks/batch_inference.py).",
    )
    batch_size: int = Field(
        8, ge=1, description="Max rows decoding together (the token budget caps it further)."
    )
    max_batch_tokens: int = Field(
        8192,
        ge=16,
        description="Token budget: static, a packed batch's padded prompt tokens at most; continuous, the "
        "prompt tokens admitted (prefilled together) per decode step at most.",
    )
    packing: Literal["token_budget", "fifo"] = Field(
        "token_budget",
        description="static only: token_budget sorts rows by image count and length and cuts batches by the "
        "budget; fifo: arrival order, batch_size rows (the baseline, for comparison).",
    )
    pack_window: int = Field(
        64,
        ge=1,
        description="Rows a replica receives per call (continuous: they refill the batch's slots until the "
        "call's last rows drain; static: they are packed into batches); larger keeps batches fuller but "
        "holds more decoded rows in memory.",
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
    max_image_aspect_ratio: float = Field(
        50.0,
        ge=1.0,
        description="Images whose long side / short side is over this are refused (processors scale the "
        "short side up, so a 1x400000 strip would become gigabytes).",
    )
    max_image_resized_pixels: int = Field(
        16_777_216,
        ge=1,
        description="Images the model's processor would resize to more pixels than this are refused, "
        "checked before it resizes.",
    )
    max_video_frames: int = Field(
        16,
        ge=1,
        description="Frames sampled from one video at most (each is an image to the model); a video that "
        "samples to more is refused.",
    )
    video_fps: float = Field(1.0, gt=0, le=60, description="Frames sampled per second of video.")
    max_video_bytes: int = Field(
        64 * 1024 * 1024, ge=1, description="Video files over this size are refused."
    )
    max_error_fraction: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Exit 1 (printing the first errors) when more than this fraction of the rows this run "
        "processed failed; 0 fails the job on any failed row. A run whose every row failed exits 1 whatever "
        "the value (the default 1.0 keeps only that rule).",
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
    max_prompt_bytes: int = Field(
        256 * 1024,
        ge=1,
        description="Largest prompt text (UTF-8 bytes) of a request, checked before tokenizing.",
    )
