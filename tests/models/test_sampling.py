"""Diffusion sampling: one UNet pass per step for the whole batch with CFG, per-row seeds.

.venv/bin/python -m pytest tests/models/test_sampling.py
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from raybooth.models.loaders import load_sd_components, load_sd_pipeline
from raybooth.models.sampling import SamplingStopped, sample_images

PROMPTS = ["a photo of sks dog", "a cat sleeping on a bed", "a red car parked on the street"]
KW = dict(height=64, width=64, num_inference_steps=3)


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    return load_sd_pipeline(str(tiny_sd_path), device="cpu")


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def count_unet_calls(pipe):
    calls: list[int] = []
    handle = pipe.unet.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[0]))
    return calls, handle


def test_one_unet_pass_per_step_for_the_whole_batch_with_cfg(pipe):
    calls, handle = count_unet_calls(pipe)
    try:
        images = sample_images(pipe, PROMPTS, guidance_scale=7.5, seeds=[0, 1, 2], **KW)
    finally:
        handle.remove()
    assert [im.size for im in images] == [(64, 64)] * 3
    assert all(im.mode == "RGB" for im in images)
    # cond + uncond for 3 prompts in every call; one call per scheduler timestep
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(KW["num_inference_steps"])
    assert calls == [6] * len(scheduler.timesteps)


def test_guidance_off_runs_only_the_conditional_half(pipe):
    calls, handle = count_unet_calls(pipe)
    try:
        sample_images(pipe, PROMPTS[:2], guidance_scale=1.0, seeds=[0, 1], **KW)
    finally:
        handle.remove()
    assert set(calls) == {2}


def test_same_seed_same_image_and_rows_do_not_depend_on_the_batch(pipe):
    batch = sample_images(pipe, PROMPTS, guidance_scale=7.5, seeds=[10, 11, 12], **KW)
    again = sample_images(pipe, PROMPTS, guidance_scale=7.5, seeds=[10, 11, 12], **KW)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(batch, again, strict=True))
    for prompt, seed, batched in zip(PROMPTS, [10, 11, 12], batch, strict=True):
        alone = sample_images(pipe, [prompt], guidance_scale=7.5, seeds=[seed], **KW)[0]
        diff = np.abs(pixels(alone) - pixels(batched))
        # Equal up to float rounding of batched matmuls: at most one intensity level, on a few pixels.
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_seed_and_prompt_change_the_image(pipe):
    a, b = sample_images(pipe, [PROMPTS[0]] * 2, guidance_scale=7.5, seeds=[0, 1], **KW)
    c = sample_images(pipe, [PROMPTS[1]], guidance_scale=7.5, seeds=[0], **KW)[0]
    assert not np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(c))


def test_matches_the_diffusers_pipeline_for_one_row(pipe):
    import torch

    ours = sample_images(pipe, [PROMPTS[0]], guidance_scale=7.5, seeds=[3], **KW)[0]
    theirs = pipe(
        [PROMPTS[0]], generator=[torch.Generator().manual_seed(3)], guidance_scale=7.5, **KW
    ).images[0]
    assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1


def test_per_row_guidance_and_negative_prompts(pipe):
    plain, negated = sample_images(
        pipe, [PROMPTS[0]] * 2, ["", "blurry"], guidance_scale=[7.5, 7.5], seeds=[5, 5], **KW
    )
    assert not np.array_equal(pixels(plain), pixels(negated))


def test_training_components_sample_too(tiny_sd_path):
    components = load_sd_components(str(tiny_sd_path), device="cpu")
    [image] = sample_images(components, [PROMPTS[0]], guidance_scale=7.5, seeds=[0], **KW)
    assert image.size == (64, 64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(seeds=[0]), "seeds"),
        (dict(seeds=[0, 1], height=60), "multiples of"),
        (dict(seeds=[0, 1], guidance_scale=[1.0]), "guidance scales"),
    ],
)
def test_bad_arguments_say_what_to_fix(pipe, kwargs, message):
    args = {**KW, "guidance_scale": 7.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        sample_images(pipe, PROMPTS[:2], **args)


def test_should_stop_ends_sampling_before_the_next_unet_pass(pipe):
    calls, handle = count_unet_calls(pipe)
    asked = []

    def should_stop() -> bool:
        asked.append(True)
        return len(asked) > 2  # two steps, then nobody wants the images

    try:
        with pytest.raises(SamplingStopped) as info:
            sample_images(pipe, PROMPTS[:2], guidance_scale=7.5, seeds=[0, 1], should_stop=should_stop, **KW)
    finally:
        handle.remove()
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(KW["num_inference_steps"])
    assert len(calls) == 2  # the third pass never ran
    assert (info.value.steps_done, info.value.steps) == (2, len(scheduler.timesteps))
