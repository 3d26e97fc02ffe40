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


def diffusion_loss(
    model: torch.nn.Module,
    scheduler,
    cfg: ScheduleConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    draws: Draws,
    null_label: int,
) -> torch.Tensor:
    """Mean squared error of the model's prediction; scalar float32.

    ``images``: ``(B, C, H, W)`` in [-1, 1]; ``labels``: ``(B,)`` long class indices. Targets:
    epsilon (the noise), v-prediction (``sqrt(a) * noise - sqrt(1 - a) * x0``) or, for rflow,
    the velocity ``x0 - noise`` that MONAI's RFlowScheduler integrates.
    """
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
    return F.mse_loss(pred.float(), target.float())
