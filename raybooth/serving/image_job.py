"""`ImageJob`: one validated images request, as the ingress (`serving_images.py`) hands it to
`ImageDeployment`. Its own light module, so the ingress imports neither diffusers nor torch.

    job = ImageJob(prompt="a dog", negative_prompt="", n=2, width=64, height=64, steps=8,
                   guidance_scale=7.5, seed=0)   # images from seeds 0 and 1
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ImageJob:
    """One validated images request: `n` images from seeds `seed, seed+1, ...`."""

    prompt: str
    negative_prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
