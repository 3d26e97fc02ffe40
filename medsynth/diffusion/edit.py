"""Editing real images with a class-conditional model: RePaint inpainting and SDEdit variations.

Both loops are written out here (house rule 1) on the same ``_Denoiser`` as sampling, with one CPU
generator per edit (``StackedNoise``): edit k depends only on (its source image, its mask, its
target label, its seed), never on batch size or order.

- :func:`repaint` (Lugmayr et al. 2022): ancestral DDPM on ``steps`` levels; after every step the
  region outside the mask is replaced by the source noised to the same level, and every
  ``jump_length`` levels the sample is pushed back up ``jump_length`` levels by the forward process
  and denoised again, ``resamplings`` times in all (1 = plain masked replacement). The last step
  copies the source exactly outside the mask.
- :func:`sdedit` (Meng et al. 2022): noise the source to strength ``s`` (timestep ``s * T``) and
  denoise it with deterministic DDIM, optionally under another class (a counterfactual).

Only variance-preserving (``ddpm``-kind) schedules: both methods need the closed-form forward
process ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from medsynth.diffusion.sampler import StackedNoise, _Denoiser, _x0_from
from medsynth.diffusion.schedule import ScheduleConfig, training_scheduler


def repaint_schedule(steps: int, jump_length: int, resamplings: int) -> list[int]:
    """Level indices visited by RePaint, from ``steps`` (pure noise) down to -1 (clean).

    A step to a lower index denoises, a step to a higher one re-noises (the jump back). This is
    RePaint's ``get_schedule_jump``: every ``jump_length`` levels, ``resamplings - 1`` jumps.
    """
    if steps < 1 or jump_length < 1 or resamplings < 1:
        raise ValueError(
            f"steps, jump_length and resamplings must be >= 1, got {steps}, {jump_length}, "
            f"{resamplings}"
        )
    jumps = {j: resamplings - 1 for j in range(0, steps - jump_length, jump_length)}
    t, ts = steps, []
    while t >= 1:
        t -= 1
        ts.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                ts.append(t)
    ts.append(-1)
    return ts


def _check(cfg: ScheduleConfig, sources: torch.Tensor, labels, seeds) -> None:
    if cfg.kind != "ddpm":
        raise ValueError(
            f"editing needs a variance-preserving ('ddpm') schedule, this model has {cfg.kind!r}"
        )
    if not (len(sources) == len(labels) == len(seeds)):
        raise ValueError(f"{len(sources)} sources, {len(labels)} labels, {len(seeds)} seeds")


def _setup(model, labels, null_label, guidance_scale, device, bf16, net_batch):
    device = torch.device(device)
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    return device, _Denoiser(model, labels, null_label, float(guidance_scale), autocast, net_batch)


@torch.no_grad()
def repaint(
    model: torch.nn.Module,
    cfg: ScheduleConfig,
    sources: torch.Tensor,
    masks: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    seeds: Sequence[int],
    *,
    null_label: int,
    steps: int = 50,
    jump_length: int = 10,
    resamplings: int = 5,
    guidance_scale: float = 1.0,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    net_batch: int = 16,
) -> torch.Tensor:
    """Inpaint ``masks`` of ``sources`` under ``labels``: ``(B, C, H, W)`` float32 in [-1, 1].

    ``sources``: ``(B, C, H, W)`` in [-1, 1]; ``masks``: ``(B, 1, H, W)`` in {0, 1}, 1 = region to
    regenerate. ``steps``: denoising levels (a subsequence of the training timesteps);
    ``jump_length``/``resamplings``: RePaint's j and r (r = 1 turns resampling off). Network
    calls: about ``steps * resamplings`` (times two with guidance).
    """
    _check(cfg, sources, labels, seeds)
    if masks.shape[0] != sources.shape[0] or masks.shape[-2:] != sources.shape[-2:]:
        raise ValueError(f"masks {tuple(masks.shape)} do not match sources {tuple(sources.shape)}")
    steps = min(steps, cfg.num_train_timesteps)
    dev, denoise = _setup(model, labels, null_label, guidance_scale, device, bf16, net_batch)
    acp = training_scheduler(cfg).alphas_cumprod.to(dev, torch.float64)
    ratio = cfg.num_train_timesteps // steps
    taus = [i * ratio + ratio - 1 for i in range(steps)]  # level i -> training timestep

    def a(level: int) -> torch.Tensor:
        return acp[taus[level]] if level >= 0 else acp.new_tensor(1.0)

    noise = StackedNoise(seeds)
    shape = tuple(sources.shape[1:])
    x0_src = sources.to(dev, torch.float64)
    m = masks.to(dev, torch.float64).expand_as(x0_src)

    def known(level: int) -> torch.Tensor:
        a_l = a(level)
        return a_l.sqrt() * x0_src + (1 - a_l).sqrt() * noise.randn(shape, dev).double()

    sched = repaint_schedule(steps, jump_length, resamplings)
    x = noise.randn(shape, dev).double()
    x = m * x + (1 - m) * known(sched[0])
    was_training = model.training
    model.eval()
    try:
        for cur, nxt in zip(sched[:-1], sched[1:], strict=True):
            a_t, a_n = a(cur), a(nxt)
            if nxt < cur:
                # Denoise one level (ancestral DDPM posterior), then paste the known region.
                x0 = _x0_from(denoise(x.float(), taus[cur]).double(), x, a_t, cfg.prediction_type)
                x0 = x0.clamp(-1, 1)
                alpha = a_t / a_n
                x = (a_n.sqrt() * (1 - alpha) / (1 - a_t)) * x0 + (
                    alpha.sqrt() * (1 - a_n) / (1 - a_t)
                ) * x
                if nxt >= 0:
                    var = ((1 - a_n) / (1 - a_t) * (1 - alpha)).clamp(min=1e-20)
                    x = x + var.sqrt() * noise.randn(shape, dev).double()
                x = m * x + (1 - m) * (known(nxt) if nxt >= 0 else x0_src)
            else:
                # Jump back: forward process from level cur to the noisier level nxt.
                r = a_n / a_t
                x = r.sqrt() * x + (1 - r).sqrt() * noise.randn(shape, dev).double()
    finally:
        model.train(was_training)
    return x.float().clamp(-1, 1)


@torch.no_grad()
def sdedit(
    model: torch.nn.Module,
    cfg: ScheduleConfig,
    sources: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    seeds: Sequence[int],
    *,
    strength: float,
    null_label: int,
    steps: int = 50,
    guidance_scale: float = 1.0,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    net_batch: int = 16,
) -> torch.Tensor:
    """SDEdit variations of ``sources`` under ``labels``: ``(B, C, H, W)`` float32 in [-1, 1].

    ``strength`` in (0, 1]: noise level as a share of the training timesteps (0.3 keeps layout
    and most texture, 1.0 is a fresh sample). ``steps``: DDIM steps of a full (strength 1) run;
    a run of strength s takes ``max(1, round(s * steps))``.
    """
    _check(cfg, sources, labels, seeds)
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    dev, denoise = _setup(model, labels, null_label, guidance_scale, device, bf16, net_batch)
    acp = training_scheduler(cfg).alphas_cumprod.to(dev, torch.float64)
    t_start = max(0, round(strength * cfg.num_train_timesteps) - 1)
    n = max(1, round(strength * steps))
    ts = torch.linspace(t_start, 0, n + 1).round().long().tolist()[:-1]  # descending, > 0 mostly
    noise = StackedNoise(seeds)
    x0_src = sources.to(dev, torch.float64)
    a0 = acp[ts[0]]
    x = a0.sqrt() * x0_src + (1 - a0).sqrt() * noise.randn(tuple(sources.shape[1:]), dev).double()
    was_training = model.training
    model.eval()
    try:
        for i, t in enumerate(ts):
            a_t = acp[t]
            a_prev = acp[ts[i + 1]] if i + 1 < len(ts) else acp.new_tensor(1.0)
            x0 = _x0_from(denoise(x.float(), t).double(), x, a_t, cfg.prediction_type)
            x0 = x0.clamp(-1, 1)
            eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    finally:
        model.train(was_training)
    return x.float().clamp(-1, 1)
