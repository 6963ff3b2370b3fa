"""The flow-matching diffusion families: SD3 / SD3.5 and Flux.1, on diffusion_family.SDFamily's interface.

    parts = load_sd_components("tiny-flux", device="cpu", models_dir=Path(".raybooth/models"))
    family = parts.family                                 # FluxFamily, from model_index.json's _class_name
    embeds = family.encode_prompts(parts.text_encoders, parts.tokenizers, ["a photo of sks dog"])
    latents = torch.randn(1, 16, 8, 8)                    # (N, C, h, w): 64 px through the 8x VAE
    velocity = family.denoise(parts.denoiser, latents, torch.tensor(500.0), embeds, guidance=torch.tensor([3.5]))

Both denoise with a transformer (component "transformer", not "unet"), are trained on the rectified-flow
objective (models/flow_matching.py) and sample with FlowMatchEulerDiscreteScheduler. Latents stay
(N, C, h, w) everywhere outside `denoise`: Flux's 2x2 packing into (N, h/2 * w/2, 4C) tokens happens
inside its `denoise`, which is exact because the scheduler's step and the MSE are elementwise.

SD3: two CLIPs (penultimate hidden states, concatenated and zero-padded to T5's width, then T5's
sequence appended; pooled = both projections concatenated) and batched classifier-free guidance. A
pipeline saved without text_encoder_3 (model_index null) gets zeros in T5's place, as diffusers does.
Flux.1: CLIP's pooled output and T5's sequence; no CFG pass: dev reads the guidance scale through its
guidance embedding, schnell (no guidance_embeds) ignores it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from raybooth.models.diffusion_family import PromptEmbeds, SDFamily, _device_of, tokenize
from raybooth.models.flow_matching import FlowBatch, FlowObjective, flow_matching_batch, timestep_density


def tokenize_to(tokenizer: Any, prompts: Sequence[str], length: int) -> torch.Tensor:
    """(N, length) ids padded/truncated to `length` (T5's max_sequence_length), as the pipelines do."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids


class FlowFamily(SDFamily):
    """What SD3 and Flux share: a transformer denoiser, the flow-matching objective, FlowMatch sampling."""

    denoiser_name = "transformer"
    denoiser_class = ""
    flow_matching = True
    supports_full_finetune = False  # LoRA only: a full copy of a 2-12B transformer is not what users train
    default_train_mode = "lora"
    export_kwargs: dict[str, Any] = {}
    max_sequence_length = 256  # the pipeline's default T5 length; training uses the same
    resolution_multiple = 16  # the 8x VAE, then 2x2 latent patches (SD3's patch_size, Flux's packing)

    def missing_components(self) -> list[str]:
        needed = ["transformer", "vae", "scheduler", *self.text_encoder_names, *self.tokenizer_names]
        return [n for n in needed if not (isinstance(self.index.get(n), list) and self.index[n][1])]

    def noise_scheduler(self, path: str, options: dict[str, Any]) -> Any:
        """The training scheduler: the folder's FlowMatchEulerDiscreteScheduler as constructed (its
        sigma table, shifted unless the config shifts per resolution); its timesteps are never set."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **options)

    def _t5_embeds(self, encoder: nn.Module, tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
        ids = tokenize_to(tokenizer, prompts, self.max_sequence_length).to(_device_of(encoder))
        return encoder(ids)[0]  # (N, L, D_t5)

    def latent_channels(self, denoiser: nn.Module) -> int:
        return denoiser.config.in_channels

    def size_multiple(self, vae_scale_factor: int, denoiser: nn.Module) -> int:
        return vae_scale_factor * denoiser.config.patch_size

    def training_noise(
        self,
        noise_scheduler: Any,
        latents: torch.Tensor,
        noise: torch.Tensor,
        generator: torch.Generator,
        objective: FlowObjective | None,
    ) -> FlowBatch:
        o = objective or FlowObjective()
        u = timestep_density(o.timestep_density, latents.shape[0], generator, o)
        return flow_matching_batch(noise_scheduler, latents, noise, u.to(latents.device))

    @staticmethod
    def training_target(
        noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: Any
    ) -> Any:
        return noise - latents  # the velocity from data to noise


class SD3Family(FlowFamily):
    """Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`): two CLIPs + optional T5, batched CFG."""

    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser_class = "SD3Transformer2DModel"
    all_slots = (
        ("text_encoder", "tokenizer", "CLIPTextModelWithProjection"),
        ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection"),
        ("text_encoder_3", "tokenizer_3", "T5EncoderModel"),
    )
    max_sequence_length = 256  # StableDiffusion3Pipeline's default
    lora_text_encoders = ("text_encoder", "text_encoder_2")  # the CLIPs; T5 stays frozen, as the script
    # LoRA on the image stream's attention, as train_dreambooth_lora_sd3.py's default.
    lora_targets = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"]

    def __init__(self, index: dict[str, Any] | None = None):
        super().__init__(index)
        entry = self.index.get("text_encoder_3")
        # Saved without T5 (model_index says [null, null]): the pipeline puts zeros where T5's states go.
        self.has_t5 = index is None or (isinstance(entry, list | tuple) and entry[1] is not None)
        self.text_encoder_slots = self.all_slots if self.has_t5 else self.all_slots[:2]
        self.t5_width: int | None = None  # the transformer's joint_attention_dim, once `bind` saw it

    def pipeline_load_kwargs(self) -> dict[str, Any]:
        # diffusers loads a folder saved without T5 only when told the components are None.
        return {} if self.has_t5 else {"text_encoder_3": None, "tokenizer_3": None}

    def encode_prompts(
        self, text_encoders: Sequence[nn.Module], tokenizers: Sequence[Any], prompts: Sequence[str]
    ) -> PromptEmbeds:
        clip_hidden, pooled = [], []
        for encoder, tokenizer in list(zip(text_encoders, tokenizers, strict=True))[:2]:
            out = encoder(tokenize(tokenizer, prompts).to(_device_of(encoder)), output_hidden_states=True)
            pooled.append(out[0])  # the projected pooled output, (N, P_i)
            clip_hidden.append(out.hidden_states[-2])  # penultimate layer, (N, 77, D_i)
        clip = torch.cat(clip_hidden, dim=-1)  # (N, 77, D_1 + D_2)
        if self.has_t5:
            t5 = self._t5_embeds(text_encoders[2], tokenizers[2], prompts)  # (N, L, D_t5)
        else:
            width = self.t5_width or clip.shape[-1]
            t5 = torch.zeros(
                len(prompts), self.max_sequence_length, width, dtype=clip.dtype, device=clip.device
            )
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # zero-pad to T5's width
        return PromptEmbeds(torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1))  # (N, 77+L, D), (N, P)

    def denoise(
        self,
        denoiser: nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: PromptEmbeds,
        time_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device=latents.device).expand(latents.shape[0])  # (N,) in [0, 1000]
        return denoiser(
            hidden_states=latents,
            timestep=t,
            encoder_hidden_states=embeds.hidden,
            pooled_projections=embeds.pooled,
            return_dict=False,
        )[0]

    def bind(self, denoiser: nn.Module) -> None:
        """Learn T5's width from the transformer when T5 is absent (zeros of joint_attention_dim)."""
        self.t5_width = denoiser.config.joint_attention_dim


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h/2 * w/2, 4C): Flux's 2x2 patches as tokens (FluxPipeline._pack_latents)."""
    n, c, h, w = latents.shape
    patches = latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack_latents`: (N, h/2 * w/2, 4C) -> (N, C, h, w)."""
    n, _, channels = tokens.shape
    patches = tokens.view(n, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(n, channels // 4, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(h/2 * w/2, 3) RoPE positions of the packed tokens: (0, row, column)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxFamily(FlowFamily):
    """Flux.1 dev / schnell (`FluxTransformer2DModel`): CLIP pooled + T5 sequence, packed latents."""

    name = "flux"
    pipeline_class_name = "FluxPipeline"
    denoiser_class = "FluxTransformer2DModel"
    text_encoder_slots = (
        ("text_encoder", "tokenizer", "CLIPTextModel"),
        ("text_encoder_2", "tokenizer_2", "T5EncoderModel"),
    )
    max_sequence_length = 512  # FluxPipeline's default
    uses_cfg = False  # dev's guidance is an input of the transformer; schnell takes none
    lora_text_encoders = ("text_encoder",)  # CLIP only, as FluxPipeline's LoRA loader; T5 stays frozen
    # train_dreambooth_lora_flux.py's default: both streams' attention and feed-forwards.
    lora_targets = [
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    ]  # fmt: skip

    def encode_prompts(
        self, text_encoders: Sequence[nn.Module], tokenizers: Sequence[Any], prompts: Sequence[str]
    ) -> PromptEmbeds:
        (clip, t5), (clip_tok, t5_tok) = text_encoders, tokenizers
        pooled = clip(tokenize(clip_tok, prompts).to(_device_of(clip))).pooler_output  # (N, D_clip)
        hidden = self._t5_embeds(t5, t5_tok, prompts)  # (N, L, D_t5)
        return PromptEmbeds(hidden, pooled.to(hidden.dtype))

    def latent_channels(self, denoiser: nn.Module) -> int:
        return denoiser.config.in_channels // 4  # the transformer reads 2x2 patches of them

    def size_multiple(self, vae_scale_factor: int, denoiser: nn.Module) -> int:
        return vae_scale_factor * 2

    @staticmethod
    def takes_guidance(denoiser: nn.Module) -> bool:
        inner = getattr(denoiser, "module", denoiser)  # through a DDP wrapper
        return bool(getattr(inner.config, "guidance_embeds", False))

    def set_timesteps(
        self, scheduler: Any, steps: int, device: torch.device, latent_hw: tuple[int, int]
    ) -> None:
        """FluxPipeline's schedule: sigmas 1 .. 1/steps, shifted by mu from the image's token count."""
        import numpy as np

        config = scheduler.config
        tokens = (latent_hw[0] // 2) * (latent_hw[1] // 2)
        base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        low, high = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        slope = (high - low) / (top - base)
        mu = tokens * slope + low - slope * base  # linear in the token count, as calculate_shift
        sigmas = None if config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)
        if sigmas is None:
            scheduler.set_timesteps(steps, device=device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)

    def denoise(
        self,
        denoiser: nn.Module,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: PromptEmbeds,
        time_ids: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n, _, h, w = latents.shape
        dtype = latents.dtype
        t = torch.as_tensor(timesteps, device=latents.device).expand(n).to(dtype)
        if guidance is not None:  # Flux.1-dev (callers ask `takes_guidance`); schnell takes none
            guidance = torch.as_tensor(guidance, device=latents.device, dtype=torch.float32).expand(n)
        out = denoiser(
            hidden_states=pack_latents(latents),
            timestep=t / 1000,  # Flux's transformer takes t in [0, 1]
            guidance=guidance,
            pooled_projections=embeds.pooled,
            encoder_hidden_states=embeds.hidden,
            txt_ids=torch.zeros(embeds.hidden.shape[1], 3, device=latents.device, dtype=dtype),
            img_ids=image_ids(h, w, latents.device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)


FLOW_FAMILIES: dict[str, type[SDFamily]] = {f.pipeline_class_name: f for f in (SD3Family, FluxFamily)}
