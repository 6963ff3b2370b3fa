"""The DreamBooth train step on tiny-sd, no Ray: it learns, it trains only what it should, the prior loss
sits on the class half, caching and checkpoints change nothing.

    .venv/bin/python -m pytest tests/models/test_dreambooth.py
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from torch import nn

from raybooth.cluster.workdir import default_models_dir
from raybooth.models import checkpoint as ckpt
from raybooth.models.device import make_grad_scaler, resolve_precision
from raybooth.models.dreambooth import (
    EncodingCache,
    StepSettings,
    TrainModels,
    diffusion_loss,
    make_lr_scheduler,
    make_optimizer,
    prepare_for_training,
    step_generator,
    train_step,
)
from raybooth.models.dreambooth_data import DreamBoothData, load_example
from raybooth.models.loaders import load_sd_components
from raybooth.samples import draw_sample_image, png_bytes

RES = 32  # tiny-sd trains at 32 px: 4x4 latents, the smallest size its UNet accepts
FP32 = resolve_precision("no", "cpu")


def make_data(with_prior: bool = True, random_flip: bool = False, instances: int = 3) -> DreamBoothData:
    def example(i: int, prompt: str):
        return load_example(png_bytes(draw_sample_image(i, size=40)), f"img{i}", prompt, 0, RES)

    instance = [example(i, "a photo of sks dog") for i in range(instances)]
    classes = [[example(100 + i, "a photo of dog") for i in range(4)]] if with_prior else None
    return DreamBoothData(instance, classes, RES, center_crop=True, random_flip=random_flip, seed=0)


def make_models(train_mode: str = "full", train_text_encoder: bool = False, plan=FP32, **kw) -> TrainModels:
    return prepare_for_training(
        load_sd_components("tiny-sd", device="cpu", models_dir=default_models_dir()),
        train_mode=train_mode,
        train_text_encoder=train_text_encoder,
        plan=plan,
        **kw,
    )


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach().float())}


def run_steps(
    models, data, steps, start=0, lr=1e-3, te_lr=None, settings=None, plan=FP32, state=None, cache=None
):
    optimizer, lr_scheduler, scaler = state or (None, None, None)
    if optimizer is None:
        optimizer = make_optimizer(models, lr, te_lr)
        lr_scheduler, scaler = make_lr_scheduler(optimizer, 0), make_grad_scaler(plan)
    settings = settings or StepSettings()
    stats = [
        train_step(models, optimizer, lr_scheduler, scaler, plan, data, cache, settings, step)
        for step in range(start, start + steps)
    ]
    return stats, (optimizer, lr_scheduler, scaler)


# --------------------------------------------------------------------------------------------------
# Learning, and training only what should train
# --------------------------------------------------------------------------------------------------


def test_full_step_overfits_a_fixed_batch_and_leaves_frozen_parts_alone(tiny_sd_path):
    models = make_models("full", train_text_encoder=False)
    data = make_data()
    unet, vae, te = snapshot(models.unet), snapshot(models.vae), snapshot(models.text_encoder)
    optimizer = make_optimizer(models, 2e-3)
    lr_scheduler, scaler = make_lr_scheduler(optimizer, 0), make_grad_scaler(FP32)
    losses = []
    for _ in range(30):
        # The same step index every time: the same rows, noise and timesteps, i.e. one fixed batch.
        losses.append(
            train_step(models, optimizer, lr_scheduler, scaler, FP32, data, None, StepSettings(), 0).loss
        )
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert changed(unet, models.unet) == set(unet)  # every UNet weight moved
    assert not changed(vae, models.vae)
    assert not changed(te, models.text_encoder)


def test_text_encoder_trains_when_it_has_a_learning_rate(tiny_sd_path):
    models = make_models("full", train_text_encoder=True)
    te, vae = snapshot(models.text_encoder), snapshot(models.vae)
    run_steps(models, make_data(), 2, te_lr=1e-3)
    assert changed(te, models.text_encoder)
    assert not changed(vae, models.vae)


def test_lora_trains_only_the_adapters_and_exports_loadable_weights(tiny_sd_path, tmp_path):
    models = make_models("lora", train_text_encoder=True, lora_rank=4, lora_alpha=4)
    trainable = {n for n, p in models.unet.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in models.unet.parameters() if p.requires_grad)
    unet, te, vae = snapshot(models.unet), snapshot(models.text_encoder), snapshot(models.vae)
    run_steps(models, make_data(), 3, lr=1e-2, te_lr=1e-2)
    assert changed(unet, models.unet) and changed(unet, models.unet) <= trainable
    assert {n for n in changed(te, models.text_encoder)} and all(
        "lora_" in n for n in changed(te, models.text_encoder)
    )
    assert not changed(vae, models.vae)

    # The export is what diffusers' load_lora_weights reads: loading it changes the base pipeline's output.
    ckpt.save_lora_weights(tmp_path, models.unet, models.text_encoder, "tiny-sd")
    assert (tmp_path / ckpt.LORA_WEIGHTS).is_file() and (tmp_path / ckpt.LORA_META).is_file()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", return_tensors="pt").input_ids

    def predict():
        with torch.no_grad():
            return pipe.unet(latents, 10, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample

    base = predict()
    pipe.load_lora_weights(str(tmp_path), weight_name=ckpt.LORA_WEIGHTS)
    assert not torch.allclose(base, predict())


# --------------------------------------------------------------------------------------------------
# The loss: prior preservation on the class half, targets from the scheduler config
# --------------------------------------------------------------------------------------------------


class ConstantPerHalf(nn.Module):
    """A stand-in UNet: predicts 0 on the first half of the batch and 10 on the second."""

    def forward(self, x, t, encoder_hidden_states):
        out = torch.zeros_like(x)
        out[x.shape[0] // 2 :] = 10.0
        return SimpleNamespace(sample=out)


@pytest.mark.parametrize("weight", [0.0, 0.5, 2.0])
def test_prior_loss_is_the_class_half_times_its_weight(weight):
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents, hidden = torch.zeros(8, 4, 4, 4), torch.zeros(8, 3, 8)  # 4 instance rows, then 4 class rows
    parts = diffusion_loss(
        ConstantPerHalf(),
        scheduler,
        latents,
        hidden,
        torch.Generator().manual_seed(0),
        with_prior=True,
        prior_loss_weight=weight,
    )
    # MSE(0, noise) ~ 1 on the instance half, MSE(10, noise) ~ 101 on the class half: swapped halves fail.
    assert 0.5 < parts.instance < 2.0
    assert 80 < parts.prior < 120
    assert torch.allclose(parts.loss, parts.instance + weight * parts.prior)


def test_without_prior_the_whole_batch_is_instance_loss():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    parts = diffusion_loss(
        ConstantPerHalf(),
        scheduler,
        torch.zeros(4, 4, 4, 4),
        torch.zeros(4, 3, 8),
        torch.Generator().manual_seed(0),
        with_prior=False,
    )
    assert parts.prior == 0 and 20 < parts.loss < 80  # half the rows are off by 10: ~ (1 + 101) / 2


class Recorder(nn.Module):
    """Predicts 0 and remembers what it was given, to check the target the loss compares with."""

    def forward(self, x, t, encoder_hidden_states):
        self.seen = (x, t)
        return SimpleNamespace(sample=torch.zeros_like(x))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_target_follows_the_scheduler_prediction_type(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    unet = Recorder()
    parts = diffusion_loss(
        unet, scheduler, latents, torch.zeros(2, 3, 8), torch.Generator().manual_seed(0), with_prior=False
    )
    # Replay the generator to get the noise and timesteps the loss drew.
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    assert torch.equal(unet.seen[1], t)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    assert torch.allclose(parts.loss, (target**2).mean())


def test_snr_gamma_and_noise_offset_change_the_loss_but_stay_finite():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    # 64 rows: some timesteps are early enough (SNR > gamma) for Min-SNR to down-weight them.
    latents, hidden = torch.randn(64, 4, 4, 4), torch.zeros(64, 3, 8)

    def loss(**kw):
        return diffusion_loss(
            Recorder(), scheduler, latents, hidden, torch.Generator().manual_seed(0), with_prior=True, **kw
        ).loss

    plain, snr, offset = loss(), loss(snr_gamma=5.0), loss(noise_offset=0.1)
    assert torch.isfinite(snr) and torch.isfinite(offset)
    assert not torch.allclose(plain, snr) and not torch.allclose(plain, offset)


# --------------------------------------------------------------------------------------------------
# Same results: caching, checkpoints, gradient checkpointing, reduced precision
# --------------------------------------------------------------------------------------------------


def test_cached_latents_and_embeddings_give_the_same_step(tiny_sd_path):
    data = make_data(random_flip=True)
    plain, cached = make_models(), make_models()
    cache = EncodingCache.build(cached, data)
    assert cache.embeddings is not None and len(cache.moments) == 3 * 2 + 4  # both flips of each instance
    a, _ = run_steps(plain, data, 3)
    b, _ = run_steps(cached, data, 3, cache=cache)
    for x, y in zip(a, b, strict=True):
        assert x.loss == pytest.approx(y.loss, rel=1e-4, abs=1e-6)


def test_checkpoint_then_resume_is_bit_identical(tiny_sd_path, tmp_path):
    data = make_data()
    straight = make_models()
    run_steps(straight, data, 4)

    first = make_models()
    _, state = run_steps(first, data, 2)
    ckpt.save_checkpoint(tmp_path, first.trainable(), *state, step=2, meta={"mlflow_run_id": "x"})
    assert ckpt.read_meta(tmp_path)["step"] == 2
    torch.manual_seed(123)  # disturb the global RNG: the checkpoint must restore it

    resumed = make_models()
    optimizer = make_optimizer(resumed, 1e-3)
    state = (optimizer, make_lr_scheduler(optimizer, 0), make_grad_scaler(FP32))
    assert ckpt.load_checkpoint(tmp_path, resumed.trainable(), *state).step == 2
    run_steps(resumed, data, 2, start=2, state=state)
    for (n, p), q in zip(straight.unet.named_parameters(), resumed.unet.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_checkpoint_of_other_settings_is_refused(tiny_sd_path, tmp_path):
    lora = make_models("lora")
    optimizer = make_optimizer(lora, 1e-3)
    ckpt.save_checkpoint(
        tmp_path, lora.trainable(), optimizer, make_lr_scheduler(optimizer, 0), make_grad_scaler(FP32), step=1
    )
    with pytest.raises(ValueError, match="same train_mode"):
        ckpt.load_trainable_weights(tmp_path, make_models("full").trainable())


def test_gradient_checkpointing_gives_the_same_step(tiny_sd_path):
    data = make_data()
    a, _ = run_steps(make_models(), data, 2)
    b, _ = run_steps(make_models(gradient_checkpointing=True), data, 2)
    assert [s.loss for s in a] == pytest.approx([s.loss for s in b], rel=1e-5)


def test_bf16_autocast_keeps_fp32_master_weights_and_half_frozen_parts(tiny_sd_path):
    plan = resolve_precision("bf16", "cpu")
    models = make_models("full", plan=plan)
    assert all(p.dtype == torch.float32 for p in models.unet.parameters())
    assert all(p.dtype == torch.bfloat16 for p in models.vae.parameters())
    assert all(p.dtype == torch.bfloat16 for p in models.text_encoder.parameters())
    stats, _ = run_steps(models, make_data(), 2, plan=plan)
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in stats)
    assert all(p.dtype == torch.float32 for p in models.unet.parameters())


def test_gradient_accumulation_averages_micro_batches(tiny_sd_path):
    models = make_models()
    stats, _ = run_steps(models, make_data(), 1, settings=StepSettings(accumulation=3))
    assert stats[0].loss > 0 and stats[0].grad_norm > 0


def test_step_generators_depend_on_every_coordinate():
    draws = {
        tuple(torch.randn(3, generator=step_generator(*key)).tolist())
        for key in [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)]
    }
    assert len(draws) == 5
    assert torch.equal(
        torch.randn(3, generator=step_generator(0, 5, 0, 1)),
        torch.randn(3, generator=step_generator(0, 5, 0, 1)),
    )
