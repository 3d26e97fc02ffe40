"""Consistency models distilled from a guided teacher: parametrisation, step grid, sampler.

Method: latent-consistency-style *consistency distillation* (Song et al. 2023, "Consistency
Models"; Luo et al. 2023, "Latent Consistency Models"), with classifier-free guidance distilled
in as LCM does: the teacher's ODE step that defines the target is the *guided* DDIM step, so the
student reaches guided samples with one conditional pass per step. Chosen over progressive
distillation (Salimans & Ho 2022; Meng et al. 2023 for guidance) because it is one stage with
one loss, not log2(1000 / 4) rounds that each need to converge, and one student serves 1, 2 and
4 steps; the price is a fixed guidance scale per student (recorded in its snapshot).

The student ``f(x_t, t, y)`` predicts the clean image with boundary condition ``f(x_0, 0) = x_0``:
``f = c_skip(t) * x_t + c_out(t) * x0_hat(x_t, t, y)``, where ``x0_hat`` reads the UNet output
in the teacher's prediction type. Time runs on the teacher's discrete grid ``t in [0, T)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch


@dataclass
class ConsistencyConfig:
    """What a sampler needs to know about a distilled student (saved in its snapshot)."""

    guidance_scale: float = 2.0  # teacher guidance distilled in; the student runs one pass
    solver_steps: int = 50  # teacher DDIM grid the student was distilled on (skip = T / this)
    timestep_scaling: float = 10.0  # LCM's boundary scaling: c_skip(t) ~ 0 for t >~ 10
    sigma_data: float = 0.5  # data standard deviation in the c_skip / c_out formulas

    def to_dict(self) -> dict:
        return asdict(self)


def x0_from_prediction(
    pred: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor, kind: str
) -> torch.Tensor:
    """Clean-image estimate from a network output. ``a_t``: alpha-bar, broadcastable to ``x``."""
    if kind == "v_prediction":
        return a_t.sqrt() * x - (1 - a_t).sqrt() * pred
    return (x - (1 - a_t).sqrt() * pred) / a_t.sqrt()


def eps_from_prediction(
    pred: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor, kind: str
) -> torch.Tensor:
    """Noise estimate from a network output (epsilon or v prediction)."""
    if kind == "v_prediction":
        return (1 - a_t).sqrt() * x + a_t.sqrt() * pred
    return pred


def boundary_scalings(t: torch.Tensor, cc: ConsistencyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` at integer timesteps ``t`` ``(B,)``: ``c_skip(0) = 1, c_out(0) = 0``."""
    s = t.double() * cc.timestep_scaling
    c_skip = cc.sigma_data**2 / (s**2 + cc.sigma_data**2)
    c_out = s / (s**2 + cc.sigma_data**2).sqrt()
    return c_skip, c_out


def solver_grid(num_train_timesteps: int, solver_steps: int) -> np.ndarray:
    """The teacher's skip grid ``t_n = (n + 1) * k - 1`` (k = T / solver_steps), ascending."""
    if num_train_timesteps % solver_steps:
        raise ValueError(
            f"solver_steps {solver_steps} must divide num_train_timesteps {num_train_timesteps}"
        )
    k = num_train_timesteps // solver_steps
    return np.arange(1, solver_steps + 1) * k - 1


def sampling_timesteps(num_train_timesteps: int, cc: ConsistencyConfig, steps: int) -> list[int]:
    """``steps`` grid timesteps, descending from ``T - 1`` (4 of 1000 -> 999, 739, 499, 259)."""
    if not 1 <= steps <= cc.solver_steps:
        raise ValueError(f"a distilled sampler takes 1..{cc.solver_steps} steps, not {steps}")
    grid = solver_grid(num_train_timesteps, cc.solver_steps)
    picks = np.floor(np.linspace(cc.solver_steps, 0, steps, endpoint=False)).astype(int) - 1
    picks = np.clip(picks, 0, cc.solver_steps - 1)
    return [int(grid[i]) for i in picks]


def consistency_output(
    pred: torch.Tensor, x: torch.Tensor, t: torch.Tensor, acp: torch.Tensor, kind: str, cc
) -> torch.Tensor:
    """``f(x_t, t)`` in float64 from the raw UNet output ``pred``; ``t`` ``(B,)`` long."""
    a_t = acp[t].view(-1, *([1] * (x.dim() - 1)))
    c_skip, c_out = (c.view_as(a_t) for c in boundary_scalings(t, cc))
    return c_skip * x.double() + c_out * x0_from_prediction(pred.double(), x.double(), a_t, kind)


def consistency_sample(
    denoise, x, noise, cfg, steps: int, progress, *, params: dict, acp: torch.Tensor
) -> torch.Tensor:
    """Multistep consistency sampling: denoise to ``x0``, re-noise to the next time, repeat.

    ``denoise(x, t)`` is the single-pass conditional student; ``acp``: alpha-bar ``(T,)``.
    Re-noising draws from the per-sample generators, so sample k depends on its seed only.
    """
    cc = ConsistencyConfig(**params)
    acp = acp.to(x.device, torch.float64)
    ts = sampling_timesteps(cfg.num_train_timesteps, cc, steps)
    x0 = x.double()
    for i, t in enumerate(progress(ts)):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x0 = consistency_output(denoise(x, t), x, tt, acp, cfg.prediction_type, cc)
        if i + 1 < len(ts):
            a = acp[ts[i + 1]]
            z = noise.randn(tuple(x.shape[1:]), x.device).double()
            x = (a.sqrt() * x0 + (1 - a).sqrt() * z).float()
    return x0.float()
