"""Stable Diffusion presets: the component configs of `tiny-sd`, `tiny-sdxl`, `sd15-arch` and `sdxl-arch`,
and how one is written.

Both are written as a standard diffusers folder (model_index.json + unet/ vae/ text_encoder/ tokenizer/
scheduler/) by `StableDiffusionPipeline.save_pretrained`, so they load through exactly the
`from_pretrained` code a real checkpoint goes through. `tiny-sd` keeps SD's shape (CLIP text encoder,
cross-attention UNet, VAE that downsamples 8x, PNDM scheduler as SD 1.5 ships) at a size that samples a
64x64 image in well under a second on a CPU; `sd15-arch` is SD 1.5's real architecture with random
weights, for GPU benchmarks only, and `sdxl-arch` SDXL base 1.0's (2.6B UNet), likewise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from raybooth.models.bpe import write_clip_tokenizer

# SD 1.5's scheduler_config.json: the noise schedule the UNet was trained with (used by both presets).
SD15_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
)


@dataclass(frozen=True)
class SDArchitecture:
    """Constructor kwargs of each component; the text encoder's token ids come from the tokenizer."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(SD15_SCHEDULER))
    text_encoder_2: dict[str, Any] | None = None  # SDXL's second (projecting) CLIP text encoder


TINY_SD = SDArchitecture(
    unet=dict(
        sample_size=8,  # latent side: 64 px / 8, so the pipeline's default size is 64x64
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,  # = text encoder hidden size, as in SD (768 = 768)
        attention_head_dim=4,  # diffusers' name for the number of heads in SD configs
        norm_num_groups=8,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        # Four blocks like SD's VAE, so latents are 8x smaller than images (vae_scale_factor = 8).
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    ),
    text_encoder=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,  # CLIP's context; the SD pipeline pads every prompt to it
        projection_dim=32,
    ),
)

SD15 = SDArchitecture(
    unet=dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
    ),
    text_encoder=dict(
        # CLIP ViT-L/14's text tower. The embedding keeps CLIP's 49408 rows although the offline
        # tokenizer uses fewer ids: the point is the real compute and memory, not the vocabulary.
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
    ),
)

# SDXL base's scheduler_config.json (Euler, "leading" spacing), minus keys Euler's constructor lacks.
SDXL_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    interpolation_type="linear",
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    use_karras_sigmas=False,
)

# SDXL's shape at tiny size, after diffusers' StableDiffusionXLPipeline get_dummy_components.
TINY_SDXL = SDArchitecture(
    unet=dict(
        sample_size=8,  # 64 px / 8
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),  # SDXL has no attention at full res
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",  # pooled text + size/crop micro-conditioning
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids x 8 + text_encoder_2's projection
        cross_attention_dim=64,  # both encoders' hidden states concatenated: 32 + 32
        norm_num_groups=8,
    ),
    vae={**TINY_SD.vae, "scaling_factor": 0.13025},  # SDXL's VAE scaling factor
    text_encoder={**TINY_SD.text_encoder, "num_hidden_layers": 3},  # SDXL reads the penultimate layer
    text_encoder_2={**TINY_SD.text_encoder, "num_hidden_layers": 3},
    scheduler=SDXL_SCHEDULER,
)

# SDXL base 1.0's real architecture (stabilityai/stable-diffusion-xl-base-1.0's configs), random weights:
# a 2.6B UNet, CLIP ViT-L and OpenCLIP ViT-bigG text towers, SD's VAE with SDXL's scale. GPU benchmarks.
SDXL_BASE = SDArchitecture(
    unet=dict(
        sample_size=128,  # 1024 px / 8
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        transformer_layers_per_block=(1, 2, 10),
        projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + bigG's 1280 projection
        cross_attention_dim=2048,  # 768 (CLIP-L) + 1280 (bigG) penultimate states
        norm_num_groups=32,
    ),
    vae={**SD15.vae, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    text_encoder=dict(SD15.text_encoder),  # CLIP ViT-L/14, as SD 1.5
    text_encoder_2=dict(  # OpenCLIP ViT-bigG/14's text tower with its projection
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=1280,
    ),
    scheduler=SDXL_SCHEDULER,
)

SD_ARCHITECTURES: dict[str, SDArchitecture] = {
    "tiny-sd": TINY_SD,
    "sd15-arch": SD15,
    "tiny-sdxl": TINY_SDXL,
    "sdxl-arch": SDXL_BASE,
}


def text_encoder_config(
    arch: SDArchitecture, tokenizer: CLIPTokenizer, settings: dict[str, Any] | None = None
) -> CLIPTextConfig:
    """The CLIP text config with the tokenizer's ids: CLIP pools the hidden state at the first EOS."""
    kwargs = {"vocab_size": len(tokenizer), **(settings or arch.text_encoder)}
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def build_unet(arch: SDArchitecture, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**arch.unet)


def build_vae(arch: SDArchitecture, seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**arch.vae)


def build_text_encoder(arch: SDArchitecture, tokenizer: CLIPTokenizer, seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(text_encoder_config(arch, tokenizer))


def write_sd_folder(dest: Path, arch: SDArchitecture, seed: int) -> None:
    """Write a complete diffusers Stable Diffusion folder for `arch` into `dest`."""
    # The tokenizer goes first, into its final subfolder: it writes CLIP's vocab.json + merges.txt,
    # which the pipeline's save below keeps (it only adds tokenizer.json/tokenizer_config.json).
    tokenizer = write_clip_tokenizer(dest / "tokenizer")
    pipeline = StableDiffusionPipeline(
        vae=build_vae(arch, seed),
        text_encoder=build_text_encoder(arch, tokenizer, seed),
        tokenizer=tokenizer,
        unet=build_unet(arch, seed),
        scheduler=PNDMScheduler(**arch.scheduler),
        # No safety checker: the standard way to ship a pipeline without one (model_index says null),
        # so loading needs no flag; real checkpoints keep theirs.
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(dest, safe_serialization=True)  # .safetensors, never pickles


def write_sdxl_folder(dest: Path, arch: SDArchitecture, seed: int) -> None:
    """Write a complete diffusers SDXL folder (two text encoders and tokenizers) for `arch` into `dest`."""
    assert arch.text_encoder_2 is not None
    tokenizer = write_clip_tokenizer(dest / "tokenizer")
    tokenizer_2 = write_clip_tokenizer(dest / "tokenizer_2")
    torch.manual_seed(seed + 1)  # the two encoders differ, as SDXL's do
    text_encoder_2 = CLIPTextModelWithProjection(text_encoder_config(arch, tokenizer_2, arch.text_encoder_2))
    pipeline = StableDiffusionXLPipeline(
        vae=build_vae(arch, seed),
        text_encoder=build_text_encoder(arch, tokenizer, seed),
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=build_unet(arch, seed),
        scheduler=EulerDiscreteScheduler(**arch.scheduler),
        add_watermarker=False,  # no invisible-watermark dependency; real SDXL folders decide for themselves
    )
    pipeline.save_pretrained(dest, safe_serialization=True)
