"""The denoising loop, written out: network and scheduler meet only here.

Samplers: ``ddpm`` (ancestral, stochastic), ``ddim`` (MONAI, eta = 0), ``dpmpp`` (diffusers'
DPM-Solver++ multistep driving the MONAI UNet) and ``euler`` (MONAI RFlow, for ``rflow``
schedules). Classifier-free guidance mixes a conditional and a null-class pass; a scale of 1.0
takes the single-pass path. Every random draw for sample ``k`` comes from its own generator
seeded with ``seeds[k]`` on the CPU, so a sample does not depend on batch size, order or device.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from medsynth.diffusion.schedule import (
    ScheduleConfig,
    ddim_scheduler,
    dpmpp_scheduler,
    training_scheduler,
)
from medsynth.registry import Registry

SAMPLERS: Registry = Registry("sampler")


class StackedNoise:
    """One CPU generator per sample (EDM's StackedRandomGenerator): draws stack to a batch."""

    def __init__(self, seeds: Sequence[int]) -> None:
        self.generators = [torch.Generator().manual_seed(int(s) % (1 << 63)) for s in seeds]

    def randn(self, shape: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
        """``(B, *shape)`` standard normal; row k from generator k."""
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(device)


class _Denoiser:
    """Calls the UNet with optional classifier-free guidance; returns the raw prediction.

    The network always sees chunks of exactly ``net_batch`` rows (the last one zero-padded):
    CPU kernels may round differently for different batch sizes, so a fixed call size is what
    makes sample k bit-identical whatever batch it was requested in.
    """

    def __init__(
        self,
        model,
        labels,
        null_label: int,
        guidance_scale: float,
        autocast,
        net_batch: int,
        cond: torch.Tensor | None = None,
    ):
        self.model, self.labels, self.scale, self.autocast = model, labels, guidance_scale, autocast
        self.null = torch.full_like(labels, null_label)
        self.net_batch = net_batch
        self.cond = cond  # (B, Cc, H, W) concatenated to the input channels (SR3), or None

    def _net(self, x: torch.Tensor, t: int, labels: torch.Tensor) -> torch.Tensor:
        outs, n = [], self.net_batch
        if self.cond is not None:
            cond = self.cond if x.shape[0] == self.cond.shape[0] else torch.cat([self.cond] * 2)
            x = torch.cat([x, cond], dim=1)
        for i in range(0, x.shape[0], n):
            xc, yc = x[i : i + n], labels[i : i + n]
            pad = n - xc.shape[0]
            if pad:
                xc = torch.cat([xc, xc.new_zeros((pad, *xc.shape[1:]))])
                yc = torch.cat([yc, yc.new_zeros(pad)])
            ts = torch.full((n,), int(t), device=x.device, dtype=torch.long)
            with self.autocast():
                outs.append(self.model(xc, timesteps=ts, class_labels=yc).float()[: n - pad])
        return torch.cat(outs)

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        if self.scale == 1.0:
            return self._net(x, t, self.labels)
        b = x.shape[0]
        out = self._net(torch.cat([x, x]), t, torch.cat([self.labels, self.null]))
        cond, uncond = out[:b], out[b:]
        return uncond + self.scale * (cond - uncond)


def _x0_from(pred: torch.Tensor, x: torch.Tensor, a_t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "v_prediction":
        return a_t.sqrt() * x - (1 - a_t).sqrt() * pred
    return (x - (1 - a_t).sqrt() * pred) / a_t.sqrt()


@SAMPLERS.register("ddpm")
def _ddpm(
    denoise, x, noise: StackedNoise, cfg: ScheduleConfig, steps: int, progress
) -> torch.Tensor:
    # Ancestral DDPM with fixed_small variance (as MONAI's DDPMScheduler), per-sample noise.
    acp = training_scheduler(cfg).alphas_cumprod.to(x.device, torch.float64)
    ratio = cfg.num_train_timesteps // steps
    one = torch.tensor(1.0, dtype=torch.float64, device=x.device)
    for t in progress(range(cfg.num_train_timesteps - 1, -1, -ratio)):
        a_t, a_prev = acp[t], acp[t - ratio] if t - ratio >= 0 else one
        x0 = _x0_from(denoise(x, t).double(), x.double(), a_t, cfg.prediction_type)
        alpha = a_t / a_prev
        mean = (a_prev.sqrt() * (1 - alpha) / (1 - a_t)) * x0 + (
            alpha.sqrt() * (1 - a_prev) / (1 - a_t)
        ) * x
        if t - ratio >= 0:
            var = ((1 - a_prev) / (1 - a_t) * (1 - alpha)).clamp(min=1e-20)
            mean = mean + var.sqrt() * noise.randn(tuple(x.shape[1:]), x.device).double()
        x = mean.float()
    return x


@SAMPLERS.register("ddim")
def _ddim(denoise, x, noise, cfg: ScheduleConfig, steps: int, progress) -> torch.Tensor:
    sched = ddim_scheduler(cfg)
    sched.set_timesteps(steps, device=x.device)
    for t in progress(sched.timesteps):
        x, _ = sched.step(denoise(x, int(t)), int(t), x)
    return x


def _ddim_eta_step(
    denoise, x, noise: StackedNoise, cfg: ScheduleConfig, steps: int, progress, *, eta: float
) -> torch.Tensor:
    """DDIM with stochasticity ``eta`` (Song et al. 2021, eq. 12) and per-sample noise.

    MONAI's ``DDIMScheduler.step`` takes one generator for the whole batch, which would tie a
    sample to its batch; the update is written out so noise comes from ``noise`` instead.
    """
    sched = ddim_scheduler(cfg)
    sched.set_timesteps(steps, device=x.device)
    acp = sched.alphas_cumprod.to(x.device, torch.float64)
    final = torch.as_tensor(sched.final_alpha_cumprod, dtype=torch.float64, device=x.device)
    stride = cfg.num_train_timesteps // steps
    for t in progress(sched.timesteps):
        t = int(t)
        a_t = acp[t]
        a_prev = acp[t - stride] if t - stride >= 0 else final
        xd = x.double()
        x0 = _x0_from(denoise(x, t).double(), xd, a_t, cfg.prediction_type)
        eps = (xd - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        x = (x + sigma * noise.randn(tuple(x.shape[1:]), x.device).double()).float()
    return x


@SAMPLERS.register("dpmpp")
def _dpmpp(denoise, x, noise, cfg: ScheduleConfig, steps: int, progress) -> torch.Tensor:
    sched = dpmpp_scheduler(cfg)
    sched.set_timesteps(steps, device=x.device)
    for t in progress(sched.timesteps):
        x = sched.step(denoise(x, int(t)), t, x, return_dict=False)[0]
    return x


@SAMPLERS.register("euler")
def _euler(denoise, x, noise, cfg: ScheduleConfig, steps: int, progress) -> torch.Tensor:
    sched = training_scheduler(cfg)
    sched.set_timesteps(steps, device=x.device, input_img_size_numel=x[0, 0].numel())
    ts = [int(t) for t in sched.timesteps]
    for i, t in enumerate(progress(ts)):
        nxt = ts[i + 1] if i + 1 < len(ts) else 0
        x, _ = sched.step(denoise(x, t), t, x, next_timestep=nxt)
    return x


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    cfg: ScheduleConfig,
    labels: Sequence[int] | torch.Tensor,
    seeds: Sequence[int],
    *,
    image_shape: tuple[int, int, int],
    null_label: int,
    sampler: str = "dpmpp",
    steps: int = 20,
    guidance_scale: float = 1.0,
    ddim_eta: float = 0.0,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    net_batch: int = 16,
    progress=None,
    clip: bool = True,
    cond: torch.Tensor | None = None,
    x_init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generate one image per (label, seed): ``(B, C, H, W)`` float32 clamped to [-1, 1].

    ``image_shape`` is ``(C, H, W)``; ``null_label`` the class index used for the unconditional
    pass; ``guidance_scale`` 0 = unconditional, 1 = conditional only, > 1 = guided.
    ``net_batch``: rows per network call (padded); bit-identity holds for a fixed value.
    ``ddim_eta``: DDIM stochasticity in [0, 1] (0 = deterministic DDIM; only for ``ddim``).
    ``clip``: clamp the result to [-1, 1] (off for latents, which are not bounded).
    ``cond``: ``(B, Cc, H, W)`` concatenated to the noisy input at every call (SR3-style
    conditioning; the network takes ``C + Cc`` channels and predicts ``C``).
    ``x_init``: ``(B, C, H, W)`` starting noise instead of the seeds' first draw (tiled
    upscaling crops it from one full-size draw, so overlapping tiles start alike); later
    stochastic draws still come from ``seeds``.
    """
    if len(labels) != len(seeds):
        raise ValueError(f"{len(labels)} labels but {len(seeds)} seeds")
    if cfg.kind == "rflow" and sampler != "euler":
        raise ValueError(f"rflow schedules sample with 'euler', not {sampler!r}")
    if cfg.kind != "rflow" and sampler == "euler":
        raise ValueError("the 'euler' sampler needs schedule kind 'rflow'")
    if ddim_eta and sampler != "ddim":
        raise ValueError(f"ddim_eta applies to sampler 'ddim' only, not {sampler!r}")
    fn = SAMPLERS.get(sampler)
    if ddim_eta:
        fn = partial(_ddim_eta_step, eta=float(ddim_eta))
    device = torch.device(device)
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    noise = StackedNoise(seeds)
    x = noise.randn(image_shape, device) if x_init is None else x_init.to(device).float()
    if cond is not None:
        cond = cond.to(device).float()

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    denoise = _Denoiser(model, labels, null_label, float(guidance_scale), autocast, net_batch, cond)
    was_training = model.training
    model.eval()
    try:
        x = fn(denoise, x, noise, cfg, steps, progress or (lambda it: it))
    finally:
        model.train(was_training)
    return x.clamp(-1, 1) if clip else x
