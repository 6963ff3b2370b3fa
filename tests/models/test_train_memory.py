"""Memory features of DreamBooth training, no Ray: frozen text encoders freed after encoding (the same
loss and validation images), the precision each family trains in by default, 8-bit Adam's refusals,
gradient checkpointing in the transformer denoisers.

    .venv/bin/python -m pytest tests/models/test_train_memory.py
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np
import pytest

from raybooth.cli import main
from raybooth.cluster.workdir import default_models_dir
from raybooth.errors import ModelError
from raybooth.models import device as device_module
from raybooth.models import train_memory
from raybooth.models.device import make_grad_scaler, resolve_precision
from raybooth.models.diffusion_family import SDFamily
from raybooth.models.dreambooth import (
    StepSettings,
    make_lr_scheduler,
    make_optimizer,
    prepare_for_training,
    train_step,
)
from raybooth.models.dreambooth_data import DreamBoothData, load_example
from raybooth.models.flow_family import FluxFamily, SD3Family
from raybooth.models.loaders import load_sd_components
from raybooth.models.presets import resolve_model
from raybooth.models.sampling import sample_images
from raybooth.models.train_memory import RecordedTextEncoder, free_frozen_text_encoders, training_precision
from raybooth.samples import draw_sample_image, png_bytes

FP32 = resolve_precision("no", "cpu")
RES = 32
PROMPT = "a photo of sks dog"
CONFIG = Path(__file__).parents[2] / "configs" / "dreambooth.yaml"


@pytest.fixture(scope="module")
def folders() -> dict[str, str]:
    return {
        n: resolve_model(n, models_dir=default_models_dir()) for n in ("tiny-sd3", "tiny-flux", "tiny-sdxl")
    }


def make_data() -> DreamBoothData:
    def example(i: int, prompt: str):
        return load_example(png_bytes(draw_sample_image(i, size=40)), f"img{i}", prompt, 0, RES)

    instance = [example(i, PROMPT) for i in range(2)]
    classes = [[example(100 + i, "a photo of dog") for i in range(2)]]
    return DreamBoothData(instance, classes, RES, center_crop=True, random_flip=False, seed=0)


def setup_models(folder: str, train_text_encoder: bool, free: bool, **kw):
    """The train models as the worker sets them up; with `free`, the frozen encoders replaced by replays."""
    components = load_sd_components(folder, device="cpu")
    models = prepare_for_training(
        components, train_mode="lora", train_text_encoder=train_text_encoder, plan=FP32, **kw
    )
    t5_name = models.family.text_encoder_names[-1]
    t5 = weakref.ref(getattr(models, t5_name))
    del components  # the worker drops its loaded components too
    freed = free_frozen_text_encoders(models, [*make_data().all_prompts(), PROMPT, ""], FP32) if free else []
    return models, freed, t5


def one_step(models) -> float:
    optimizer = make_optimizer(models, 1e-3, 1e-3 if models.train_text_encoder else None)
    lr_scheduler, scaler = make_lr_scheduler(optimizer, 0), make_grad_scaler(FP32)
    return train_step(
        models, optimizer, lr_scheduler, scaler, FP32, make_data(), None, StepSettings(), 0
    ).loss


def draw(models) -> np.ndarray:
    parts = {
        n: getattr(models, n) for n in [*models.family.text_encoder_names, *models.family.tokenizer_names]
    }
    parts.update(
        denoiser=models.denoiser, vae=models.vae, family=models.family, scheduler=models.noise_scheduler
    )
    parts[models.family.denoiser_name] = models.denoiser
    image = sample_images(
        parts, [PROMPT], height=64, width=64, num_inference_steps=2, guidance_scale=4.0, seeds=[1]
    )
    return np.asarray(image[0], dtype=np.float32)


@pytest.mark.parametrize(
    ("model", "train_text_encoder", "expected_freed"),
    [
        ("tiny-flux", False, ["text_encoder", "text_encoder_2"]),  # CLIP and T5: nothing trains
        ("tiny-sd3", True, ["text_encoder_3"]),  # both CLIPs train (LoRA); only T5 goes
    ],
)
def test_freed_text_encoders_give_the_live_loss_and_images(
    folders, model, train_text_encoder, expected_freed
):
    live, _, _ = setup_models(folders[model], train_text_encoder, free=False)
    live_image = draw(live)  # before the step: the sampler on the untouched models
    live_loss = one_step(live)

    cached, freed, t5 = setup_models(folders[model], train_text_encoder, free=True)
    assert freed == expected_freed
    gc.collect()
    assert t5() is None  # T5's weights are gone from memory, not just from the train models
    for name in freed:
        replay = getattr(cached, name)
        assert isinstance(replay, RecordedTextEncoder)
        assert sum(p.numel() for p in replay.parameters()) == 0
    assert np.abs(draw(cached) - live_image).max() <= 1  # validation sampling reads the recorded outputs
    loss = one_step(cached)
    assert abs(loss - live_loss) < 1e-5 * max(1.0, live_loss)
    with pytest.raises(ModelError, match="was freed after encoding .* validation_prompts"):
        cached.family.encode_prompts(cached.text_encoders, cached.tokenizers, ["a prompt never encoded"])


def test_sdxl_frozen_clips_are_both_freed_and_replayed(folders):
    models, freed, _ = setup_models(folders["tiny-sdxl"], False, free=True)
    assert freed == ["text_encoder", "text_encoder_2"]
    embeds = models.family.encode_prompts(models.text_encoders, models.tokenizers, [PROMPT, ""])
    assert embeds.hidden.shape[0] == 2 and embeds.pooled is not None  # penultimate states + pooled replayed


@pytest.mark.parametrize(
    ("asked", "family", "device", "bf16_gpu", "expected", "note"),
    [
        (None, FluxFamily(), "cuda", True, "bf16", None),
        ("auto", SD3Family(), "cuda", False, "fp16", "not supported by this GPU"),  # pre-Ampere: scaler
        (None, FluxFamily(), "cpu", True, "no", "FluxPipeline trains in bf16 on CUDA"),
        (None, SDFamily(), "cuda", True, "no", None),  # the DDPM families keep fp32 unless asked
        ("fp16", FluxFamily(), "cuda", True, "fp16", None),  # explicit values kept
        ("no", SD3Family(), "cuda", True, "no", None),
    ],
)
def test_flow_families_default_to_bf16_on_gpus(monkeypatch, asked, family, device, bf16_gpu, expected, note):
    monkeypatch.setattr(device_module, "_cuda_supports_bf16", lambda: bf16_gpu)
    plan = training_precision(asked, family, device)
    assert plan.effective == expected
    assert (plan.note is None) if note is None else (note in plan.note)


def test_adamw_8bit_refusals_are_one_line_before_ray(monkeypatch, capsys, folders):
    assert "trains on CPUs; set optimizer: adamw" in train_memory.optimizer_problem("adamw_8bit", cuda=False)
    monkeypatch.setattr(train_memory, "_installed", lambda package: False)
    assert "pip install bitsandbytes" in train_memory.optimizer_problem("adamw_8bit", cuda=True)
    assert train_memory.optimizer_problem("adamw", cuda=False) is None

    models, _, _ = setup_models(folders["tiny-flux"], False, free=False)
    with pytest.raises(ModelError, match="adamw_8bit needs"):
        make_optimizer(models, 1e-4, optimizer="adamw_8bit")
    capsys.readouterr()
    # No Ray runs in this process: the CLI refuses before a cluster would start.
    assert (
        main(["train", "--config", str(CONFIG), f"base_model={folders['tiny-flux']}", "optimizer=adamw_8bit"])
        == 2
    )
    err = capsys.readouterr().err
    assert "optimizer adamw_8bit" in err and "optimizer: adamw" in err and err.count("\n") == 1


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_gradient_checkpointing_in_transformers_gives_the_same_step(folders, model):
    plain, _, _ = setup_models(folders[model], False, free=False)
    checkpointed, _, _ = setup_models(folders[model], False, free=False, gradient_checkpointing=True)
    assert checkpointed.denoiser.is_gradient_checkpointing and not plain.denoiser.is_gradient_checkpointing
    assert abs(one_step(plain) - one_step(checkpointed)) < 1e-6
