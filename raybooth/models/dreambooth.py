"""The DreamBooth train step in plain PyTorch: no Ray here, so a test (or a benchmark) calls it directly.

    models = prepare_for_training(load_sd_components("tiny-sd"), train_mode="full", train_text_encoder=False,
                                  plan=resolve_precision("no", "cpu"))
    optimizer, lr_scheduler = make_optimizer(models, learning_rate=5e-6), ...
    stats = train_step(models, optimizer, lr_scheduler, scaler, plan, data, cache, settings, step=0)

One optimizer step, read top to bottom:
  1. for each micro-batch (the loss itself is models/diffusion_loss.py): pick its rows (instance half, then class half), encode images to latents
     and prompts to embeddings (or take both from the cache), draw noise and timesteps from a generator
     seeded by (seed, step, micro-batch, rank), noise the latents, predict with the UNet, and take
     MSE(instance half) + prior_loss_weight * MSE(class half) against the scheduler's target;
  2. backward through the GradScaler (fp16) with DDP's all-reduce only on the last micro-batch;
  3. unscale, clip, step the optimizer and the LR schedule.

Trainable weights stay fp32 (master weights); autocast runs the maths in fp16/bf16; the frozen modules
(VAE, a frozen text encoder, the UNet base under LoRA) are stored in the half dtype to save memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from raybooth.errors import ModelError
from raybooth.models.device import PrecisionPlan, autocast
from raybooth.models.diffusion_family import PromptEmbeds, SDFamily
from raybooth.models.diffusion_loss import diffusion_loss
from raybooth.models.dreambooth_data import DreamBoothData, View
from raybooth.models.flow_matching import FlowObjective
from raybooth.models.train_memory import build_optimizer

# LoRA targets of SD's and SDXL's UNet (each family has its own: `family.lora_targets`), and of every
# CLIP text encoder, as diffusers' train_dreambooth_lora*.py scripts adapt them.
UNET_LORA_TARGETS = SDFamily.lora_targets
TEXT_ENCODER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class TrainModels:
    """The pieces of a diffusion model a train step touches; `denoiser`/`text_encoder(_2)` may be DDP-wrapped.
    `denoiser` is the family's UNet or transformer; SDXL/SD3/Flux have a second text encoder and tokenizer
    (SD3 a third, T5); `family` says how the pieces fit together."""

    denoiser: nn.Module
    text_encoder: nn.Module
    vae: nn.Module
    tokenizer: Any
    noise_scheduler: Any
    train_mode: str  # "full" | "lora"
    train_text_encoder: bool
    family: SDFamily = field(default_factory=SDFamily)
    text_encoder_2: nn.Module | None = None
    tokenizer_2: Any = None
    text_encoder_3: nn.Module | None = None
    tokenizer_3: Any = None

    @property
    def unet(self) -> nn.Module:
        """The denoiser under SD's name (kept for SD/SDXL callers)."""
        return self.denoiser

    @unet.setter
    def unet(self, module: nn.Module) -> None:
        self.denoiser = module

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [getattr(self, n) for n in self.family.text_encoder_names]

    @property
    def trained_text_encoders(self) -> list[nn.Module]:
        """The text encoders whose weights train (none unless the run trains them; never T5)."""
        if not self.train_text_encoder:
            return []
        return [getattr(self, n) for n in self.family.trainable_text_encoder_names]

    @property
    def tokenizers(self) -> list[Any]:
        return [getattr(self, n) for n in self.family.tokenizer_names]

    def trainable(self) -> dict[str, nn.Module]:
        """The modules whose weights a checkpoint holds, by name (text encoders: both, when they train)."""
        out = {self.family.denoiser_name: unwrap(self.denoiser)}
        if self.train_text_encoder:
            out.update({n: unwrap(getattr(self, n)) for n in self.family.trainable_text_encoder_names})
        return out


@dataclass
class StepSettings:
    """Knobs of one optimizer step (a subset of DreamBoothConfig, so models/ does not read configs)."""

    batch_size: int = 1  # instance rows per micro-batch per rank; as many class rows join them
    accumulation: int = 1  # micro-batches per optimizer step
    prior_loss_weight: float = 1.0  # weight of the class-half MSE (the paper uses 1)
    max_grad_norm: float = 1.0  # clipping keeps a lucky high-noise step from wrecking the weights
    snr_gamma: float | None = None  # Min-SNR weighting; None trains on plain MSE
    noise_offset: float = 0.0  # small (~0.05) values help very dark/bright images; 0 is the paper's
    seed: int = 0
    objective: FlowObjective = field(default_factory=FlowObjective)  # SD3/Flux: timestep density, weights
    guidance_scale: float = 3.5  # Flux.1-dev's guidance input while training (the flux script's default)


@dataclass
class StepStats:
    loss: float
    instance_loss: float
    prior_loss: float
    grad_norm: float
    lr: float
    grad_scale: float  # 1 without a GradScaler; drops when fp16 gradients overflowed
    extra: dict[str, float] = field(default_factory=dict)


def unwrap(module: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the module itself)."""
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


# --------------------------------------------------------------------------------------------------
# Setting the models up
# --------------------------------------------------------------------------------------------------


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Store a frozen module in `dtype` (a no-op, and no diffusers warning, when it already is)."""
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)
    return module


def use_sdpa(module: nn.Module) -> None:
    """Route a diffusers model's attention through torch's fused scaled_dot_product_attention."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    module.set_attn_processor(AttnProcessor2_0())


def add_lora(module: nn.Module, rank: int, alpha: int, targets: list[str]) -> None:
    """Freeze `module` and add peft LoRA adapters (fp32) on its `targets`; only they will train."""
    from peft import LoraConfig

    module.requires_grad_(False)
    # Gaussian init of A with B = 0: the adapted model starts exactly at the base model.
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    module.add_adapter(config)
    for p in module.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # master weights in fp32 even when the base is half


def prepare_for_training(
    components: Any,
    *,
    train_mode: str,
    train_text_encoder: bool,
    plan: PrecisionPlan,
    gradient_checkpointing: bool = False,
    lora_rank: int = 4,
    lora_alpha: int = 4,
    seed: int = 0,
) -> TrainModels:
    """Freeze, cast, adapt and switch on SDPA/checkpointing as the run asks; returns the `TrainModels`.

    `components` has the denoiser (UNet or transformer), vae, the family's text encoders and tokenizers and noise_scheduler
    (loaders.load_sd_components), loaded in fp32 on the training device.
    """
    if train_mode not in ("full", "lora"):
        raise ValueError(f"train_mode {train_mode!r}: use full or lora")
    family = getattr(components, "family", None) or SDFamily()
    if train_mode == "full" and not family.supports_full_finetune:
        raise ModelError(
            f"train_mode=full is not supported for {family.pipeline_class_name} ({family.name}); "
            "use train_mode=lora (its default)"
        )
    denoiser, vae = components.unet, components.vae
    text_encoders = [getattr(components, n) for n in family.text_encoder_names]
    trainable_names = family.trainable_text_encoder_names if train_text_encoder else []
    half = plan.frozen_dtype

    cast_frozen(vae.requires_grad_(False).eval(), half)  # the VAE only encodes: never trained, always frozen
    if not family.flow_matching:  # SD3's and Flux's transformers already run their own SDPA processors
        use_sdpa(denoiser)
    use_sdpa(vae)

    if train_mode == "lora":
        cast_frozen(denoiser, half)  # the base is frozen: keep it in the half dtype, adapters in fp32
        torch.manual_seed(seed)  # LoRA's random A matrices: the same on every rank and every resume
        add_lora(denoiser, lora_rank, lora_alpha, list(family.lora_targets))
        for name in trainable_names:  # SDXL's and SD3's scripts adapt both CLIP encoders, Flux's its one
            cast_frozen(getattr(components, name), half)
            add_lora(getattr(components, name), lora_rank, lora_alpha, TEXT_ENCODER_LORA_TARGETS)
    else:
        denoiser.requires_grad_(True)
        for name, text_encoder in zip(family.text_encoder_names, text_encoders, strict=True):
            text_encoder.requires_grad_(name in trainable_names)

    for name, text_encoder in zip(family.text_encoder_names, text_encoders, strict=True):
        if name not in trainable_names:
            cast_frozen(text_encoder.requires_grad_(False).eval(), half)
        else:
            text_encoder.train()
            if gradient_checkpointing:
                text_encoder.gradient_checkpointing_enable()
    denoiser.train()
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()

    return TrainModels(
        denoiser=denoiser,
        text_encoder=text_encoders[0],
        vae=vae,
        tokenizer=components.tokenizer,
        noise_scheduler=components.noise_scheduler,
        train_mode=train_mode,
        train_text_encoder=train_text_encoder,
        family=family,
        text_encoder_2=getattr(components, "text_encoder_2", None),
        tokenizer_2=getattr(components, "tokenizer_2", None),
        text_encoder_3=getattr(components, "text_encoder_3", None),
        tokenizer_3=getattr(components, "tokenizer_3", None),
    )


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in unwrap(module).parameters() if p.requires_grad]


def make_optimizer(
    models: TrainModels,
    learning_rate: float,
    text_encoder_lr: float | None = None,
    weight_decay: float = 1e-2,
    optimizer: str = "adamw",
) -> torch.optim.Optimizer:
    """AdamW (or `optimizer="adamw_8bit"`: bitsandbytes' 8-bit AdamW, CUDA only) over the trainable weights:
    one group for the denoiser, one for the text encoder(s) when they train."""
    groups = [{"params": trainable_parameters(models.denoiser), "lr": learning_rate}]
    if models.train_text_encoder:
        text_params = [p for m in models.trained_text_encoders for p in trainable_parameters(m)]
        groups.append({"params": text_params, "lr": text_encoder_lr or learning_rate})
    return build_optimizer(groups, optimizer, weight_decay)


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps`, then constant (diffusers' DreamBooth default is constant)."""

    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------------------------------
# Encoding images and prompts (and caching both)
# --------------------------------------------------------------------------------------------------


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The CPU generator for one micro-batch of one rank: a pure function of its coordinates."""
    state = np.random.SeedSequence([seed, step, micro, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator("cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


def encode_prompts(models: TrainModels, prompts: list[str]) -> PromptEmbeds:
    """The family's text embeddings for `prompts` (SD: last hidden states; SDXL: both encoders'
    penultimate states and the pooled projection), exactly as the sampler computes them."""
    return models.family.encode_prompts(models.text_encoders, models.tokenizers, prompts)


@torch.no_grad()
def latent_moments(vae: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, R, R) in [-1, 1] → the VAE posterior's mean and std, each (N, 4, R/8, R/8), fp32."""
    param = next(vae.parameters())
    posterior = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
    return posterior.mean.float(), posterior.std.float()


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator, vae: nn.Module, family: SDFamily
) -> torch.Tensor:
    """A draw from the posterior, scaled as the family's denoiser expects; noise from `generator` (CPU)."""
    eps = torch.randn(mean.shape, generator=generator).to(mean.device)
    return family.to_latents(vae, mean + std * eps)


@dataclass
class EncodingCache:
    """Posterior moments per view and embeddings per prompt, computed once (`cache_latents: true`).

    Sampling the posterior stays per step (same generator draw as without the cache), so caching changes
    speed, not results, up to float rounding of batched vs single VAE passes.
    """

    moments: dict[tuple[str, int, int, bool], tuple[torch.Tensor, torch.Tensor]]  # (C, h, w) each
    embeddings: dict[str, PromptEmbeds] | None  # prompt -> its (T, D) row; None when text encoders train

    @classmethod
    @torch.no_grad()
    def build(cls, models: TrainModels, data: DreamBoothData, batch: int = 8) -> EncodingCache:
        views = data.all_views()
        moments: dict[tuple[str, int, int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        for i in range(0, len(views), batch):
            chunk = views[i : i + batch]
            mean, std = latent_moments(models.vae, data.pixels(chunk))
            for j, v in enumerate(chunk):
                moments[_view_key(v)] = (mean[j], std[j])
        embeddings = None
        if not models.train_text_encoder:
            prompts = data.all_prompts()
            encoded = encode_prompts(models, prompts)
            embeddings = {p: encoded.rows(k) for k, p in enumerate(prompts)}
        return cls(moments, embeddings)


def _view_key(v: View) -> tuple[str, int, int, bool]:
    return (v.kind, v.concept, v.index, v.flip)


def batch_latents(
    models: TrainModels,
    data: DreamBoothData,
    views: list[View],
    generator: torch.Generator,
    cache: EncodingCache | None,
) -> torch.Tensor:
    """(N, 4, h, w) fp32 latents for the rows, from the cache or through the VAE."""
    if cache is not None:
        mean = torch.stack([cache.moments[_view_key(v)][0] for v in views])
        std = torch.stack([cache.moments[_view_key(v)][1] for v in views])
    else:
        mean, std = latent_moments(models.vae, data.pixels(views))
    return sample_latents(mean, std, generator, models.vae, models.family)


def batch_embeddings(
    models: TrainModels, data: DreamBoothData, views: list[View], cache: EncodingCache | None
) -> PromptEmbeds:
    """The rows' text embeddings, hidden (N, T, D) [+ pooled (N, P)], with grad when text encoders train."""
    prompts = data.prompts(views)
    if cache is not None and cache.embeddings is not None:
        return PromptEmbeds.stack([cache.embeddings[p] for p in prompts])
    if models.train_text_encoder:
        return encode_prompts(models, prompts)
    with torch.no_grad():
        return encode_prompts(models, prompts)


# --------------------------------------------------------------------------------------------------
# One optimizer step
# --------------------------------------------------------------------------------------------------


def _no_sync(modules: list[nn.Module], skip: bool) -> contextlib.ExitStack:
    """Skip DDP's gradient all-reduce for every micro-batch but the last of an accumulation."""
    stack = contextlib.ExitStack()
    if skip:
        for m in modules:
            if isinstance(m, nn.parallel.DistributedDataParallel):
                stack.enter_context(m.no_sync())
    return stack


def train_step(
    models: TrainModels,
    optimizer: torch.optim.Optimizer,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    plan: PrecisionPlan,
    data: DreamBoothData,
    cache: EncodingCache | None,
    settings: StepSettings,
    step: int,
    rank: int = 0,
    world_size: int = 1,
) -> StepStats:
    """One optimizer step (0-based `step`) over `settings.accumulation` micro-batches on this rank."""
    trained = [models.denoiser, *models.trained_text_encoders]
    totals = torch.zeros(3)  # loss, instance, prior: averaged over micro-batches for logging
    for micro in range(settings.accumulation):
        generator = step_generator(settings.seed, step, micro, rank)
        views = data.select(step, micro, rank, world_size, settings.batch_size, settings.accumulation)
        with _no_sync(trained, skip=micro < settings.accumulation - 1):
            latents = batch_latents(models, data, views, generator, cache)  # (N, 4, h, w)
            time_ids = models.family.time_ids(data.size_conditions(views), latents.device)  # SDXL: (N, 6)
            with autocast(plan):
                hidden = batch_embeddings(models, data, views, cache)  # (N, T, D) [+ pooled]
                parts = diffusion_loss(
                    models.denoiser,
                    models.noise_scheduler,
                    latents,
                    hidden,
                    generator,
                    with_prior=data.with_prior,
                    prior_loss_weight=settings.prior_loss_weight,
                    snr_gamma=settings.snr_gamma,
                    noise_offset=settings.noise_offset,
                    family=models.family,
                    time_ids=time_ids,
                    objective=settings.objective,
                    guidance_scale=settings.guidance_scale,
                )
            # Dividing by the micro-batch count makes the accumulated gradient a mean, like one big batch.
            scaler.scale(parts.loss / settings.accumulation).backward()
        totals += torch.stack([parts.loss.detach(), parts.instance, parts.prior]).float().cpu()

    params = [p for m in trained for p in trainable_parameters(m)]
    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
    scaler.step(optimizer)  # skipped (and the scale lowered) when fp16 gradients overflowed
    scaler.update()
    lr = optimizer.param_groups[0]["lr"]
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)

    loss, instance, prior = (totals / settings.accumulation).tolist()
    return StepStats(
        loss=loss,
        instance_loss=instance,
        prior_loss=prior,
        grad_norm=float(grad_norm),
        lr=lr,
        grad_scale=float(scaler.get_scale()) if scaler.is_enabled() else 1.0,
    )
