"""The training objective: noise the clean images, ask the UNet for the target, take the MSE.

Random draws (noise, timesteps, label dropout) come from an explicit generator for the whole
global batch, so a multi-process run slices exactly the draws a single process would make.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medsynth.diffusion.schedule import ScheduleConfig


@dataclass
class Draws:
    """Random inputs of one training step for a batch of ``B`` images ``(B, C, H, W)``."""

    noise: torch.Tensor  # (B, C, H, W) standard normal
    timesteps: torch.Tensor  # (B,) long in [0, T)
    drop: torch.Tensor  # (B,) bool: replace the label by the null class

    def slice(self, sl: slice) -> Draws:
        return Draws(self.noise[sl], self.timesteps[sl], self.drop[sl])


def draw(
    shape: tuple[int, ...],
    num_train_timesteps: int,
    label_dropout: float,
    generator: torch.Generator,
) -> Draws:
    noise = torch.randn(shape, generator=generator)
    timesteps = torch.randint(0, num_train_timesteps, (shape[0],), generator=generator)
    drop = torch.rand(shape[0], generator=generator) < label_dropout
    return Draws(noise, timesteps, drop)


LOSS_WEIGHTINGS = ("uniform", "min_snr")


def min_snr_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, prediction_type: str, gamma: float
) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): ``(B,)`` float32, each in (0, 1].

    ``SNR(t) = a_t / (1 - a_t)`` with ``a_t`` the cumulative alpha product. The weight makes the
    loss equal to ``min(SNR, gamma)`` times the x0 error: ``min(SNR, gamma) / SNR`` for epsilon
    targets, ``min(SNR, gamma) / (SNR + 1)`` for v-prediction. Nearly clean timesteps (huge SNR)
    otherwise dominate the gradient although they matter least for the sample.
    """
    a = alphas_cumprod.to(timesteps.device, torch.float64)[timesteps]
    snr = a / (1 - a)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "v_prediction":
        return (clipped / (snr + 1)).float()
    if prediction_type == "epsilon":
        return (clipped / snr).float()
    raise ValueError(f"min_snr weighting needs epsilon or v_prediction, not {prediction_type!r}")


def diffusion_loss(
    model: torch.nn.Module,
    scheduler,
    cfg: ScheduleConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    draws: Draws,
    null_label: int,
    loss_weighting: str = "uniform",  # uniform | min_snr (ddpm schedules only)
    min_snr_gamma: float = 5.0,  # SNR clip of min_snr
) -> torch.Tensor:
    """Mean squared error of the model's prediction; scalar float32.

    ``images``: ``(B, C, H, W)`` in [-1, 1]; ``labels``: ``(B,)`` long class indices. Targets:
    epsilon (the noise), v-prediction (``sqrt(a) * noise - sqrt(1 - a) * x0``) or, for rflow,
    the velocity ``x0 - noise`` that MONAI's RFlowScheduler integrates. ``min_snr`` weights each
    sample's MSE by :func:`min_snr_weights`; rflow has no ``alphas_cumprod`` and is refused.
    """
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(
            f"unknown loss_weighting {loss_weighting!r}; valid choices: {', '.join(LOSS_WEIGHTINGS)}"
        )
    if loss_weighting == "min_snr" and cfg.kind == "rflow":
        raise ValueError("loss_weighting 'min_snr' is defined for ddpm schedules, not 'rflow'")
    device = images.device
    noise, t = draws.noise.to(device), draws.timesteps.to(device)
    labels = torch.where(draws.drop.to(device), torch.full_like(labels, null_label), labels)
    noisy = scheduler.add_noise(original_samples=images, noise=noise, timesteps=t)
    if cfg.kind == "rflow":
        target = images - noise
    elif cfg.prediction_type == "v_prediction":
        target = scheduler.get_velocity(images, noise, t)
    else:
        target = noise
    pred = model(noisy, timesteps=t, class_labels=labels)
    if loss_weighting == "uniform":
        return F.mse_loss(pred.float(), target.float())
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    w = min_snr_weights(scheduler.alphas_cumprod, t, cfg.prediction_type, min_snr_gamma)
    return (w * per_sample).mean()
