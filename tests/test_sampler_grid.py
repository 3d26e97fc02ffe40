"""Every sampler must call the network at the noise level the image is really at.

Data: a single point (all zeros), whose ideal v-prediction denoiser is known, so the image at
each call is pure scaled noise and its pixel std *is* its noise level: at a call told timestep t
it must be sqrt(1 - alpha-bar_t). A sampler that leaves the image noisier than it tells the
network makes a trained network keep the excess as residual noise in its samples.
"""

from __future__ import annotations

import pytest
import torch

from medsynth.diffusion.sampler import sample
from medsynth.diffusion.schedule import ScheduleConfig, training_scheduler


class ZeroDataSpy(torch.nn.Module):
    """The exact v-prediction denoiser for data = 0; records (t, pixel std) at every call."""

    def __init__(self, cfg: ScheduleConfig):
        super().__init__()
        self.acp = training_scheduler(cfg).alphas_cumprod.to(torch.float64)
        self.calls: list[tuple[int, float]] = []

    def forward(self, x, timesteps, class_labels):
        t = int(timesteps[0])
        self.calls.append((t, x.double().std().item()))
        a = self.acp[t]
        return (a.sqrt() * x.double() / (1 - a).sqrt()).float()  # v for x0 = 0


# DDIM below 50 steps: MONAI's DDIMScheduler lists linspace(999, 0, n) timesteps but steps by a
# fixed 1000 // n, so its last call (t = 0) sees an image still at level 11 (10 steps) or 3 (20).
DDIM_GRID = pytest.mark.xfail(
    strict=True, reason="known defect: DDIM steps by a fixed stride over a linspace grid"
)


@pytest.mark.parametrize(
    ("sampler", "steps", "eta"),
    [
        ("dpmpp", 10, 0.0),
        ("ddpm", 25, 0.0),
        ("ddim", 50, 0.0),
        pytest.param("ddim", 10, 0.0, marks=DDIM_GRID),
        pytest.param("ddim", 20, 0.0, marks=DDIM_GRID),
        pytest.param("ddim", 10, 1.0, marks=DDIM_GRID),
    ],
)
def test_network_is_told_the_noise_level_the_image_is_at(sampler, steps, eta):
    cfg = ScheduleConfig()
    spy = ZeroDataSpy(cfg)
    n = 64
    kw = dict(image_shape=(1, 16, 16), null_label=1, net_batch=n, clip=False)
    sample(spy, cfg, [0] * n, list(range(n)), sampler=sampler, steps=steps, ddim_eta=eta, **kw)
    assert len(spy.calls) == steps
    for t, std in spy.calls:
        want = (1 - spy.acp[t]).sqrt().item()
        assert abs(std / want - 1) < 0.05, (
            f"{sampler}-{steps} called at t={t}: std {std:.4f}, level says {want:.4f}"
        )
