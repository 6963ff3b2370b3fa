"""The rectified-flow training objective of SD3 and Flux.1, in plain PyTorch (no Ray).

    u = timestep_density("logit_normal", 4, generator)              # (4,) in (0, 1)
    batch = flow_matching_batch(noise_scheduler, latents, noise, u)  # noisy, target, timesteps, sigmas
    weights = loss_weighting("none", batch.sigmas)                   # (4,) ones

A clean latent x0 and Gaussian noise are mixed along a straight line, noisy = (1 - sigma) * x0 +
sigma * noise, and the denoiser learns the velocity along it, target = noise - x0. Which sigma a row
gets follows diffusers' SD3/Flux DreamBooth scripts: a draw u from a density over (0, 1) picks the index
int(u * num_train_timesteps) into the training scheduler's own (descending, possibly shifted) timestep
table, so u near 0 is the noisiest step. The densities and weightings are those of
`diffusers.training_utils` (SD3 paper, Esser et al. 2024), written out here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

TIMESTEP_DENSITIES = ("logit_normal", "mode", "uniform")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


@dataclass(frozen=True)
class FlowObjective:
    """How timesteps are drawn and rows weighted (DreamBoothConfig's keys; diffusers' script defaults)."""

    timestep_density: str = "logit_normal"
    loss_weighting: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29


@dataclass
class FlowBatch:
    noisy: torch.Tensor  # (N, C, h, w): (1 - sigma) * x0 + sigma * noise
    target: torch.Tensor  # (N, C, h, w): noise - x0, the velocity
    timesteps: torch.Tensor  # (N,): sigma * num_train_timesteps, what the transformer is told
    sigmas: torch.Tensor  # (N,)


def timestep_density(
    name: str, n: int, generator: torch.Generator, objective: FlowObjective | None = None
) -> torch.Tensor:
    """(n,) draws u in (0, 1): logit-normal (sigmoid of a normal), SD3's "mode" density, or uniform."""
    o = objective or FlowObjective()
    if name == "logit_normal":
        return torch.sigmoid(torch.normal(o.logit_mean, o.logit_std, size=(n,), generator=generator))
    u = torch.rand((n,), generator=generator)
    if name == "mode":
        # Puts more mass on mid-range steps the further mode_scale is from 0 (0: uniform).
        return 1 - u - o.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if name == "uniform":
        return u
    raise ValueError(f"timestep_density {name!r}: use one of {', '.join(TIMESTEP_DENSITIES)}")


def loss_weighting(name: str, sigmas: torch.Tensor) -> torch.Tensor:
    """(N,) per-row loss weights: none (ones), sigma_sqrt (sigma^-2) or cosmap (2 / (pi (1 - 2s + 2s^2)))."""
    if name == "none":
        return torch.ones_like(sigmas)
    if name == "sigma_sqrt":
        return sigmas.float() ** -2.0
    if name == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    raise ValueError(f"loss_weighting {name!r}: use one of {', '.join(LOSS_WEIGHTINGS)}")


def flow_matching_batch(
    noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, u: torch.Tensor
) -> FlowBatch:
    """Noise `latents` (N, C, h, w) with `noise` at the sigmas that the draws `u` (N,) pick from the
    training scheduler's table (a FlowMatchEulerDiscreteScheduler as constructed, never set_timesteps'd)."""
    count = noise_scheduler.config.num_train_timesteps
    index = (u * count).long().clamp(0, count - 1)  # u = 1 exactly would step past the table
    sigmas = noise_scheduler.sigmas[index].to(latents.device, torch.float32)  # (N,)
    timesteps = noise_scheduler.timesteps[index].to(latents.device)  # (N,) = sigmas * count
    s = sigmas.view(-1, *([1] * (latents.dim() - 1)))  # (N, 1, 1, 1)
    noisy = (1.0 - s) * latents + s * noise
    return FlowBatch(noisy=noisy, target=noise - latents, timesteps=timesteps, sigmas=sigmas)
