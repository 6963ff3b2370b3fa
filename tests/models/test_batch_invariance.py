"""Batch invariance: with `batch_invariant=True` an image is byte-identical alone and in any batch.

.venv/bin/python -m pytest tests/models/test_batch_invariance.py
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raybooth.models.batch_invariance import batch_invariant
from raybooth.models.loaders import load_sd_pipeline
from raybooth.models.sampling import sample_images

# Mixed lengths (one past CLIP's 77 tokens), so rows differ in everything the text encoder sees.
PROMPTS = [
    "a photo of sks dog",
    "a cat sleeping on a bed " * 3,
    "a red car parked on the street at night, wet asphalt, reflections",
    "sks dog on the moon " * 20,
    "an oil painting of a lighthouse",
]
KW = dict(height=64, width=64, num_inference_steps=4)


@pytest.fixture(scope="module")
def pipe(tiny_sd_path):
    return load_sd_pipeline(str(tiny_sd_path), device="cpu")


def same_bytes(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0], ids=["cfg", "no-cfg"])
def test_every_row_equals_its_single_request_result(pipe, guidance_scale):
    seeds = [7, 8, 9, 10, 11]
    alone = [
        sample_images(pipe, [p], guidance_scale=guidance_scale, seeds=[s], batch_invariant=True, **KW)[0]
        for p, s in zip(PROMPTS, seeds, strict=True)
    ]
    # Batches of every size, in different orders, so a row sits at different offsets.
    for rows in ([0, 1], [4, 2, 0], [3, 1, 4, 0], [1, 2, 3, 4, 0], [2, 2, 0, 4, 1, 3, 3, 0]):
        batch = sample_images(
            pipe,
            [PROMPTS[r] for r in rows],
            guidance_scale=guidance_scale,
            seeds=[seeds[r] for r in rows],
            batch_invariant=True,
            **KW,
        )
        for r, image in zip(rows, batch, strict=True):
            assert same_bytes(image, alone[r]), (rows, r)


def test_per_row_guidance_and_negative_prompts_stay_invariant(pipe):
    kw = dict(batch_invariant=True, **KW)
    alone = sample_images(pipe, [PROMPTS[0]], ["blurry"], guidance_scale=4.0, seeds=[1], **kw)[0]
    batch = sample_images(
        pipe, [PROMPTS[2], PROMPTS[0]], ["", "blurry"], guidance_scale=[9.0, 4.0], seeds=[2, 1], **kw
    )
    assert same_bytes(batch[1], alone)


def test_invariant_images_are_the_same_images(pipe):
    # The mode changes how kernels are called, not the maths: the batched default agrees to rounding.
    fast = sample_images(pipe, PROMPTS[:3], guidance_scale=7.5, seeds=[0, 1, 2], **KW)
    exact = sample_images(pipe, PROMPTS[:3], guidance_scale=7.5, seeds=[0, 1, 2], batch_invariant=True, **KW)
    for a, b in zip(fast, exact, strict=True):
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1


def test_rows_meet_the_kernel_they_meet_alone():
    torch.manual_seed(0)
    x, w, b = torch.randn(16, 32), torch.randn(128, 32), torch.randn(128)
    image = torch.randn(16, 32, 8, 8).to(memory_format=torch.channels_last)
    q, k, v = (torch.randn(6, 2, 10, 8) for _ in range(3))
    with batch_invariant():
        rows = F.linear(x, w, b)
        normed = F.group_norm(image, 8)
        attended = F.scaled_dot_product_attention(q, k, v)
        for i in (0, 5, 15):
            assert torch.equal(rows[i : i + 1], F.linear(x[i : i + 1], w, b))
            assert torch.equal(normed[i : i + 1], F.group_norm(image[i : i + 1].contiguous(), 8))
        assert torch.equal(attended[3:4], F.scaled_dot_product_attention(q[3:4], k[3:4], v[3:4]))
    torch.testing.assert_close(rows, F.linear(x, w, b))
    torch.testing.assert_close(normed, F.group_norm(image, 8))
    # A lower-rank mask broadcasts over the batch: it is passed whole, even when its dim 0 equals the rows.
    heads_mask = torch.randn(2, 10, 10)  # (H, L, S) with H == B below
    q2, k2, v2 = (torch.randn(2, 2, 10, 8) for _ in range(3))
    with batch_invariant():
        masked = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=heads_mask)
    torch.testing.assert_close(masked, F.scaled_dot_product_attention(q2, k2, v2, attn_mask=heads_mask))
    # keyword arguments are split too
    with batch_invariant():
        by_name = F.linear(input=x, weight=w, bias=b)
    assert torch.equal(by_name, rows)


def test_the_mode_is_thread_local():
    seen: list[bool] = []

    def other_thread():
        seen.append(torch.overrides._get_current_function_mode_stack() == [])

    with batch_invariant():
        assert torch.overrides._get_current_function_mode_stack()
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert seen == [True]
    assert torch.overrides._get_current_function_mode_stack() == []


def test_disabled_is_a_no_op():
    with batch_invariant(enabled=False):
        assert torch.overrides._get_current_function_mode_stack() == []
