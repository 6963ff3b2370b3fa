"""DreamBooth data: which rows a rank trains on is a pure function of (seed, step, rank), epochs cover every
photo, class rows pair with their concept, and bad image files are named.

    .venv/bin/python -m pytest tests/models/test_dreambooth_data.py
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from raybooth.models.dreambooth_data import DreamBoothData, Example, load_example
from raybooth.models.images import ImageError
from raybooth.samples import draw_sample_image, png_bytes


def example(i: int, concept: int, size: int = 40) -> Example:
    return load_example(
        png_bytes(draw_sample_image(i, size=size)), f"img{i}", f"prompt {concept}", concept, 32
    )


def two_concepts(**kw) -> DreamBoothData:
    instance = [example(0, 0), example(1, 0), example(2, 0), example(3, 1), example(4, 1)]
    classes = [[example(10 + i, 0) for i in range(3)], [example(20 + i, 1) for i in range(2)]]
    return DreamBoothData(
        instance,
        classes,
        32,
        center_crop=kw.get("center_crop", True),
        random_flip=kw.get("random_flip", False),
        seed=kw.get("seed", 0),
    )


def test_resize_keeps_aspect_and_crop_gives_the_resolution():
    wide = load_example(png_bytes(draw_sample_image(0, size=64).resize((96, 48))), "w", "p", 0, 32)
    assert tuple(wide.pixels.shape) == (3, 32, 64) and wide.pixels.dtype == torch.uint8
    data = DreamBoothData([wide], None, 32, center_crop=False, random_flip=False, seed=0)
    pixels = data.pixels(data.select(0, 0, 0, 1, 1, 1))
    assert tuple(pixels.shape) == (1, 3, 32, 32) and pixels.min() >= -1.0 and pixels.max() <= 1.0


def test_every_photo_once_per_epoch_across_ranks():
    data = two_concepts()
    # 5 photos, 2 ranks x batch 1 x 2 micro-batches = 4 rows per step: 5 steps = 4 epochs exactly.
    seen = Counter()
    for step in range(5):
        for rank in range(2):
            for micro in range(2):
                seen.update(v.index for v in data.select(step, micro, rank, 2, 1, 2) if v.kind == "instance")
    assert seen == Counter({i: 4 for i in range(5)})


def test_class_rows_follow_the_instance_rows_concept():
    data = two_concepts()
    for step in range(10):
        views = data.select(step, 0, 0, 1, 3, 1)
        instance, klass = views[:3], views[3:]
        assert [v.kind for v in instance] == ["instance"] * 3 and [v.kind for v in klass] == ["class"] * 3
        assert [v.concept for v in instance] == [v.concept for v in klass]
        assert data.prompts(views)[3:] == [f"prompt {v.concept}" for v in klass]


def test_selection_is_a_pure_function_of_seed_step_and_rank():
    a, b = two_concepts(random_flip=True), two_concepts(random_flip=True)
    assert a.select(7, 0, 1, 2, 2, 1) == b.select(7, 0, 1, 2, 2, 1)
    assert a.select(7, 0, 1, 2, 2, 1) != a.select(7, 0, 0, 2, 2, 1)
    assert two_concepts(seed=1).select(0, 0, 0, 1, 4, 1) != a.select(0, 0, 0, 1, 4, 1)
    flips = {v.flip for s in range(20) for v in a.select(s, 0, 0, 1, 1, 1) if v.kind == "instance"}
    assert flips == {True, False}


def test_corrupt_and_non_image_files_are_named():
    good = png_bytes(draw_sample_image(0))
    with pytest.raises(ImageError, match="broken.png"):
        load_example(good[:40], "s3://b/subject/broken.png", "p", 0, 32)
    with pytest.raises(ImageError, match="notes.heic.*corrupt"):
        load_example(b"not an image at all", "notes.heic", "p", 0, 32)


def test_prior_needs_class_images_for_every_concept():
    with pytest.raises(ValueError, match="no class images"):
        DreamBoothData([example(0, 0), example(1, 1)], [[example(2, 0)], []], 32, True, False, 0)
    with pytest.raises(ValueError, match="no instance images"):
        DreamBoothData([], None, 32, True, False, 0)
