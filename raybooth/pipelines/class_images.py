"""Class images for prior preservation: generated from the base model with Ray Data, cached in storage.

    result = ensure_class_images(ClassImageRequest("tiny-sd", "a photo of dog", resolution=32, count=8,
                                                   seed=0, steps=25, guidance_scale=7.5), storage_root)
    result.uris    # the first 8 images of that cache entry, generated now or earlier

`raybooth train` calls this for each concept before any training worker starts.

The cache entry is keyed by (base model, class prompt, resolution, seed, sampler settings); image i is
`class_000i.png`, sampled with a seed derived from (seed, i). An image therefore never depends on how
many were asked for, which gives the count its meaning in the cache: asking for 8 where 5 exist
generates only images 5-7 (a partial cache is topped up), and asking for 4 reuses 0-3. A second run, or
another subject of the same class, generates nothing.

Generation is a Ray Data `map_batches` over the missing indices with an actor pool of pipelines (one
model load per actor, GPUs when asked), each actor writing its PNGs straight to storage.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from raybooth.cluster import storage
from raybooth.cluster.workdir import default_models_dir

CACHE_SECTION = "class_images"
INFO_FILE = "cache.json"


@dataclass(frozen=True)
class ClassImageRequest:
    base_model: str
    prompt: str
    resolution: int
    count: int
    seed: int
    steps: int
    guidance_scale: float

    def cache_key(self) -> str:
        """What makes two images interchangeable; `count` only picks how many of them."""
        fields = {k: v for k, v in asdict(self).items() if k != "count"}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def folder(self, root: str) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:40] or "prompt"
        return storage.join(root, CACHE_SECTION, f"{slug}-{self.cache_key()}")


@dataclass
class ClassImageResult:
    folder: str
    uris: list[str]  # image 0..count-1, in order
    generated: int  # how many this call made
    reused: int  # how many were already in the cache


def image_name(index: int) -> str:
    return f"class_{index:06d}.png"


def image_seed(seed: int, index: int) -> int:
    """Sampling seed of image `index`: independent of the batch it is generated in."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])


class ClassImageWriter:
    """Ray Data actor: loads the base pipeline once, then samples and writes batches of class images."""

    def __init__(self, request: dict[str, Any], folder: str, device: str):
        from raybooth.models.loaders import load_sd_pipeline

        self.request = ClassImageRequest(**request)
        self.folder = folder
        # fp16 on a GPU: class images only need to look like the base model's, and it halves the memory.
        dtype = "fp16" if device.startswith("cuda") else None
        self.pipeline = load_sd_pipeline(
            self.request.base_model, device=device, dtype=dtype, models_dir=default_models_dir()
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from raybooth.models.sampling import sample_images
        from raybooth.samples import png_bytes

        r = self.request
        indices = [int(i) for i in batch["index"]]
        images = sample_images(
            self.pipeline,
            [r.prompt] * len(indices),
            height=r.resolution,
            width=r.resolution,
            num_inference_steps=r.steps,
            guidance_scale=r.guidance_scale,
            seeds=[image_seed(r.seed, i) for i in indices],
        )
        uris = []
        for index, image in zip(indices, images, strict=True):
            uri = storage.join(self.folder, image_name(index))
            storage.write_bytes_atomic(uri, png_bytes(image))
            uris.append(uri)
        return {"index": np.array(indices), "uri": np.array(uris)}


def ensure_class_images(
    request: ClassImageRequest,
    root: str,
    *,
    gpus_per_actor: float = 0.0,
    max_actors: int = 2,
    batch_size: int = 4,
) -> ClassImageResult:
    """Make sure images 0..count-1 of `request`'s cache entry exist under `root`; generate the missing ones."""
    folder = request.folder(root)
    present = {storage.join(folder, image_name(i)) for i in range(request.count)} & set(
        storage.list_files(folder, [".png"])
    )
    missing = [i for i in range(request.count) if storage.join(folder, image_name(i)) not in present]
    if missing:
        import ray.data

        info = {k: v for k, v in asdict(request).items() if k != "count"}
        storage.write_text_atomic(storage.join(folder, INFO_FILE), json.dumps(info, indent=2) + "\n")
        actors = max(1, min(max_actors, -(-len(missing) // batch_size)))
        ds = ray.data.from_items([{"index": i} for i in missing])
        ds = ds.map_batches(
            ClassImageWriter,
            fn_constructor_kwargs={
                "request": asdict(request),
                "folder": folder,
                "device": "cuda" if gpus_per_actor > 0 else "cpu",
            },
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
            batch_size=batch_size,  # an integer batch size, as Ray Data wants with GPUs
            num_gpus=gpus_per_actor,
            num_cpus=1 if gpus_per_actor == 0 else 0.5,
        )
        written = {int(row["index"]) for row in ds.take_all()}
        if written != set(missing):
            raise RuntimeError(f"class image generation wrote {sorted(written)} but {missing} were missing")
    uris = [storage.join(folder, image_name(i)) for i in range(request.count)]
    return ClassImageResult(
        folder=folder, uris=uris, generated=len(missing), reused=request.count - len(missing)
    )
