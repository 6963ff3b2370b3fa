"""Class images for prior preservation: generated with Ray Data from the base model, cached, topped up.

    .venv/bin/python -m pytest tests/pipelines/test_class_images.py

Runs on the session's embedded Ray with tiny-sd at 32 px and 2 denoising steps.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from raybooth.cluster import storage
from raybooth.cluster.workdir import default_models_dir
from raybooth.models.loaders import load_sd_pipeline
from raybooth.models.sampling import sample_images
from raybooth.pipelines.class_images import ClassImageRequest, ensure_class_images, image_seed

pytestmark = pytest.mark.slow


def request(count: int, **kw) -> ClassImageRequest:
    values = dict(
        base_model="tiny-sd",
        prompt="a photo of a toy",
        resolution=32,
        count=count,
        seed=0,
        steps=2,
        guidance_scale=2.0,
    )
    values.update(kw)
    return ClassImageRequest(**values)


def test_generated_once_reused_and_topped_up(ray_cluster, tmp_path):
    root = str(tmp_path / "storage")
    first = ensure_class_images(request(3), root, batch_size=2)
    assert (first.generated, first.reused) == (3, 0)
    assert [os.path.basename(u) for u in first.uris] == [f"class_{i:06d}.png" for i in range(3)]
    mtimes = [os.path.getmtime(u) for u in first.uris]

    again = ensure_class_images(request(3), root)  # a second run (or subject) of the same class
    assert (again.generated, again.reused) == (0, 3) and again.uris == first.uris
    assert [os.path.getmtime(u) for u in first.uris] == mtimes  # not rewritten

    more = ensure_class_images(request(5), root, batch_size=2)  # a partial cache is topped up
    assert (more.generated, more.reused) == (2, 3) and more.uris[:3] == first.uris
    fewer = ensure_class_images(request(2), root)
    assert (fewer.generated, fewer.reused) == (0, 2)

    # Image i is the base model's sample for seed image_seed(seed, i), whatever batch it was made in.
    pipe = load_sd_pipeline("tiny-sd", device="cpu", models_dir=default_models_dir())
    (expected,) = sample_images(
        pipe,
        ["a photo of a toy"],
        height=32,
        width=32,
        num_inference_steps=2,
        guidance_scale=2.0,
        seeds=[image_seed(0, 4)],
    )
    assert np.array_equal(np.asarray(Image.open(more.uris[4])), np.asarray(expected))


def test_cache_key_covers_what_changes_the_images():
    base = request(3)
    assert base.cache_key() == request(10).cache_key()  # the count only picks how many
    for change in (
        {"prompt": "a photo of a dog"},
        {"resolution": 64},
        {"seed": 1},
        {"base_model": "other"},
        {"steps": 3},
        {"guidance_scale": 1.0},
    ):
        assert request(3, **change).cache_key() != base.cache_key(), change
    assert storage.join("/r", "class_images") in base.folder("/r") and "a-photo-of-a-toy" in base.folder("/r")
