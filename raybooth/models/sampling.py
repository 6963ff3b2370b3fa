"""Diffusion sampling (every family of models/diffusion_family.py) with batched classifier-free guidance and per-row seeds.

    from raybooth.models.loaders import load_sd_pipeline
    from raybooth.models.sampling import sample_images

    pipe = load_sd_pipeline("tiny-sd")
    images = sample_images(pipe, ["a photo of sks dog", "a cat"], height=64, width=64,
                           num_inference_steps=4, guidance_scale=7.5, seeds=[0, 1])

One denoiser pass per denoising step for the whole batch: the unconditional and conditional halves are
concatenated along the batch axis (`(2B, C, h, w)`), as the diffusers pipelines do, and split after.
Each row's starting noise (and any noise an ancestral scheduler adds) comes from that row's own
`torch.Generator`, created on the CPU from its seed, so a row's image does not depend on which batch it
ran in or on which device. Used by the image deployment, `raybooth generate` and DreamBooth validation.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from raybooth.models.batch_invariance import batch_invariant as per_row_kernels
from raybooth.models.diffusion_family import PromptEmbeds, SDFamily, family_of


class SamplingStopped(Exception):
    """`sample_images` stopped early because `should_stop` said so."""

    def __init__(self, steps_done: int, steps: int):
        super().__init__(f"sampling stopped after {steps_done} of {steps} steps")
        self.steps_done, self.steps = steps_done, steps


@dataclass
class SamplingParts:
    """What sampling needs, taken from a diffusers pipeline, its `.components` dict or
    `loaders.SDComponents` (whose training `noise_scheduler` then samples); `family` says how they fit.
    `denoiser` is the family's UNet or transformer (its pipeline component `family.denoiser_name`)."""

    family: SDFamily
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    scheduler: Any

    @property
    def unet(self) -> torch.nn.Module:
        return self.denoiser

    @classmethod
    def of(cls, obj: Any) -> SamplingParts:
        if isinstance(obj, SamplingParts):
            return obj
        if isinstance(obj, Mapping):
            get = obj.get
        else:

            def get(name: str) -> Any:
                return getattr(obj, name, None)

        family = family_of(obj)
        scheduler = get("scheduler") or get("noise_scheduler")
        parts = {family.denoiser_name: get(family.denoiser_name), "vae": get("vae"), "scheduler": scheduler}
        parts.update({name: get(name) for name in family.text_encoder_names + family.tokenizer_names})
        missing = [name for name, part in parts.items() if part is None]
        if missing:
            raise TypeError(
                f"{type(obj).__name__} lacks {', '.join(missing)}; pass a {family.pipeline_class_name}"
            )
        family.bind(parts[family.denoiser_name])
        return cls(
            family=family,
            text_encoders=[parts[n] for n in family.text_encoder_names],
            tokenizers=[parts[n] for n in family.tokenizer_names],
            denoiser=parts[family.denoiser_name],
            vae=parts["vae"],
            scheduler=scheduler,
        )

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def check_size(components: Any, height: int, width: int) -> None:
    """Raise ValueError (with the fix) when the VAE cannot produce a `height`x`width` image."""
    c = SamplingParts.of(components)
    multiple = c.family.size_multiple(c.vae_scale_factor, c.denoiser)  # Flux: 2x2 latent patches too
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"size {width}x{height}: width and height must be positive multiples of {multiple}")


@torch.inference_mode()
def encode_prompts(c: SamplingParts, prompts: Sequence[str]) -> PromptEmbeds:
    """The family's text embeddings (`hidden` (B, T, D), SDXL/SD3/Flux `pooled` (B, P)), as its pipeline
    encodes them."""
    return c.family.encode_prompts(c.text_encoders, c.tokenizers, prompts)


def encode_negative_prompts(c: SamplingParts, prompts: Sequence[str]) -> PromptEmbeds:
    """Negative embeddings; for SDXL an empty negative prompt is all zeros, as its pipeline's default."""
    embeds = encode_prompts(c, prompts)
    if not c.family.empty_negative_is_zero():
        return embeds
    return embeds.zeros_where(torch.tensor([p == "" for p in prompts]))


def initial_latents(
    c: SamplingParts, seeds: Sequence[int], height: int, width: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Starting noise `(B, C, h, w)`, each row drawn from its own CPU generator, plus those generators."""
    channels = c.family.latent_channels(c.denoiser)
    shape = (1, channels, height // c.vae_scale_factor, width // c.vae_scale_factor)
    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    rows = [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]
    return torch.cat(rows).to(device=device, dtype=dtype), generators


def latents_to_images(c: SamplingParts, latents: torch.Tensor) -> list[Image.Image]:
    vae = c.vae
    if c.family.upcast_vae and vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        # SDXL's VAE overflows in fp16 (its pipeline upcasts too); decode a float32 copy.
        vae, latents = copy.deepcopy(vae).float(), latents.float()
    decoded = vae.decode(c.family.from_latents(vae, latents)).sample  # (B, 3, H, W) in [-1, 1]
    pixels = (decoded.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]


@torch.inference_mode()
def sample_images(
    components_or_pipeline: Any,
    prompts: Sequence[str],
    negative_prompts: Sequence[str] | None = None,
    *,
    height: int,
    width: int,
    num_inference_steps: int,
    guidance_scale: float | Sequence[float],
    seeds: Sequence[int],
    batch_invariant: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> list[Image.Image]:
    """Sample one image per prompt; `guidance_scale` may be one value or one per row.

    With `batch_invariant`, a row's image is byte-identical to the one it gets alone (or in any other
    batch) for the same seed: see models/batch_invariance.py for how, and what it costs.
    `should_stop` is asked before every denoiser pass; when it says yes (nobody wants the images any more,
    e.g. every client of a serving batch left) sampling raises `SamplingStopped` instead of finishing.

    Guidance is on when any row's scale is above 1 (the diffusers convention); then every step runs the
    denoiser once on `2B` rows (Flux.1 runs no CFG pass: dev reads each row's scale through its guidance
    embedding, schnell ignores it). Callers that want a row's image to be independent of its batch group rows
    by `guidance_on(scale)` as well as by size and steps (see serving/image_deployment.py).
    """
    c = SamplingParts.of(components_or_pipeline)
    batch = len(prompts)
    if batch == 0:
        return []
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for {batch} prompts; pass one seed per prompt")
    negative_prompts = list(negative_prompts) if negative_prompts is not None else [""] * batch
    if len(negative_prompts) != batch:
        raise ValueError(f"got {len(negative_prompts)} negative prompts for {batch} prompts")
    scales = (
        [float(guidance_scale)] * batch if isinstance(guidance_scale, int | float) else list(guidance_scale)
    )
    if len(scales) != batch:
        raise ValueError(f"got {len(scales)} guidance scales for {batch} prompts")
    check_size(c, height, width)
    with per_row_kernels(batch_invariant):
        return _sample(
            c, prompts, negative_prompts, scales, seeds, height, width, num_inference_steps, should_stop
        )


def _sample(
    c: SamplingParts,
    prompts: Sequence[str],
    negative_prompts: list[str],
    scales: list[float],
    seeds: Sequence[int],
    height: int,
    width: int,
    num_inference_steps: int,
    should_stop: Callable[[], bool] | None,
) -> list[Image.Image]:
    batch = len(prompts)
    device, dtype = c.denoiser.device, c.denoiser.dtype
    latent_hw = (height // c.vae_scale_factor, width // c.vae_scale_factor)
    # A private scheduler: set_timesteps mutates it, and two batches may sample from one model at once.
    scheduler = copy.deepcopy(c.scheduler)
    c.family.set_timesteps(scheduler, num_inference_steps, device, latent_hw)
    use_cfg = c.family.uses_cfg and any(guidance_on(s) for s in scales)

    cond = encode_prompts(c, prompts)  # (B, T, D)
    embeddings = PromptEmbeds.cat([encode_negative_prompts(c, negative_prompts), cond]) if use_cfg else cond
    embeddings = embeddings.to(dtype)  # (2B, T, D) with guidance
    rows = 2 * batch if use_cfg else batch
    # SDXL micro-conditioning at sampling: original = target = the output size, no crop.
    time_ids = c.family.time_ids([(height, width, 0, 0, height, width)] * rows, device)
    latents, generators = initial_latents(c, seeds, height, width, dtype, device)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)  # flow matching starts at pure noise
    scale = torch.tensor(scales, device=device, dtype=dtype).view(batch, 1, 1, 1)
    # Flux.1-dev: each row's scale is an input of the transformer (distilled guidance), (B,) fp32.
    guidance = torch.tensor(scales, device=device) if c.family.takes_guidance(c.denoiser) else None
    scale_input = getattr(scheduler, "scale_model_input", None)  # FlowMatch schedulers have none
    step_kwargs = (
        {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    )

    for done, t in enumerate(scheduler.timesteps):
        if should_stop is not None and should_stop():
            raise SamplingStopped(done, len(scheduler.timesteps))
        model_in = torch.cat([latents, latents]) if use_cfg else latents  # (2B, C, h, w) with guidance
        model_in = scale_input(model_in, t) if scale_input is not None else model_in
        noise = c.family.denoise(c.denoiser, model_in, t, embeddings, time_ids, guidance)
        if use_cfg:
            uncond, text = noise.chunk(2)
            noise = uncond + scale * (text - uncond)
        latents = scheduler.step(noise, t, latents, **step_kwargs).prev_sample
    return latents_to_images(c, latents)


def guidance_on(guidance_scale: float) -> bool:
    """Classifier-free guidance runs for scales above 1 (at 1 it would equal the conditional branch)."""
    return guidance_scale > 1.0
