"""The final DreamBooth export loads in plain diffusers exactly as README shows, and serving picks its weights.

    .venv/bin/python -m pytest tests/models/test_export.py

A full fine-tune is exported as diffusers publishes checkpoints: fp32 weights plus an `fp16` variant.
The README's CPU call, `StableDiffusionPipeline.from_pretrained(folder)`, must give one dtype everywhere
and draw an image (an fp16-only export mixed fp16 text encoder with fp32 UNet and failed with "mat1 and
mat2 must have the same dtype"); the GPU call reads the fp16 files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from raybooth.models.checkpoint import save_full_pipeline
from raybooth.models.loaders import load_sd_components, load_sd_pipeline
from raybooth.serving.image_models import ImageModelStore

PARTS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}


def export_tiny_sd(tiny_sd_path: Path, folder: Path, fp16_variant: bool) -> Path:
    """tiny-sd exported the way `export_final_model` exports a full fine-tune, with the sampler it ships."""
    components = load_sd_components(str(tiny_sd_path), device="cpu")
    scheduler = load_sd_pipeline(str(tiny_sd_path), device="cpu").scheduler
    return save_full_pipeline(folder, components, scheduler, fp16_variant=fp16_variant)


@pytest.fixture(scope="module")
def exported(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_tiny_sd(tiny_sd_path, tmp_path_factory.mktemp("export") / "model", fp16_variant=True)


def stored_dtypes(folder: Path, suffix: str) -> dict[str, set[torch.dtype]]:
    return {
        part: {t.dtype for t in load_file(str(folder / part / f"{stem}{suffix}.safetensors")).values()}
        for part, stem in PARTS.items()
    }


def test_main_weights_are_fp32_and_the_fp16_variant_is_fp16(exported):
    assert stored_dtypes(exported, "") == {part: {torch.float32} for part in PARTS}
    assert stored_dtypes(exported, ".fp16") == {part: {torch.float16} for part in PARTS}


def test_readme_cpu_call_loads_one_dtype_and_draws_an_image(exported):
    folder = exported
    # README, "load the exported model", CPU line, as written:
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    image = pipe(
        "a photo of sks dog", height=64, width=64, num_inference_steps=2, generator=torch.manual_seed(0)
    ).images[0]
    pixels = np.asarray(image)
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0  # an image, not a blank or a NaN-black frame


def test_readme_gpu_call_reads_the_fp16_variant(exported):
    folder = exported
    # README, GPU line (loading only: a CPU has no fp16 kernels worth sampling with):
    pipe = StableDiffusionPipeline.from_pretrained(folder, variant="fp16", dtype=torch.float16)
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float16}
    full = StableDiffusionPipeline.from_pretrained(folder)
    ref, half = full.unet.conv_in.weight, pipe.unet.conv_in.weight
    assert torch.equal(half, ref.to(torch.float16))  # the same weights, rounded once


def test_an_fp32_only_export_has_no_variant_files(tiny_sd_path, tmp_path):
    folder = export_tiny_sd(tiny_sd_path, tmp_path / "model", fp16_variant=False)
    assert not list(folder.rglob("*.fp16.safetensors"))
    assert stored_dtypes(folder, "") == {part: {torch.float32} for part in PARTS}


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("auto", (None, None)), ("float32", ("float32", None)), ("float16", ("float16", "fp16"))],
)
def test_serving_on_cpu_reads_fp32_unless_fp16_is_asked(exported, dtype, expected):
    store = ImageModelStore([], "tiny-sd", device="cpu", dtype=dtype)
    assert store.weights_for(exported) == expected


def test_serving_reads_fp32_where_a_folder_has_no_fp16_variant(tiny_sd_path):
    store = ImageModelStore([], "tiny-sd", device="cpu", dtype="float16")
    assert store.weights_for(tiny_sd_path) == ("float16", None)


def test_serving_store_loads_the_fp16_variant_when_asked(exported):
    from raybooth.serving.image_models import Located

    store = ImageModelStore([], "tiny-sd", device="cpu", dtype="float16")
    model = store.load(Located("subject", exported, "subject/1", floating=False))
    assert model.pipeline.unet.dtype == torch.float16 and model.pipeline.text_encoder.dtype == torch.float16


@pytest.mark.gpu
def test_serving_on_a_gpu_reads_the_fp16_variant_by_default(exported):
    store = ImageModelStore([], "tiny-sd", device="cuda", dtype="auto")
    assert store.weights_for(exported) == ("float16", "fp16")
    from raybooth.serving.image_models import Located

    model = store.load(Located("subject", exported, "subject/1", floating=False))
    image = model.pipeline("a dog", height=64, width=64, num_inference_steps=2).images[0]
    assert np.asarray(image).std() > 0
