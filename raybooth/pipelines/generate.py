"""`raybooth generate`: images from a trained model, without a server.

    raybooth generate --model models:/raybooth-subject/1 --prompt "a photo of sks dog on the moon" --n 4

The CLI loads the model exactly as the image server does (`serving.image_models`: a registered version,
a folder, a preset; full fine-tunes and LoRA subjects alike) and hands its sampler to
`write_generated_images`, which picks the seeds and writes one PNG per image (local folder or s3://).
Image i uses seed `seed + i` and sampling is batch-invariant, so `--seed 7 --n 1` reproduces the fourth
image of `--seed 4 --n 4` byte for byte.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from raybooth.cluster import storage
from raybooth.samples import png_bytes

TRAIN_INFO = "raybooth_train.json"  # written next to every exported model by the DreamBooth worker


def trained_resolution(model_folder: Path) -> int | None:
    """The resolution a raybooth model was trained at (the sensible default size), if it says."""
    info = Path(model_folder) / TRAIN_INFO
    if not info.is_file():
        return None
    return json.loads(info.read_text()).get("resolution")


def write_generated_images(
    sample: Callable[..., list[Image.Image]],
    prompt: str,
    out: str,
    *,
    n: int = 1,
    seed: int = 0,
    steps: int = 25,
    guidance_scale: float = 7.5,
    size: int = 512,
    negative_prompt: str = "",
) -> list[str]:
    """Sample `n` images of `prompt` with seeds seed..seed+n-1 and write them under `out`; their URIs."""
    seeds = [seed + i for i in range(n)]
    images = sample(
        [prompt] * n,
        [negative_prompt] * n,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        seeds=seeds,
        batch_invariant=True,  # an image's bytes do not depend on --n
    )
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "image"
    uris = []
    for s, image in zip(seeds, images, strict=True):
        uri = storage.join(out, f"{slug}-seed{s}.png")
        storage.write_bytes_atomic(uri, png_bytes(image))
        uris.append(uri)
    return uris
