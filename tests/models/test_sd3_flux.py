"""SD3 and Flux.1 through the family abstraction on tiny-sd3 / tiny-flux, no Ray: detection and refusals,
the sampler against diffusers' own StableDiffusion3Pipeline / FluxPipeline (dev, schnell, SD3 without
T5), the flow-matching objective against hand-computed values, LoRA training and its export.

    .venv/bin/python -m pytest tests/models/test_sd3_flux.py
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn

from raybooth.cli import main
from raybooth.cluster.workdir import default_models_dir
from raybooth.errors import ModelError
from raybooth.models import checkpoint as ckpt
from raybooth.models.device import make_grad_scaler, resolve_precision
from raybooth.models.diffusion_family import PromptEmbeds, detect_family
from raybooth.models.diffusion_loss import diffusion_loss
from raybooth.models.dreambooth import (
    EncodingCache,
    StepSettings,
    make_lr_scheduler,
    make_optimizer,
    prepare_for_training,
    train_step,
)
from raybooth.models.dreambooth_data import DreamBoothData, Example, load_example
from raybooth.models.flow_family import FluxFamily, SD3Family, pack_latents, unpack_latents
from raybooth.models.flow_matching import flow_matching_batch, loss_weighting, timestep_density
from raybooth.models.loaders import load_sd_components, load_sd_pipeline
from raybooth.models.presets import build_preset, resolve_model
from raybooth.models.sampling import SamplingParts, initial_latents, sample_images
from raybooth.samples import draw_sample_image, png_bytes
from raybooth.serving.image_models import ImageModelStore

FAMILIES = ["tiny-sd3", "tiny-flux"]
RES = 32  # 4x4 latents: SD3's 2x2 patches and Flux's 2x2 packing both fit
FP32 = resolve_precision("no", "cpu")
KW = dict(height=64, width=64, num_inference_steps=3)
PROMPTS = ["a photo of sks dog", "a cat on a sofa"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """The two presets, plus Flux schnell (no guidance embedding) and SD3 saved without T5, as copies."""
    out = {name: Path(resolve_model(name, models_dir=default_models_dir())) for name in FAMILIES}
    root = tmp_path_factory.mktemp("variants")
    schnell = _copy(out["tiny-flux"], root / "schnell")
    config = json.loads((schnell / "transformer" / "config.json").read_text())
    (schnell / "transformer" / "config.json").write_text(json.dumps({**config, "guidance_embeds": False}))
    no_t5 = _copy(out["tiny-sd3"], root / "no-t5", text_encoder_3=[None, None], tokenizer_3=[None, None])
    shutil.rmtree(no_t5 / "text_encoder_3")
    shutil.rmtree(no_t5 / "tokenizer_3")
    return {**out, "flux-schnell": schnell, "sd3-no-t5": no_t5}


@pytest.fixture(scope="module")
def pipes(folders) -> dict[str, object]:
    return {name: load_sd_pipeline(str(path), device="cpu") for name, path in folders.items()}


def _copy(src: Path, dest: Path, **index_changes) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("raybooth_preset.json"))
    index = json.loads((dest / "model_index.json").read_text())
    (dest / "model_index.json").write_text(json.dumps({**index, **index_changes}))
    return dest


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def theirs(pipe, prompts, seeds, guidance_scale, **kw):
    """The diffusers pipeline on the very starting noise our sampler draws (packed for Flux)."""
    c = SamplingParts.of(pipe)
    latents, _ = initial_latents(c, seeds, KW["height"], KW["width"], torch.float32, torch.device("cpu"))
    if isinstance(c.family, FluxFamily):
        latents = pack_latents(latents)
    return pipe(list(prompts), latents=latents, guidance_scale=guidance_scale, **KW, **kw).images


# --------------------------------------------------------------------------------------------------
# Detection and refusals
# --------------------------------------------------------------------------------------------------


def test_families_come_from_model_index(folders):
    sd3, flux = detect_family(str(folders["tiny-sd3"])), detect_family(str(folders["tiny-flux"]))
    assert type(sd3) is SD3Family and type(flux) is FluxFamily
    assert sd3.denoiser_name == flux.denoiser_name == "transformer"
    assert sd3.text_encoder_names == ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert detect_family(str(folders["sd3-no-t5"])).text_encoder_names == ["text_encoder", "text_encoder_2"]


def test_tiny_flux_builds_the_same_bytes_from_the_same_seed(folders, tmp_path):
    def hashes(folder: Path) -> dict[str, str]:
        files = sorted(folder.rglob("*.safetensors"))
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    again = build_preset("tiny-flux", tmp_path / "again", seed=0)
    assert len(hashes(again)) == 4 and hashes(again) == hashes(folders["tiny-flux"])  # + CLIP, T5, VAE


def test_sd3_folder_missing_the_t5_it_lists_is_one_line_naming_it(folders, tmp_path):
    broken = _copy(folders["tiny-sd3"], tmp_path / "broken")
    shutil.rmtree(broken / "text_encoder_3")
    with pytest.raises(ModelError, match="lacks text_encoder_3") as e:
        load_sd_components(str(broken), device="cpu")
    assert "\n" not in str(e.value)


def test_full_finetune_of_a_flow_family_is_refused(folders, tmp_path, capsys):
    components = load_sd_components(str(folders["tiny-flux"]), device="cpu")
    with pytest.raises(ModelError, match="train_mode=full is not supported for FluxPipeline"):
        prepare_for_training(components, train_mode="full", train_text_encoder=False, plan=FP32)
    config = Path(__file__).parents[2] / "configs" / "dreambooth.yaml"
    capsys.readouterr()  # drop the loading progress bars above
    # No Ray runs in this process: the refusal comes before a cluster would start.
    assert (
        main(["train", "--config", str(config), f"base_model={folders['tiny-flux']}", "train_mode=full"]) == 2
    )
    err = capsys.readouterr().err
    assert "FluxPipeline" in err and "train_mode=lora" in err and err.count("\n") == 1
    args = [f"base_model={folders['tiny-sd3']}", "train_mode=lora", "resolution=40"]
    assert main(["train", "--config", str(config), *args]) == 2
    err = capsys.readouterr().err
    assert "resolution 40" in err and "divisible by 16" in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------------------
# The oracle: raybooth's sampler draws what the family's diffusers pipeline draws
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "guidance_scale"),
    [
        ("tiny-sd3", 5.0),  # batched CFG
        ("tiny-sd3", 1.0),  # no CFG pass
        ("sd3-no-t5", 5.0),  # zeros where T5's states go
        ("tiny-flux", 3.5),  # dev: guidance through the embedding
        ("flux-schnell", 0.0),  # no guidance input at all
    ],
)
def test_sampler_matches_the_diffusers_pipeline(pipes, model, guidance_scale):
    pipe = pipes[model]
    ours = sample_images(pipe, PROMPTS, guidance_scale=guidance_scale, seeds=[1, 2], **KW)
    ref = theirs(pipe, PROMPTS, [1, 2], guidance_scale)
    for a, b in zip(ours, ref, strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
        assert pixels(a).std() > 1  # a real image, not a constant
    assert not np.array_equal(pixels(ours[0]), pixels(ours[1]))


def test_flux_dev_reads_each_rows_guidance_and_runs_one_pass_per_step(pipes):
    pipe = pipes["tiny-flux"]
    calls = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append(kw["guidance"].clone()), with_kwargs=True
    )
    try:
        mixed = sample_images(pipe, PROMPTS, guidance_scale=[1.0, 6.0], seeds=[1, 1], **KW)
    finally:
        handle.remove()
    assert len(calls) == KW["num_inference_steps"]  # no unconditional pass
    assert torch.equal(calls[0], torch.tensor([1.0, 6.0]))
    alone = sample_images(pipe, PROMPTS[1:], guidance_scale=6.0, seeds=[1], **KW)[0]
    assert np.abs(pixels(mixed[1]) - pixels(alone)).max() <= 1  # a row does not depend on its batch


@pytest.mark.parametrize("model", FAMILIES)
def test_a_row_samples_the_same_alone_as_in_a_batch(pipes, model):
    batch = sample_images(pipes[model], PROMPTS, guidance_scale=4.0, seeds=[5, 6], **KW)
    alone = sample_images(pipes[model], PROMPTS[1:], guidance_scale=4.0, seeds=[6], **KW)[0]
    assert np.abs(pixels(batch[1]) - pixels(alone)).max() <= 1


# --------------------------------------------------------------------------------------------------
# The flow-matching objective, by hand
# --------------------------------------------------------------------------------------------------


def test_sigma_comes_from_the_schedulers_table_and_noise_is_mixed_linearly():
    x0, noise = torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), -1.0)
    u = torch.tensor([0.25, 0.9])
    plain = flow_matching_batch(FlowMatchEulerDiscreteScheduler(shift=1.0), x0, noise, u)
    # Index int(u * 1000) into the descending table t = 1000 .. 1: u = 0.25 -> t = 750, sigma 0.75.
    assert torch.allclose(plain.sigmas, torch.tensor([0.75, 0.1]))
    assert torch.allclose(plain.timesteps, torch.tensor([750.0, 100.0]))
    assert torch.allclose(plain.noisy[0], torch.full((1, 2, 2), 0.25 * 2.0 + 0.75 * -1.0))
    assert torch.equal(plain.target, noise - x0)  # the velocity points from data to noise
    shifted = flow_matching_batch(FlowMatchEulerDiscreteScheduler(shift=3.0), x0, noise, u)
    assert math.isclose(shifted.sigmas[0].item(), 3 * 0.75 / (1 + 2 * 0.75), rel_tol=1e-6)  # SD3's shift
    assert math.isclose(shifted.timesteps[0].item(), 1000 * shifted.sigmas[0].item(), rel_tol=1e-5)


def test_densities_and_weightings_are_diffusers_formulas():
    g = torch.Generator().manual_seed(0)
    u = timestep_density("logit_normal", 4000, g)
    assert u.min() > 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.02  # symmetric around 1/2
    uniform = torch.rand(5, generator=torch.Generator().manual_seed(1))
    mode = timestep_density("mode", 5, torch.Generator().manual_seed(1), SimpleNamespace(mode_scale=0.0))
    assert torch.allclose(mode, 1 - uniform)  # scale 0: the flipped uniform draw
    sigmas = torch.tensor([0.5, 0.25])
    assert torch.allclose(loss_weighting("sigma_sqrt", sigmas), torch.tensor([4.0, 16.0]))
    assert torch.allclose(loss_weighting("cosmap", sigmas)[0], torch.tensor(2 / (math.pi * 0.5)))
    assert torch.equal(loss_weighting("none", sigmas), torch.ones(2))


class EchoTransformer(nn.Module):
    """Predicts its own (packed) input and records what it was called with: a transformer stand-in
    whose loss is a known function of the noisy latents and the target."""

    config = SimpleNamespace(guidance_embeds=True)

    def __init__(self):
        super().__init__()
        self.seen: dict[str, torch.Tensor] = {}

    def forward(self, **kw):
        self.seen = kw
        return (kw["hidden_states"],)


def test_flux_loss_uses_sigma_mixing_the_velocity_target_and_guidance():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    embeds = PromptEmbeds(torch.zeros(2, 5, 8), torch.zeros(2, 8))
    echo = EchoTransformer()
    parts = diffusion_loss(echo, scheduler, latents, embeds, torch.Generator().manual_seed(7),
                           with_prior=False, family=FluxFamily(), guidance_scale=3.5)  # fmt: skip

    # The same draws by hand: noise first, then u from the logit-normal density.
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=g)
    u = torch.sigmoid(torch.normal(0.0, 1.0, size=(2,), generator=g))
    sigma = scheduler.sigmas[(u * 1000).long()].view(2, 1, 1, 1)
    noisy = (1 - sigma) * latents + sigma * noise
    assert torch.allclose(unpack_latents(echo.seen["hidden_states"], 4, 4), noisy, atol=1e-6)
    assert torch.allclose(echo.seen["timestep"], sigma.flatten(), atol=1e-6)  # Flux reads t / 1000
    assert torch.equal(echo.seen["guidance"], torch.full((2,), 3.5))
    expected = ((noisy - (noise - latents)) ** 2).mean()  # the echo predicts `noisy`
    assert torch.allclose(parts.loss, expected, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# LoRA training and the export diffusers loads
# --------------------------------------------------------------------------------------------------


def make_data() -> DreamBoothData:
    def example(i: int, prompt: str) -> Example:
        return load_example(png_bytes(draw_sample_image(i, size=40)), f"img{i}", prompt, 0, RES)

    instance = [example(i, PROMPTS[0]) for i in range(2)]
    classes = [[example(100 + i, "a photo of dog") for i in range(2)]]
    return DreamBoothData(instance, classes, RES, center_crop=True, random_flip=False, seed=0)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}


def test_cached_flux_embeddings_and_latents_give_the_uncached_loss(folders):
    data = make_data()
    losses = []
    for use_cache in (False, True):
        components = load_sd_components(str(folders["tiny-flux"]), device="cpu")
        models = prepare_for_training(components, train_mode="lora", train_text_encoder=False, plan=FP32)
        cache = EncodingCache.build(models, data) if use_cache else None
        optimizer = make_optimizer(models, 1e-3)
        step = train_step(models, optimizer, make_lr_scheduler(optimizer, 0), make_grad_scaler(FP32), FP32,
                          data, cache, StepSettings(), 0)  # fmt: skip
        losses.append(step.loss)
    assert cache.embeddings and next(iter(cache.embeddings.values())).pooled is not None  # CLIP's pooled
    assert abs(losses[0] - losses[1]) < 1e-4 * max(1.0, losses[0])


@pytest.mark.parametrize("model", FAMILIES)
def test_lora_learns_only_adapters_and_loads_with_load_lora_weights(folders, pipes, model, tmp_path):
    components = load_sd_components(str(folders[model]), device="cpu")
    models = prepare_for_training(components, train_mode="lora", train_text_encoder=True, plan=FP32)
    targets = {n.rsplit(".lora_A", 1)[0] for n, _ in models.denoiser.named_parameters() if ".lora_A" in n}
    assert any(t.endswith("attn.to_out.0") for t in targets)
    assert any(t.endswith("ff_context.net.2") for t in targets) == (model == "tiny-flux")  # flux's extras
    frozen_t5 = snapshot(components.text_encoders[-1])
    before = {"denoiser": snapshot(models.denoiser), "text_encoder": snapshot(models.text_encoder)}

    data = make_data()
    optimizer = make_optimizer(models, 5e-2, 1e-2)
    lr_scheduler, scaler = make_lr_scheduler(optimizer, 0), make_grad_scaler(FP32)
    losses = [  # the same step index: one fixed batch (rows, noise, sigmas), overfit
        train_step(models, optimizer, lr_scheduler, scaler, FP32, data, None, StepSettings(), 0).loss
        for _ in range(20)
    ]
    # Rank-4 adapters on one tiny block plateau early (the velocity target is large); the run is
    # deterministic, so a steady 10% fall is a real signal (untrained adapters would not move it).
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses
    for name in ("denoiser", "text_encoder"):
        moved = changed(before[name], getattr(models, name))
        assert moved and all("lora_" in n for n in moved), name
    assert not changed(frozen_t5, components.text_encoders[-1])  # T5 never trains

    ckpt.save_lora_weights(
        tmp_path, models.denoiser, models.text_encoder, model,
        text_encoder_2=models.text_encoder_2 if model == "tiny-sd3" else None, family=models.family,
    )  # fmt: skip
    pipe = pipes[model]
    base = sample_images(pipe, PROMPTS[:1], guidance_scale=3.5, seeds=[4], **KW)[0]
    pipe.load_lora_weights(str(tmp_path), weight_name=ckpt.LORA_WEIGHTS, adapter_name="subject")
    try:
        ours = sample_images(pipe, PROMPTS[:1], guidance_scale=3.5, seeds=[4], **KW)[0]
        ref = theirs(pipe, PROMPTS[:1], [4], 3.5)[0]
    finally:
        pipe.delete_adapters("subject")
    assert np.abs(pixels(ours) - pixels(ref)).max() <= 1  # the oracle, with the LoRA on
    assert not np.array_equal(pixels(ours), pixels(base))  # the adapters loaded and matter
    assert np.isfinite(pixels(ours)).all() and pixels(ours).std() > 1

    # The serving model store loads the subject on a shared base, by the base named in the export.
    store = ImageModelStore([], "tiny-sd", device="cpu", dtype="auto")
    served = store.load(store.locate(str(tmp_path)))
    assert served.base is not None  # a LoRA subject, not a full pipeline
    image = served.sample(PROMPTS[:1], [""], guidance_scale=3.5, seeds=[4], **KW)[0]
    assert np.abs(pixels(image) - pixels(ours)).max() <= 1
