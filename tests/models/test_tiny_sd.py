"""tiny-sd: a real diffusers folder that samples 64x64 images and feeds a DreamBooth-style step."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, CLIPTokenizerFast

from raybooth.cluster.workdir import default_models_dir
from raybooth.errors import ModelError
from raybooth.models import load_sd_components, load_sd_pipeline


def sample(pipe: StableDiffusionPipeline, seed: int = 0) -> np.ndarray:
    images = pipe(
        "a photo of sks dog",
        height=64,
        width=64,
        num_inference_steps=3,
        generator=torch.Generator("cpu").manual_seed(seed),
    ).images
    assert len(images) == 1 and isinstance(images[0], Image.Image) and images[0].size == (64, 64)
    return np.asarray(images[0])


def test_loads_with_plain_diffusers_and_samples_deterministically(tiny_sd_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None and pipe.vae_scale_factor == 8
    first, again, other = sample(pipe, 0), sample(pipe, 0), sample(pipe, 1)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.std() > 1.0  # an image, not a constant fill


def test_load_sd_pipeline_puts_it_on_the_device_in_the_dtype(tiny_sd_path):
    pipe = load_sd_pipeline("tiny-sd", device="cpu", models_dir=default_models_dir())
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32
    assert np.array_equal(sample(pipe), sample(load_sd_pipeline(str(tiny_sd_path), device="cpu")))
    assert load_sd_pipeline(str(tiny_sd_path), device="cpu", dtype="bf16").unet.dtype == torch.bfloat16


def test_components_load_from_subfolders_and_fit_together(tiny_sd_path):
    parts = load_sd_components(str(tiny_sd_path), device="cpu")
    assert isinstance(parts.unet, UNet2DConditionModel)
    assert isinstance(parts.vae, AutoencoderKL)
    assert isinstance(parts.text_encoder, CLIPTextModel)
    assert isinstance(parts.tokenizer, CLIPTokenizer)
    assert isinstance(parts.noise_scheduler, DDPMScheduler)
    assert parts.noise_scheduler.config.num_train_timesteps == 1000
    assert parts.path == str(tiny_sd_path)

    # One DreamBooth forward at 32 px: image → latents → noisy latents → UNet predicts the noise's shape.
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1  # (B, 3, H, W) in [-1, 1]
    with torch.no_grad():
        latents = parts.vae.encode(pixels).latent_dist.sample() * parts.vae.config.scaling_factor
        ids = parts.tokenizer(
            ["a photo of sks dog"] * 2,
            padding="max_length",
            max_length=77,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        text = parts.text_encoder(ids)[0]  # (B, 77, 32)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (2,))
        noisy = parts.noise_scheduler.add_noise(latents, noise, t)
        pred = parts.unet(noisy, t, encoder_hidden_states=text).sample
    assert latents.shape == (2, 4, 4, 4)  # 32 px / 8
    assert text.shape == (2, 77, parts.unet.config.cross_attention_dim)
    assert pred.shape == noise.shape


def test_clip_tokenizer_is_offline_clip_bpe(tiny_sd_path):
    folder = tiny_sd_path / "tokenizer"
    assert (folder / "merges.txt").read_text().startswith("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    assert isinstance(CLIPTokenizerFast.from_pretrained(folder), CLIPTokenizer)  # one class in transformers 5
    assert isinstance(AutoTokenizer.from_pretrained(folder), CLIPTokenizer)

    for word in ("photo", "sks", "dog", "cat"):
        assert tokenizer.tokenize(word) == [f"{word}</w>"]  # common words are single tokens
    ids = tokenizer("A photo of sks dog").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of sks dog"  # CLIP lowercases
    odd = "zebra-42 naïve ✓"
    assert tokenizer.decode(tokenizer(odd).input_ids, skip_special_tokens=True) == "zebra - 4 2 naïve ✓"

    padded = tokenizer("a cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert tokenizer.model_max_length == 77 and len(padded) == 77
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # as in SD's tokenizer


def test_sd_load_errors_name_the_fix(tiny_sd_path, tiny_vlm_path, tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="not a Stable Diffusion pipeline folder \\(no model_index.json\\)"):
        load_sd_pipeline(str(tiny_vlm_path))

    broken = shutil.copytree(tiny_sd_path, tmp_path / "broken")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelError, match=f"cannot load the Stable Diffusion pipeline in {broken}"):
        load_sd_pipeline(str(broken), device="cpu")

    from raybooth.models import loaders

    monkeypatch.setattr(loaders, "hub_reachable", lambda: False)  # as on an air-gapped machine
    with pytest.raises(ModelError, match="cannot be reached from here.*--local-dir"):
        load_sd_pipeline("raybooth-tests/not-a-model", device="cpu")


def test_clip_vocab_and_merges_files_alone_make_the_same_tokenizer(tiny_sd_path, tmp_path):
    # What older transformers (the slow CLIPTokenizer) and other CLIP tools read: vocab.json + merges.txt.
    only_bpe = tmp_path / "tok"
    only_bpe.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(tiny_sd_path / "tokenizer" / name, only_bpe / name)
    text = "a close up photo of sks cat, 4k"
    full = CLIPTokenizer.from_pretrained(tiny_sd_path / "tokenizer")
    assert CLIPTokenizer.from_pretrained(only_bpe)(text).input_ids == full(text).input_ids
