"""Presets of the flow-matching families: `tiny-sd3`, `tiny-flux` and `flux-arch` (FLUX.1-dev's real
architecture, random bf16 weights, GPU benchmarks only), and the offline T5 tokenizer they use.

    build_preset("tiny-flux", Path(".raybooth/models/tiny-flux"))   # via raybooth.models.presets
    write_flux_folder(Path("/tmp/tiny-flux"), seed=0)                # the same, without the marker

Each is written by its diffusers pipeline class's `save_pretrained` (model_index.json + transformer/ vae/
text_encoder*/ tokenizer*/ scheduler/), so it loads through exactly the `from_pretrained` code a real
SD3 or Flux.1 checkpoint goes through. The shapes follow diffusers' own test components at a size that
samples a 64x64 image in about a second on a CPU: an 8x VAE with 16 latent channels as SD3 and Flux
ship, a one-block transformer, two CLIPs (SD3) or one (Flux), and a two-layer T5 encoder whose width
is the transformer's joint_attention_dim. tiny-flux is dev-shaped (guidance embedding on).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5Tokenizer

from raybooth.models.bpe import CORPUS, write_clip_tokenizer
from raybooth.models.sd_presets import SD15, TINY_SD, SDArchitecture, text_encoder_config

# VAE shaped as SD3's and Flux's (16 latent channels, no quant convs), tiny; scale/shift set per family.
TINY_FLOW_VAE: dict[str, Any] = {
    **TINY_SD.vae,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
TINY_CLIP: dict[str, Any] = {**TINY_SD.text_encoder, "num_hidden_layers": 3}  # SD3 reads the penultimate
T5_WIDTH = 64  # T5's d_model = the transformer's joint_attention_dim (>= the two CLIPs' 32 + 32)
TINY_T5: dict[str, Any] = dict(d_model=T5_WIDTH, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
                               relative_attention_num_buckets=8, relative_attention_max_distance=32)  # fmt: skip

TINY_SD3_TRANSFORMER: dict[str, Any] = dict(
    sample_size=8,  # 64 px / 8
    patch_size=2,  # as SD3: 2x2 latent patches, 16 tokens at 64 px
    in_channels=16,
    out_channels=16,
    num_layers=1,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=T5_WIDTH,
    caption_projection_dim=32,
    pooled_projection_dim=64,  # both CLIP projections concatenated: 32 + 32
    pos_embed_max_size=16,
)
TINY_FLUX_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels x a 2x2 patch, as Flux.1
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=T5_WIDTH,
    pooled_projection_dim=32,  # CLIP's pooled output
    guidance_embeds=True,  # Flux.1-dev's distilled guidance
    axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
)
# The schedulers the real checkpoints ship (SD3 medium; FLUX.1-dev, which shifts by resolution).
SD3_SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
    base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
)  # fmt: skip


@dataclass(frozen=True)
class FluxArchitecture:
    """Constructor kwargs of a Flux.1 pipeline's parts, and the dtype its weights are saved in."""

    transformer: dict[str, Any]
    vae: dict[str, Any]
    clip: dict[str, Any]
    t5: dict[str, Any]
    dtype: torch.dtype = torch.float32


TINY_FLUX = FluxArchitecture(
    transformer=TINY_FLUX_TRANSFORMER,
    vae={**TINY_FLOW_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159},  # FLUX.1's VAE constants
    clip=TINY_CLIP,
    t5=TINY_T5,
)
# FLUX.1-dev's real architecture (black-forest-labs/FLUX.1-dev's configs) with random weights, saved in
# bf16 as the checkpoint ships (~34 GB on disk): an 11.9B transformer, T5-v1.1-XXL's encoder (4.8B),
# CLIP ViT-L/14 and the 16-channel VAE. GPU benchmarks only.
FLUX_DEV = FluxArchitecture(
    transformer=dict(
        patch_size=1,
        in_channels=64,
        num_layers=19,  # double-stream (MMDiT) blocks
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,  # T5-XXL's width
        pooled_projection_dim=768,  # CLIP-L's pooled output
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
    vae=dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=1024,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    ),
    clip=dict(SD15.text_encoder),  # CLIP ViT-L/14's text tower (49408-row embedding kept)
    t5=dict(  # T5-v1.1-XXL's encoder; the embedding keeps its 32128 rows although the offline tokenizer uses fewer
        vocab_size=32128,
        d_model=4096,
        d_ff=10240,
        d_kv=64,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
    ),
    dtype=torch.bfloat16,
)


def write_t5_tokenizer(dest: Path) -> T5Tokenizer:
    """A SentencePiece-style unigram T5 tokenizer learned from `CORPUS`: <pad>=0, </s>=1, <unk>=2, then
    one "▁word" piece per corpus word (scored by frequency) and every character, so any text encodes."""
    words = Counter(re.findall(r"[\w']+|[^\w\s]", CORPUS.lower()))
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(f"▁{w}", -1.0 / (1 + n)) for w, n in sorted(words.items())]  # whole words beat characters
    vocab += [(c, -10.0) for c in chars if f"▁{c}" not in dict(vocab)]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(dest)
    return tokenizer


def t5_encoder(tokenizer: T5Tokenizer, seed: int, settings: dict[str, Any] | None = None) -> T5EncoderModel:
    torch.manual_seed(seed)
    kwargs = {"vocab_size": len(tokenizer), **(settings or TINY_T5)}
    config = T5Config(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **kwargs)
    return T5EncoderModel(config)


def _clip_arch(settings: dict[str, Any] | None = None) -> SDArchitecture:
    return SDArchitecture(unet={}, vae={}, text_encoder=settings or TINY_CLIP)


def _vae(seed: int, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_FLOW_VAE, scaling_factor=scaling_factor, shift_factor=shift_factor)


def write_sd3_folder(dest: Path, seed: int) -> None:
    """Write a complete diffusers StableDiffusion3Pipeline folder (two CLIPs + T5) into `dest`."""
    toks = [write_clip_tokenizer(dest / name) for name in ("tokenizer", "tokenizer_2")]
    encoders = []
    for i, (cls, tok) in enumerate(zip((CLIPTextModelWithProjection,) * 2, toks, strict=True)):
        torch.manual_seed(seed + i)  # the two CLIPs differ, as SD3's do
        encoders.append(cls(text_encoder_config(_clip_arch(), tok)))
    t5_tok = write_t5_tokenizer(dest / "tokenizer_3")
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**TINY_SD3_TRANSFORMER)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=_vae(seed, scaling_factor=1.5305, shift_factor=0.0609),  # SD3's VAE constants
        text_encoder=encoders[0],
        tokenizer=toks[0],
        text_encoder_2=encoders[1],
        tokenizer_2=toks[1],
        text_encoder_3=t5_encoder(t5_tok, seed + 2),
        tokenizer_3=t5_tok,
    )
    pipeline.save_pretrained(dest, safe_serialization=True)


def write_flux_folder(dest: Path, seed: int, arch: FluxArchitecture = TINY_FLUX) -> None:
    """Write a complete diffusers FluxPipeline folder (CLIP + T5, dev-shaped transformer) into `dest`."""
    clip_tok = write_clip_tokenizer(dest / "tokenizer")
    torch.manual_seed(seed)
    clip = CLIPTextModel(text_encoder_config(_clip_arch(arch.clip), clip_tok))
    t5_tok = write_t5_tokenizer(dest / "tokenizer_2")
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**arch.transformer)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**arch.vae)
    pipeline = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5_encoder(t5_tok, seed + 1, arch.t5),
        tokenizer_2=t5_tok,
    )
    if arch.dtype != torch.float32:
        pipeline.to(arch.dtype)  # flux-arch: bf16 on disk, as FLUX.1-dev ships (half of fp32's 68 GB)
    pipeline.save_pretrained(dest, safe_serialization=True)


def write_flux_arch_folder(dest: Path, seed: int) -> None:
    write_flux_folder(dest, seed, FLUX_DEV)


WRITERS = {"tiny-sd3": write_sd3_folder, "tiny-flux": write_flux_folder, "flux-arch": write_flux_arch_folder}
