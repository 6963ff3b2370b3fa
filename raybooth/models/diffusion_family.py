"""Diffusion model families: one object per pipeline kind that every caller asks how that kind works.

    family = detect_family("/models/tiny-sdxl")             # reads model_index.json's _class_name
    family.name, family.pipeline_class_name                   # "sdxl", "StableDiffusionXLPipeline"
    embeds = family.encode_prompts([te, te2], [tok, tok2], ["a photo of sks dog"])
    pred = family.denoise(unet, noisy, t, embeds, family.time_ids([(64, 64, 0, 0, 64, 64)], device))

The train step (models/dreambooth.py), the sampler (models/sampling.py, used by class images, `generate`
and serving) and the loaders (models/loaders.py) all go through a family, so SD 1.x/2.x and SDXL share
one code path. A family owns: which components load from which subfolders with which classes, how
prompts become the denoiser's text inputs, the denoiser call, VAE scaling, the training noise scheduler
and the training target (epsilon / v-prediction, from the scheduler config).

Supported: StableDiffusionPipeline ("sd": SD 1.x and 2.x), StableDiffusionXLPipeline ("sdxl"), and the
flow-matching families of models/flow_family.py (StableDiffusion3Pipeline "sd3", FluxPipeline "flux");
`families()` is the one registry `detect_family` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raybooth.errors import ModelError


@dataclass
class PromptEmbeds:
    """What the denoiser reads from the prompts: `hidden` (N, T, D) and, for SDXL, `pooled` (N, P)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def rows(self, index: int) -> PromptEmbeds:
        return PromptEmbeds(self.hidden[index], None if self.pooled is None else self.pooled[index])

    @staticmethod
    def stack(rows: Sequence[PromptEmbeds]) -> PromptEmbeds:
        pooled = None if rows[0].pooled is None else torch.stack([r.pooled for r in rows])
        return PromptEmbeds(torch.stack([r.hidden for r in rows]), pooled)

    @staticmethod
    def cat(parts: Sequence[PromptEmbeds]) -> PromptEmbeds:
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return PromptEmbeds(torch.cat([p.hidden for p in parts]), pooled)

    def to(self, dtype: torch.dtype) -> PromptEmbeds:
        return PromptEmbeds(self.hidden.to(dtype), None if self.pooled is None else self.pooled.to(dtype))

    def zeros_where(self, mask: torch.Tensor) -> PromptEmbeds:
        """Rows where `mask` (N,) is True set to zero (SDXL's "empty negative prompt = zeros")."""

        def zero(t: torch.Tensor) -> torch.Tensor:
            keep = (~mask).to(t.device, t.dtype).view(-1, *([1] * (t.dim() - 1)))
            return t * keep

        return PromptEmbeds(zero(self.hidden), None if self.pooled is None else zero(self.pooled))


def _device_of(module: nn.Module) -> torch.device:
    inner = module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module
    return next(inner.parameters()).device


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """(N, T) token ids padded to the tokenizer's max length, as the diffusers pipelines encode prompts."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


class SDFamily:
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder (last hidden state), a cross-attention UNet."""

    name = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
    denoiser_name = "unet"  # the pipeline component that denoises (flow families: "transformer")
    denoiser_class = "UNet2DConditionModel"
    flow_matching = False  # DDPM noising with an epsilon / v target
    supports_full_finetune = True
    default_train_mode = "full"
    uses_cfg = True  # guidance by a second (unconditional) denoiser pass
    # LoRA targets: the attention projections, as diffusers' train_dreambooth_lora(_sdxl).py adapt them.
    lora_targets = ["to_q", "to_k", "to_v", "to_out.0"]
    lora_text_encoders: tuple[str, ...] = ("text_encoder",)  # the encoders that can train (LoRA or full)
    text_encoder_has_unused_layers = False  # some trained encoder layer gets no gradient (DDP's concern)
    resolution_multiple = 8  # training image sides: the VAE downsamples 8x
    # (text encoder component, its tokenizer, the transformers class of the encoder)
    text_encoder_slots: tuple[tuple[str, str, str], ...] = (("text_encoder", "tokenizer", "CLIPTextModel"),)
    # Pipeline constructor arguments a raybooth export sets: no safety checker (model_index says null).
    export_kwargs: dict[str, Any] = dict(
        safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )

    upcast_vae = False

    def __init__(self, index: dict[str, Any] | None = None):
        self.index = dict(index or {})  # model_index.json: component classes and pipeline options

    # ---------------------------------------------------------------- components

    @property
    def text_encoder_names(self) -> list[str]:
        return [slot[0] for slot in self.text_encoder_slots]

    @property
    def tokenizer_names(self) -> list[str]:
        return [slot[1] for slot in self.text_encoder_slots]

    @property
    def trainable_text_encoder_names(self) -> list[str]:
        """The text encoders that train when the run trains text encoders (never SD3's/Flux's T5)."""
        return [n for n in self.text_encoder_names if n in self.lora_text_encoders]

    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def denoiser_class_obj(self) -> type:
        import diffusers

        return getattr(diffusers, self.denoiser_class)

    def missing_components(self) -> list[str]:
        """Components this family needs that model_index.json does not list (checked before loading)."""
        needed = [self.denoiser_name, "vae", "scheduler", *self.text_encoder_names, *self.tokenizer_names]
        return [n for n in needed if not (isinstance(self.index.get(n), list) and self.index[n][1])]

    def pipeline_load_kwargs(self) -> dict[str, Any]:
        """Extra `from_pretrained` arguments of the pipeline class (components saved as None)."""
        return {}

    def bind(self, denoiser: nn.Module) -> None:
        """Learn what the family reads from the loaded denoiser's config (SD3 without T5: its width)."""

    def load_components(self, path: str, weights: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
        """Each part from its subfolder: `weights` = from_pretrained options with dtype, `options` without."""
        import transformers
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer

        denoiser = self.denoiser_class_obj().from_pretrained(path, subfolder=self.denoiser_name, **weights)
        self.bind(denoiser)
        parts: dict[str, Any] = {
            "denoiser": denoiser,
            "vae": AutoencoderKL.from_pretrained(path, subfolder="vae", **weights),
        }
        for encoder, tokenizer, cls in self.text_encoder_slots:
            parts[encoder] = getattr(transformers, cls).from_pretrained(path, subfolder=encoder, **weights)
            parts[tokenizer] = AutoTokenizer.from_pretrained(path, subfolder=tokenizer, **options)
        parts["noise_scheduler"] = self.noise_scheduler(path, options)
        return parts

    def noise_scheduler(self, path: str, options: dict[str, Any]) -> Any:
        """The training noise schedule: DDPM's, built from the folder's scheduler config (prediction
        type and betas kept), whatever sampler the pipeline ships."""
        from diffusers import DDPMScheduler

        config = DDPMScheduler.load_config(path, subfolder="scheduler", **options)
        class_name = str(config.get("_class_name", ""))
        if class_name.startswith("FlowMatch") or "beta_schedule" not in config and "betas" not in config:
            raise ModelError(
                f"the scheduler of {path} is {class_name or 'not a DDPM-family scheduler'}, which a "
                f"{self.pipeline_class_name} is not trained with: use the pipeline's own DDPM-family scheduler, "
                "or a flow-matching pipeline (StableDiffusion3Pipeline, FluxPipeline)"
            )
        return DDPMScheduler.from_config(config)

    def inference_scheduler(self, path: str, options: dict[str, Any] | None = None) -> Any:
        """The sampler the pipeline ships with (model_index.json names its class)."""
        import diffusers

        _, class_name = self.index["scheduler"]
        return getattr(diffusers, class_name).from_pretrained(path, subfolder="scheduler", **(options or {}))

    # ---------------------------------------------------------------- sampling

    def latent_channels(self, denoiser: nn.Module) -> int:
        return denoiser.config.in_channels

    def size_multiple(self, vae_scale_factor: int, denoiser: nn.Module) -> int:
        """Image sides must be multiples of this (the UNet copes with odd latent sizes)."""
        return vae_scale_factor

    def set_timesteps(
        self, scheduler: Any, steps: int, device: torch.device, latent_hw: tuple[int, int]
    ) -> None:
        scheduler.set_timesteps(steps, device=device)

    @staticmethod
    def takes_guidance(denoiser: nn.Module) -> bool:
        """Whether the denoiser reads the guidance scale as an input (Flux.1-dev's distilled guidance)."""
        return False

    # ---------------------------------------------------------------- prompts

    def encode_prompts(
        self, text_encoders: Sequence[nn.Module], tokenizers: Sequence[Any], prompts: Sequence[str]
    ) -> PromptEmbeds:
        """(N, T, D) last hidden states of the CLIP text encoder: what the UNet cross-attends to."""
        (encoder,), (tokenizer,) = text_encoders, tokenizers
        ids = tokenize(tokenizer, prompts).to(_device_of(encoder))
        return PromptEmbeds(encoder(ids)[0])

    def empty_negative_is_zero(self) -> bool:
        """Whether an empty negative prompt means all-zero embeddings (SDXL's default) or encoded ""."""
        return False

    # ---------------------------------------------------------------- denoiser

    @property
    def uses_time_ids(self) -> bool:
        return False

    def time_ids(self, sizes: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor | None:
        """SDXL micro-conditioning rows (original H, W, crop top, left, target H, W); None for SD."""
        return None

    def denoise(
        self,
        unet: nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: PromptEmbeds,
        time_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The UNet's prediction (N, C, h, w) for noisy `latents` at `timesteps`."""
        return unet(latents, timesteps, encoder_hidden_states=embeds.hidden).sample

    # ---------------------------------------------------------------- VAE and objective

    @staticmethod
    def to_latents(vae: nn.Module, sample: torch.Tensor) -> torch.Tensor:
        """VAE posterior sample -> what the denoiser sees: (z - shift) * scaling_factor."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (sample - shift) * vae.config.scaling_factor

    @staticmethod
    def from_latents(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return latents / vae.config.scaling_factor + shift

    def training_noise(
        self,
        noise_scheduler: Any,
        latents: torch.Tensor,
        noise: torch.Tensor,
        generator: torch.Generator,
        objective: Any = None,
    ) -> Any:
        """DDPM noising at uniform integer timesteps: (noisy, target, timesteps, sigmas=None)."""
        from raybooth.models.flow_matching import FlowBatch

        count = noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, count, (latents.shape[0],), generator=generator).to(latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)  # (N, C, h, w)
        target = self.training_target(noise_scheduler, latents, noise, timesteps)
        return FlowBatch(noisy=noisy, target=target, timesteps=timesteps, sigmas=None)

    @staticmethod
    def training_target(
        noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """What the denoiser must predict: the noise (epsilon) or the velocity, as the scheduler says."""
        prediction_type = noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return noise_scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(
            f"scheduler prediction_type {prediction_type!r} is not supported; use epsilon or v_prediction"
        )


class SDXLFamily(SDFamily):
    """SDXL: two CLIP text encoders (penultimate hidden states concatenated, plus text_encoder_2's pooled
    projection) and a UNet micro-conditioned on (original size, crop top-left, target size)."""

    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    text_encoder_slots = (
        ("text_encoder", "tokenizer", "CLIPTextModel"),
        ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection"),
    )
    export_kwargs: dict[str, Any] = {}
    lora_text_encoders = ("text_encoder", "text_encoder_2")  # SDXL's script adapts both CLIP encoders
    # text_encoder's penultimate layer is read, so its last layer gets no gradient: DDP must be told.
    text_encoder_has_unused_layers = True
    upcast_vae = True  # its VAE overflows in fp16: decode in fp32 where the config says force_upcast

    def encode_prompts(
        self, text_encoders: Sequence[nn.Module], tokenizers: Sequence[Any], prompts: Sequence[str]
    ) -> PromptEmbeds:
        hidden, pooled = [], None
        for encoder, tokenizer in zip(text_encoders, tokenizers, strict=True):
            ids = tokenize(tokenizer, prompts).to(_device_of(encoder))
            out = encoder(ids, output_hidden_states=True)
            pooled = out[0]  # the last encoder's (text_encoder_2's) projected pooled output, (N, P)
            hidden.append(out.hidden_states[-2])  # SDXL reads the penultimate layer, (N, T, D_i)
        return PromptEmbeds(torch.cat(hidden, dim=-1), pooled)  # (N, T, D_1 + D_2)

    def empty_negative_is_zero(self) -> bool:
        # SDXL pipelines save force_zeros_for_empty_prompt (True for SDXL base): no negative = zeros.
        return bool(self.index.get("force_zeros_for_empty_prompt", True))

    @property
    def uses_time_ids(self) -> bool:
        return True

    def time_ids(self, sizes: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
        """(N, 6): original_size + crop_coords_top_left + target_size, as train_dreambooth_lora_sdxl.py."""
        return torch.tensor([list(s) for s in sizes], dtype=torch.float32, device=device)

    def denoise(
        self,
        unet: nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: PromptEmbeds,
        time_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if time_ids is None or embeds.pooled is None:
            raise ValueError("SDXL's UNet needs pooled text embeddings and time_ids")
        added = {"text_embeds": embeds.pooled, "time_ids": time_ids.to(embeds.pooled.dtype)}
        return unet(latents, timesteps, encoder_hidden_states=embeds.hidden, added_cond_kwargs=added).sample


def families() -> dict[str, type[SDFamily]]:
    """Every supported family by its pipeline class name: the one registry detection reads."""
    from raybooth.models.flow_family import FLOW_FAMILIES  # imported late: it builds on this module

    return {**{f.pipeline_class_name: f for f in (SDFamily, SDXLFamily)}, **FLOW_FAMILIES}


def family_names() -> str:
    return ", ".join(f"{f.name} ({cls})" for cls, f in families().items())


def family_from_index(index: dict[str, Any], where: str = "the model") -> SDFamily:
    """The family named by a model_index.json's `_class_name`; ModelError for any other pipeline."""
    class_name = index.get("_class_name")
    if class_name not in families():
        raise ModelError(
            f"{where} is a {class_name or 'pipeline with no _class_name'}, which raybooth does not support; "
            f"supported families: {family_names()}"
        )
    return families()[class_name](index)


def detect_family(path: str, options: dict[str, Any] | None = None, check: bool = True) -> SDFamily:
    """Read `path`'s model_index.json (a folder or hub id) and return its family; with `check`, a
    ModelError names any component the family needs that the folder lacks."""
    from diffusers import DiffusionPipeline

    index = dict(DiffusionPipeline.load_config(path, **(options or {})))
    family = family_from_index(index, where=str(path))
    missing = family.missing_components() if check else []
    if check and not missing and Path(path).is_dir():
        # Listed in model_index.json but its folder is gone (a partial copy): name it before loading.
        missing = [n for n, entry in index.items() if _listed(entry) and not _has_files(Path(path) / n)]
    if missing:
        raise ModelError(
            f"{path} is a {family.pipeline_class_name} but lacks {', '.join(missing)}; "
            "pass a complete pipeline folder saved with save_pretrained"
        )
    return family


def _listed(entry: Any) -> bool:
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is not None


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() for p in folder.iterdir())


def family_of(obj: Any) -> SDFamily:
    """The family of a loaded pipeline (its config's `_class_name`) or of a components object/dict
    (its `family`; else SDXL when it has a second text encoder)."""
    family = obj.get("family") if isinstance(obj, dict) else getattr(obj, "family", None)
    if isinstance(family, SDFamily):
        return family
    config = getattr(obj, "config", None)
    if isinstance(config, dict) and config.get("_class_name") in families():
        return family_from_index(dict(config))
    if type(obj).__name__ in families():  # a loaded pipeline: its config lists its components
        return families()[type(obj).__name__](dict(config) if isinstance(config, dict) else None)
    has_second = obj.get("text_encoder_2") if isinstance(obj, dict) else getattr(obj, "text_encoder_2", None)
    return SDXLFamily() if has_second is not None else SDFamily()
