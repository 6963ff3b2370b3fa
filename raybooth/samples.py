"""Deterministic sample images for the demo, tests and benchmarks.

No image data set can be downloaded here, so the demo draws its own: coloured shapes on coloured
backgrounds, the same pixels for the same seed on every machine.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")


def draw_sample_image(index: int, size: int = 64, seed: int = 0) -> Image.Image:
    """One RGB image: a random background colour and one random shape, fixed by (seed, index)."""
    rng = np.random.default_rng([seed, index])
    background = tuple(int(c) for c in rng.integers(0, 256, 3))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    lo, hi = sorted(int(v) for v in rng.integers(size // 8, size - size // 8, 2))
    hi = max(hi, lo + size // 4)
    if shape == "circle":
        draw.ellipse((lo, lo, hi, hi), fill=colour)
    elif shape == "square":
        draw.rectangle((lo, lo, hi, hi), fill=colour)
    else:
        draw.polygon([(lo, hi), ((lo + hi) // 2, lo), (hi, hi)], fill=colour)
    return image


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_sample_images(folder: str | Path, count: int, size: int = 64, seed: int = 0) -> list[Path]:
    """Write `count` PNGs named img_00000.png… into a local folder; returns their paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = out / f"img_{i:05d}.png"
        draw_sample_image(i, size=size, seed=seed).save(path)
        paths.append(path)
    return paths
