"""Schemas of the DreamBooth jobs (Ray Train): `raybooth train` (concepts, training knobs) and `raybooth fleet`.

from raybooth.cluster.config import DreamBoothConfig, load_config
cfg = load_config(DreamBoothConfig, "configs/dreambooth.yaml", ["concepts.0.class_name=cat", "steps=2"])
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, model_validator

from raybooth.cluster.config.base import JobConfig, Strict, path_mark


class ConceptConfig(Strict):
    """One subject to learn: its photos, the prompts that name it, and its class for prior preservation."""

    instance_data: str = Field(
        ...,
        description="Folder or s3:// prefix with 3-5 photos of the subject.",
        json_schema_extra=path_mark("data"),
    )
    class_name: str = Field("dog", description="What the subject is, e.g. dog; fills {class} in prompts.")
    instance_prompt: str = Field(
        "a photo of {identifier} {class}",
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

    base_model: str = Field(
        "tiny-sd",
        description="Base Stable Diffusion: preset, local path or hub id.",
        json_schema_extra=path_mark("model"),
    )
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
    mixed_precision: str | None = Field(
        None,
        pattern="^(auto|no|fp16|bf16)$",
        description="no | fp16 | bf16; null/auto: bf16 for SD3/Flux on CUDA GPUs (fp32 on CPUs, with a note), "
        "fp32 for SD 1.x/2.x/SDXL.",
    )
    optimizer: str = Field(
        "adamw",
        pattern="^(adamw|adamw_8bit)$",
        description="adamw, or adamw_8bit (bitsandbytes' 8-bit AdamW: ~6 bytes less per trained weight; "
        "needs CUDA GPUs and bitsandbytes installed).",
    )
    train_mode: str | None = Field(
        None,
        pattern="^(full|lora)$",
        description="full (UNet + text encoder) or lora; null: the family's default (full for SD 1.x/2.x "
        "and SDXL, lora for SD3 and Flux.1, which train LoRA only).",
    )
    lora_rank: int = Field(4, ge=1, description="LoRA rank (train_mode: lora).")
    lora_alpha: int = Field(4, ge=1, description="LoRA alpha (train_mode: lora).")
    gradient_checkpointing: bool = Field(
        False,
        description="Trade compute for memory in the denoiser (UNet or transformer) and trained text encoders.",
    )
    cache_text_embeddings: bool | None = Field(
        None,
        description="Encode every prompt (instance, class, validation) once and free the text encoders that "
        "do not train (T5 always; CLIPs when text_encoder_lr is null); null: on for SD3/Flux, off otherwise.",
    )
    cache_latents: bool = Field(
        False,
        description="Encode images with the VAE once, and prompts once when the text encoder is frozen "
        "(speed; the same results up to float rounding). Needs center_crop.",
    )
    snr_gamma: float | None = Field(None, gt=0, description="Min-SNR loss weighting gamma (null: off).")
    noise_offset: float = Field(0.0, ge=0, description="Noise offset (0: off).")
    # Flow matching (SD3, Flux.1): how training timesteps are drawn and rows weighted, as diffusers'
    # train_dreambooth_lora_sd3.py / _flux.py (--weighting_scheme, --logit_mean, ...); DDPM families ignore them.
    timestep_density: str = Field(
        "logit_normal",
        pattern="^(logit_normal|mode|uniform)$",
        description="SD3/Flux: density of the training sigmas: logit_normal (SD3 paper's default), mode, uniform.",
    )
    loss_weighting: str = Field(
        "none", pattern="^(none|sigma_sqrt|cosmap)$", description="SD3/Flux: per-row loss weighting."
    )
    logit_mean: float = Field(0.0, description="SD3/Flux: mean of the logit-normal density.")
    logit_std: float = Field(1.0, gt=0, description="SD3/Flux: std of the logit-normal density.")
    mode_scale: float = Field(
        1.29,
        ge=-1,
        le=1.75,  # the SD3 paper's range, where the density's map stays monotone on [0, 1]
        description="SD3/Flux: scale of the mode density (0: uniform).",
    )
    train_guidance_scale: float = Field(
        3.5, ge=0, description="Flux.1-dev: the guidance input while training (the flux script's default)."
    )
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
        True,
        description="Also save an fp16 variant next to the fp32 weights of a full fine-tune (what GPU serving "
        "loads; LoRA: fp16 adapters).",
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
    resume: str | None = Field(
        None,
        description="MLflow run id or checkpoint URI to continue from.",
        json_schema_extra=path_mark("model"),
    )

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

    base: str | None = Field(
        None, description="DreamBooth YAML every subject starts from.", json_schema_extra=path_mark("config")
    )
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
