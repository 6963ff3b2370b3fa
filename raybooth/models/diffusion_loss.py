"""The DreamBooth loss on one batch, for every family: DDPM (epsilon / v-prediction, Min-SNR weights) and
flow matching (SD3, Flux.1). Plain PyTorch; the train step (models/dreambooth.py) calls it.

    parts = diffusion_loss(denoiser, noise_scheduler, latents, embeds, generator, with_prior=True,
                           family=family, objective=FlowObjective())
    parts.loss.backward()

Rows [0, N/2) are the instance half and [N/2, N) the class half (prior preservation); the loss is
MSE(instance) + prior_loss_weight * MSE(class) against the family's target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raybooth.models.diffusion_family import PromptEmbeds, SDFamily
from raybooth.models.flow_matching import FlowObjective, loss_weighting


@dataclass
class LossParts:
    loss: torch.Tensor  # what backward runs on
    instance: torch.Tensor  # detached, for logging
    prior: torch.Tensor  # detached; 0 without prior preservation


def training_target(
    noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity, as the scheduler config says."""
    return SDFamily.training_target(noise_scheduler, latents, noise, timesteps)


def snr_weights(noise_scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), one per row: min(SNR, gamma) / SNR (or SNR+1 for v)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def diffusion_loss(
    denoiser: nn.Module,
    noise_scheduler: Any,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor | PromptEmbeds,
    generator: torch.Generator,
    *,
    with_prior: bool,
    prior_loss_weight: float = 1.0,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    family: SDFamily | None = None,
    time_ids: torch.Tensor | None = None,
    objective: FlowObjective | None = None,
    guidance_scale: float = 3.5,
) -> LossParts:
    """DreamBooth's loss on one batch: rows [0, N/2) are the instance half, [N/2, N) the class half.

    latents (N, C, h, w) fp32, encoder_hidden_states (N, T, D) or the family's `PromptEmbeds`, time_ids
    (N, 6) for SDXL. Noise and timesteps come from `generator`. DDPM families: epsilon / v target at
    uniform integer timesteps, optional Min-SNR weights; SD3/Flux: the flow-matching target at sigmas
    drawn from `objective`'s density, rows weighted by its loss weighting (models/flow_matching.py).
    """
    family = family or SDFamily()
    embeds = (
        encoder_hidden_states
        if isinstance(encoder_hidden_states, PromptEmbeds)
        else PromptEmbeds(encoder_hidden_states)
    )
    n = latents.shape[0]
    device = latents.device
    noise = torch.randn(latents.shape, generator=generator).to(device)  # (N, C, h, w)
    if noise_offset:
        # A per-channel constant shift lets the model learn to change an image's mean brightness.
        offset = torch.randn((n, latents.shape[1], 1, 1), generator=generator).to(device)
        noise = noise + noise_offset * offset
    batch = family.training_noise(noise_scheduler, latents, noise, generator, objective)
    # Flux.1-dev trains with its guidance input at a fixed scale, as train_dreambooth_lora_flux.py.
    guidance = torch.full((n,), guidance_scale, device=device) if family.takes_guidance(denoiser) else None
    pred = family.denoise(denoiser, batch.noisy, batch.timesteps, embeds, time_ids, guidance).float()

    per_row = F.mse_loss(pred, batch.target.float(), reduction="none").mean(dim=(1, 2, 3))  # (N,)
    if family.flow_matching:
        weights = loss_weighting((objective or FlowObjective()).loss_weighting, batch.sigmas).to(device)
    elif snr_gamma is not None:
        weights = snr_weights(noise_scheduler, batch.timesteps, snr_gamma)  # (N,)
    else:
        weights = torch.ones_like(per_row)
    if with_prior:
        rows, prior_rows = per_row.chunk(2)
        weights, prior_weights = weights.chunk(2)
        # The DDPM scripts weight only the instance half (Min-SNR); the SD3/Flux scripts weight both.
        prior = (prior_rows * prior_weights).mean() if family.flow_matching else prior_rows.mean()
    else:
        rows, prior = per_row, torch.zeros((), device=device)
    instance = (rows * weights).mean()

    loss = instance + prior_loss_weight * prior if with_prior else instance
    return LossParts(loss, instance.detach(), prior.detach())
