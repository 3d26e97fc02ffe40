"""Noise schedules: MONAI's DDPM (and RFlow) schedulers plus a matching diffusers one.

All samplers are built from one :class:`ScheduleConfig`, so DDPM, DDIM and DPM-Solver++ share
the same betas and prediction type as training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from monai.networks.schedulers import DDPMScheduler, RFlowScheduler

# MONAI schedule name -> diffusers beta_schedule name with the same betas.
_DIFFUSERS_BETAS = {
    "linear_beta": "linear",
    "scaled_linear_beta": "scaled_linear",
    "cosine": "squaredcos_cap_v2",
}


@dataclass
class ScheduleConfig:
    kind: str = "ddpm"  # ddpm (variance-preserving, discrete t) | rflow (rectified flow)
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear_beta"  # linear_beta | scaled_linear_beta | cosine
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    prediction_type: str = "v_prediction"  # epsilon | v_prediction (ddpm only)

    def to_dict(self) -> dict:
        return asdict(self)

    def _beta_args(self) -> dict:
        if self.beta_schedule == "cosine":
            return {}
        return {"beta_start": self.beta_start, "beta_end": self.beta_end}


def training_scheduler(cfg: ScheduleConfig) -> DDPMScheduler | RFlowScheduler:
    """The scheduler whose ``add_noise`` defines the forward process used in training."""
    if cfg.kind == "rflow":
        return RFlowScheduler(num_train_timesteps=cfg.num_train_timesteps, spatial_dim=2)
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        **cfg._beta_args(),
    )


def dpmpp_scheduler(cfg: ScheduleConfig, solver_order: int = 2):
    """diffusers' DPM-Solver++ (multistep) on the same betas as the MONAI training schedule."""
    from diffusers import DPMSolverMultistepScheduler

    kwargs = dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=_DIFFUSERS_BETAS[cfg.beta_schedule],
        prediction_type=cfg.prediction_type,
        algorithm_type="dpmsolver++",
        solver_order=solver_order,
        lower_order_final=True,
        timestep_spacing="trailing",
    )
    if cfg.beta_schedule == "cosine":
        # diffusers' cosine caps betas at 0.999 like MONAI's; no beta_start/end.
        return DPMSolverMultistepScheduler(**kwargs)
    return DPMSolverMultistepScheduler(beta_start=cfg.beta_start, beta_end=cfg.beta_end, **kwargs)
