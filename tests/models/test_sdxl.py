"""SDXL through the family abstraction on tiny-sdxl, no Ray: detection, the sampler against diffusers'
own StableDiffusionXLPipeline (full and LoRA), micro-conditioning as diffusers' SDXL DreamBooth script
computes it, the train step (LoRA and full, prior preservation on), and exports diffusers loads.

    .venv/bin/python -m pytest tests/models/test_sdxl.py
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from torch import nn

from raybooth.cli import main
from raybooth.cluster.workdir import default_models_dir
from raybooth.errors import ModelError
from raybooth.models import checkpoint as ckpt
from raybooth.models.device import make_grad_scaler, resolve_precision
from raybooth.models.diffusion_family import SDFamily, SDXLFamily, detect_family
from raybooth.models.dreambooth import (
    EncodingCache,
    StepSettings,
    make_lr_scheduler,
    make_optimizer,
    prepare_for_training,
    train_step,
)
from raybooth.models.dreambooth_data import DreamBoothData, Example, load_example
from raybooth.models.loaders import load_sd_components, load_sd_pipeline, sd_family
from raybooth.models.presets import build_preset, resolve_model
from raybooth.models.sampling import sample_images
from raybooth.samples import draw_sample_image, png_bytes

RES = 32  # 4x4 latents: the smallest size tiny-sdxl's UNet (one downsample) trains at
FP32 = resolve_precision("no", "cpu")
KW = dict(height=64, width=64, num_inference_steps=4)
PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def tiny_sdxl_path() -> Path:
    return Path(resolve_model("tiny-sdxl", models_dir=default_models_dir()))


@pytest.fixture(scope="module")
def pipe(tiny_sdxl_path) -> StableDiffusionXLPipeline:
    return load_sd_pipeline(str(tiny_sdxl_path), device="cpu")


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def make_data(random_flip: bool = False, center_crop: bool = True) -> DreamBoothData:
    def example(i: int, prompt: str) -> Example:
        return load_example(png_bytes(draw_sample_image(i, size=40)), f"img{i}", prompt, 0, RES)

    instance = [example(i, PROMPT) for i in range(2)]
    classes = [[example(100 + i, "a photo of dog") for i in range(2)]]
    return DreamBoothData(instance, classes, RES, center_crop=center_crop, random_flip=random_flip, seed=0)


def make_models(train_mode: str, train_text_encoder: bool = False):
    components = load_sd_components("tiny-sdxl", device="cpu", models_dir=default_models_dir())
    return prepare_for_training(
        components, train_mode=train_mode, train_text_encoder=train_text_encoder, plan=FP32, lora_rank=4
    )


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


def overfit(models, data, steps: int, lr: float) -> list[float]:
    optimizer = make_optimizer(models, lr, lr)
    lr_scheduler, scaler = make_lr_scheduler(optimizer, 0), make_grad_scaler(FP32)
    # The same step index every time: the same rows, noise and timesteps, i.e. one fixed batch.
    return [
        train_step(models, optimizer, lr_scheduler, scaler, FP32, data, None, StepSettings(), 0).loss
        for _ in range(steps)
    ]


# --------------------------------------------------------------------------------------------------
# Detection and refusals
# --------------------------------------------------------------------------------------------------


def test_family_comes_from_model_index(tiny_sd_path, tiny_sdxl_path):
    assert type(detect_family(str(tiny_sd_path))) is SDFamily
    assert type(sd_family("tiny-sdxl", models_dir=default_models_dir())) is SDXLFamily


def test_tiny_sdxl_builds_the_same_bytes_from_the_same_seed(tiny_sdxl_path, tmp_path):
    def hashes(folder: Path) -> dict[str, str]:
        files = sorted(folder.rglob("*.safetensors"))
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    again = build_preset("tiny-sdxl", tmp_path / "again", seed=0)
    assert len(hashes(again)) == 4 and hashes(again) == hashes(tiny_sdxl_path)  # unet, vae, 2 encoders
    other = build_preset("tiny-sdxl", tmp_path / "other", seed=1)
    assert (
        hashes(other)["unet/diffusion_pytorch_model.safetensors"]
        != hashes(again)["unet/diffusion_pytorch_model.safetensors"]
    )


def _copy_with_index(src: Path, dest: Path, **changes) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("raybooth_preset.json"))
    index = json.loads((dest / "model_index.json").read_text())
    index.update(changes)
    (dest / "model_index.json").write_text(json.dumps(index))
    return dest


def test_unknown_pipeline_class_names_the_supported_families(tiny_sdxl_path, tmp_path):
    folder = _copy_with_index(tiny_sdxl_path, tmp_path / "sana", _class_name="SanaPipeline")
    with pytest.raises(ModelError, match=r"SanaPipeline.*supported families: sd .*sdxl.*sd3.*flux"):
        sd_family(str(folder))


def test_sdxl_folder_without_its_second_text_encoder_is_refused(tiny_sdxl_path, tmp_path):
    folder = _copy_with_index(tiny_sdxl_path, tmp_path / "half", text_encoder_2=[None, None])
    with pytest.raises(ModelError, match="lacks text_encoder_2"):
        load_sd_components(str(folder), device="cpu")


def test_a_flow_matching_scheduler_is_refused_not_turned_into_ddpm(tiny_sdxl_path, tmp_path):
    folder = _copy_with_index(tiny_sdxl_path, tmp_path / "flow")
    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="FlowMatchEulerDiscreteScheduler.*not trained with"):
        load_sd_components(str(folder), device="cpu")


def test_cli_train_with_an_unsupported_pipeline_exits_2_in_one_line(tiny_sdxl_path, tmp_path, capsys):
    folder = _copy_with_index(tiny_sdxl_path, tmp_path / "sana", _class_name="SanaPipeline")
    config = Path(__file__).parents[2] / "configs" / "dreambooth.yaml"
    # No Ray is running in this test process: the refusal must come before a cluster would start.
    assert main(["train", "--config", str(config), f"base_model={folder}"]) == 2
    err = capsys.readouterr().err
    assert "SanaPipeline" in err and "sdxl" in err and "flux" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------------------
# The oracle: raybooth's sampler draws what StableDiffusionXLPipeline draws
# --------------------------------------------------------------------------------------------------


def _theirs(pipe, negative, guidance_scale, seed):
    generator = [torch.Generator().manual_seed(seed)]
    out = pipe(PROMPT, negative_prompt=negative, generator=generator, guidance_scale=guidance_scale, **KW)
    return out.images[0]


@pytest.mark.parametrize(("negative", "guidance_scale"), [(None, 5.0), ("blurry", 5.0), (None, 1.0)])
def test_sampler_matches_the_sdxl_pipeline(pipe, negative, guidance_scale):
    negatives = None if negative is None else [negative]
    ours = sample_images(pipe, [PROMPT], negatives, guidance_scale=guidance_scale, seeds=[3], **KW)[0]
    theirs = _theirs(pipe, negative, guidance_scale, 3)
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1
    assert pixels(ours).std() > 1  # a real image, not a constant


def test_sampler_batches_sdxl_rows_like_single_ones(pipe):
    batch = sample_images(pipe, [PROMPT, "a cat"], guidance_scale=5.0, seeds=[1, 2], **KW)
    alone = sample_images(pipe, ["a cat"], guidance_scale=5.0, seeds=[2], **KW)[0]
    assert np.abs(pixels(batch[1]) - pixels(alone)).max() <= 1
    assert not np.array_equal(pixels(batch[0]), pixels(batch[1]))


# --------------------------------------------------------------------------------------------------
# Micro-conditioning, as train_dreambooth_lora_sdxl.py computes it
# --------------------------------------------------------------------------------------------------


def test_time_ids_are_the_real_original_size_and_crop():
    wide = load_example(png_bytes(draw_sample_image(7, size=40).resize((80, 48))), "w", PROMPT, 0, RES)
    data = DreamBoothData([wide], None, RES, center_crop=False, random_flip=True, seed=0)
    seen_flips = set()
    for step in range(12):
        (view,) = data.select(step, 0, 0, 1, 1, 1)
        seen_flips.add(view.flip)
        # The script: original_size before resize; flip the resized image, then crop at (y1, x1).
        resized = wide.pixels  # (3, 32, 53): shorter side to RES, as its train_resize does
        image = resized.flip(-1) if view.flip else resized
        cond = data.size_condition(view)
        y1, x1 = cond[2], cond[3]
        script_crop = image[:, y1 : y1 + RES, x1 : x1 + RES].float() / 127.5 - 1
        assert torch.equal(script_crop, data.pixels_of(view))  # the coords name the pixels trained on
        assert cond[:2] == (48, 80) and cond[4:] == (RES, RES)
    assert seen_flips == {False, True}


def test_train_step_feeds_each_rows_time_ids_to_the_unet():
    models = make_models("lora")
    data = make_data(random_flip=True, center_crop=False)
    seen = {}

    def record(module, args, kwargs):
        seen.update(kwargs["added_cond_kwargs"])

    models.unet.register_forward_pre_hook(record, with_kwargs=True)
    overfit(models, data, 1, 1e-3)
    views = data.select(0, 0, 0, 1, 1, 1)
    expected = torch.tensor(data.size_conditions(views), dtype=torch.float32)
    assert torch.equal(seen["time_ids"], expected)
    assert seen["text_embeds"].shape == (len(views), 32)  # text_encoder_2's pooled projection


# --------------------------------------------------------------------------------------------------
# Training and what it exports
# --------------------------------------------------------------------------------------------------


def test_cached_sdxl_embeddings_and_latents_give_the_uncached_loss():
    data = make_data()
    plain, cached = make_models("lora"), make_models("lora")
    cache = EncodingCache.build(cached, data)
    assert next(iter(cache.embeddings.values())).pooled is not None  # the pooled projection is cached too
    optimizer = make_optimizer(plain, 1e-3)
    a = train_step(plain, optimizer, make_lr_scheduler(optimizer, 0), make_grad_scaler(FP32), FP32, data, None,
                   StepSettings(), 0)  # fmt: skip
    optimizer = make_optimizer(cached, 1e-3)
    b = train_step(cached, optimizer, make_lr_scheduler(optimizer, 0), make_grad_scaler(FP32), FP32, data, cache,
                   StepSettings(), 0)  # fmt: skip
    assert abs(a.loss - b.loss) < 1e-4 * max(1.0, a.loss)


def test_lora_learns_changes_only_adapters_and_loads_with_load_lora_weights(pipe, tmp_path):
    models = make_models("lora", train_text_encoder=True)
    encoders = {
        "unet": models.unet,
        "text_encoder": models.text_encoder,
        "text_encoder_2": models.text_encoder_2,
    }
    before = {name: snapshot(m) for name, m in encoders.items()}
    vae = snapshot(models.vae)
    losses = overfit(models, make_data(), 25, 1e-2)
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    for name, module in encoders.items():
        moved = changed(before[name], module)
        assert moved and all("lora_" in n for n in moved), name
    assert not changed(vae, models.vae)

    ckpt.save_lora_weights(
        tmp_path, models.unet, models.text_encoder, "tiny-sdxl",
        text_encoder_2=models.text_encoder_2, family=models.family,
    )  # fmt: skip
    base = sample_images(pipe, [PROMPT], guidance_scale=5.0, seeds=[4], **KW)[0]
    pipe.load_lora_weights(str(tmp_path), weight_name=ckpt.LORA_WEIGHTS, adapter_name="subject")
    try:
        ours = sample_images(pipe, [PROMPT], guidance_scale=5.0, seeds=[4], **KW)[0]
        theirs = _theirs(pipe, None, 5.0, 4)
    finally:
        pipe.delete_adapters("subject")
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1  # the oracle, with the LoRA on
    assert not np.array_equal(pixels(ours), pixels(base))  # all three adapters loaded and matter
    assert np.isfinite(pixels(ours)).all() and pixels(ours).std() > 1


def test_full_finetune_learns_and_exports_a_pipeline_diffusers_loads(tiny_sdxl_path, tmp_path):
    models = make_models("full")
    unet, te, te2 = snapshot(models.unet), snapshot(models.text_encoder), snapshot(models.text_encoder_2)
    losses = overfit(models, make_data(), 25, 2e-3)
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    assert changed(unet, models.unet)
    assert not changed(te, models.text_encoder) and not changed(te2, models.text_encoder_2)

    scheduler = models.family.inference_scheduler(str(tiny_sdxl_path))
    ckpt.save_full_pipeline(tmp_path, models, scheduler, fp16_variant=False)
    loaded = DiffusionPipeline.from_pretrained(tmp_path)
    assert type(loaded) is StableDiffusionXLPipeline
    assert torch.equal(loaded.unet.conv_in.weight, models.unet.conv_in.weight)
    ours = sample_images(loaded, [PROMPT], guidance_scale=5.0, seeds=[0], **KW)[0]
    theirs = _theirs(loaded, None, 5.0, 0)
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1
    assert pixels(ours).std() > 1
