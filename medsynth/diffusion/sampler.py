"""The denoising loop, written out: network and scheduler meet only here.

Samplers: ``ddpm`` (ancestral, stochastic), ``ddim`` (deterministic at eta = 0), ``dpmpp``
(diffusers' DPM-Solver++ multistep driving the MONAI UNet), ``euler`` (MONAI RFlow, for
``rflow`` schedules) and ``distilled`` (1-4 step consistency sampling of a student made by
``medsynth distill``, guidance distilled in: see :mod:`medsynth.diffusion.consistency`).
ddpm and ddim step over :func:`~medsynth.diffusion.timesteps.trailing_timesteps` (dpmpp over
diffusers' identical "trailing" grid); ``timestep_spacing="karras"`` puts all three on
:func:`~medsynth.diffusion.timesteps.karras_timesteps` instead (EDM's spacing, down to t = 0).
Classifier-free guidance mixes a conditional and a null-class pass; a scale of 1.0 takes the
single-pass path. Every random draw for sample ``k`` comes from its own generator
seeded with ``seeds[k]`` on the CPU, so a sample does not depend on batch size, order or device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from functools import partial

import torch

from medsynth.diffusion.consistency import consistency_sample, x0_from_prediction
from medsynth.diffusion.schedule import (
    ScheduleConfig,
    dpmpp_scheduler,
    training_scheduler,
)
from medsynth.diffusion.timesteps import karras_timesteps, trailing_timesteps
from medsynth.protocol import GRID_SAMPLERS, SPACINGS, ClassScale, scale_values
from medsynth.registry import Registry

SAMPLERS: Registry = Registry("sampler")


def pick_scale(scale: ClassScale, seed: int) -> float:
    """A row's guidance scale: ``scale``, or from a set of scales the one its seed picks.

    The pick hashes the seed alone (SHA-256, mod the set's size), so a row draws the same scale
    in any batch, shard or resume, and its pixels equal those of a pool drawn at that one scale.
    """
    values = scale_values(scale)
    if len(values) == 1:
        return values[0]
    digest = hashlib.sha256(f"guidance-scale-pick:{int(seed)}".encode()).digest()
    return values[int.from_bytes(digest[:8], "big") % len(values)]


def row_scales(
    labels: Sequence[int],
    seeds: Sequence[int],
    guidance_scale: float,
    class_guidance: dict[int, ClassScale],
) -> list[float]:
    """Each row's guidance scale: its class's own (one, or picked from a set by its seed),
    else ``guidance_scale``."""
    return [
        pick_scale(class_guidance.get(int(y), guidance_scale), s)
        for y, s in zip(labels, seeds, strict=True)
    ]


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

    ``rescale`` (phi in [0, 1]): rescaled guidance (Lin et al. 2024, eq. 15-16) applied to the
    x0 the prediction implies, whatever the schedule predicts, so every sampler sees the same
    correction. ``interval`` ``(lo, hi)``: guidance only where ``lo <= t / T <= hi``; outside
    it one conditional pass (Kynkaanniemi et al. 2024). ``guide``: autoguidance (Karras et al.
    2024) — guidance pushes away from this weaker model under each row's own class instead of
    from the null class, so it sharpens without pulling every class towards its typical image;
    ``guide_classes``: the class indices whose rows use it (None: all), the other guided rows
    push away from the null class.
    """

    def __init__(
        self,
        model,
        labels,
        null_label: int,
        guidance_scale: float,
        autocast,
        net_batch: int,
        cfg: ScheduleConfig | None = None,
        rescale: float = 0.0,
        interval: tuple[float, float] = (0.0, 1.0),
        cond: torch.Tensor | None = None,
        scales: Sequence[float] | None = None,
        guide: torch.nn.Module | None = None,
        guide_classes: Iterable[int] | None = None,
    ):
        self.model, self.guide, self.labels = model, guide, labels
        self.scale, self.autocast = guidance_scale, autocast
        # Per-row scales (and guides) when some class has its own: rows at 1 take the
        # conditional pass alone (as with guidance 1 everywhere), so each sample depends only on
        # its class, seed and scale.
        self.row_scale = self.row_guide = None
        some_guided = guide is not None and guide_classes is not None
        if scales is not None or some_guided:
            scales = [guidance_scale] * len(labels) if scales is None else scales
            self.row_scale = torch.tensor(scales, dtype=torch.float32, device=labels.device)
        if some_guided:
            wanted = torch.tensor(sorted(set(guide_classes)), dtype=labels.dtype)
            self.row_guide = torch.isin(labels, wanted.to(labels.device))
        self.null = torch.full_like(labels, null_label)
        self.net_batch = net_batch
        self.cfg, self.rescale, self.interval = cfg or ScheduleConfig(), float(rescale), interval
        self._acp = None
        if self.rescale and self.cfg.kind != "rflow":
            self._acp = training_scheduler(self.cfg).alphas_cumprod.to(torch.float64)
        self.cond = cond  # (B, Cc, H, W) concatenated to the input channels (SR3), or None

    def _net(
        self, x: torch.Tensor, t: int, labels: torch.Tensor, model=None, rows=None
    ) -> torch.Tensor:
        """``model`` (default the sampled one) on ``x``; ``rows``: the mask ``x`` was cut
        with, so a concatenated condition is cut alike (``x`` of 2B rows: both halves)."""
        outs, n = [], self.net_batch
        model = self.model if model is None else model
        if self.cond is not None:
            cond = self.cond if rows is None else self.cond[rows]
            if x.shape[0] == 2 * cond.shape[0]:
                cond = torch.cat([cond, cond])
            x = torch.cat([x, cond], dim=1)
        for i in range(0, x.shape[0], n):
            xc, yc = x[i : i + n], labels[i : i + n]
            pad = n - xc.shape[0]
            if pad:
                xc = torch.cat([xc, xc.new_zeros((pad, *xc.shape[1:]))])
                yc = torch.cat([yc, yc.new_zeros(pad)])
            ts = torch.full((n,), int(t), device=x.device, dtype=torch.long)
            with self.autocast():
                outs.append(model(xc, timesteps=ts, class_labels=yc).float()[: n - pad])
        return torch.cat(outs)

    def guided_at(self, t: int) -> bool:
        """Whether step ``t`` (a training timestep) gets two passes (for some rows)."""
        rows = self.row_scale
        unguided = self.scale == 1.0 if rows is None else bool((rows == 1).all())
        if unguided:
            return False
        lo, hi = self.interval
        return lo <= int(t) / self.cfg.num_train_timesteps <= hi

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:
        if not self.guided_at(t):
            return self._net(x, t, self.labels)
        if self.row_scale is not None:
            return self._per_row(x, t)
        if self.guide is not None:
            cond, uncond = self._net(x, t, self.labels), self._net(x, t, self.labels, self.guide)
        else:
            b = x.shape[0]
            out = self._net(torch.cat([x, x]), t, torch.cat([self.labels, self.null]))
            cond, uncond = out[:b], out[b:]
        guided = uncond + self.scale * (cond - uncond)
        if self.rescale:
            guided = self._rescaled(guided, cond, x, t)
        return guided

    def _per_row(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Class guidance: the conditional pass for every row, the guide's or the null class's
        pass only for the rows whose scale is not 1, mixed with each row's own scale."""
        out = self._net(x, t, self.labels)
        m = self.row_scale != 1
        xm, cond = x[m], out[m]
        uncond = torch.empty_like(cond)
        by_guide = torch.zeros_like(m) if self.guide is None else m.clone()
        if self.row_guide is not None:
            by_guide &= self.row_guide
        # Calls are padded to net_batch, so a row's pass does not depend on which rows share it:
        # a class's samples are the same whichever guide the other classes use.
        for use, model, labels in (
            (by_guide, self.guide, self.labels),
            (m & ~by_guide, None, self.null),
        ):
            if use.any():
                uncond[use[m]] = self._net(x[use], t, labels[use], model, rows=use)
        scale = self.row_scale[m].view(-1, *([1] * (x.dim() - 1)))
        guided = uncond + scale * (cond - uncond)
        if self.rescale:
            guided = self._rescaled(guided, cond, xm, t)
        out[m] = guided
        return out

    def _rescaled(self, guided, cond, x, t: int) -> torch.Tensor:
        """Mix phi of the guided x0 rescaled to the conditional x0's per-sample std, back to
        the prediction space; ``(B, C, H, W)`` float32."""
        to_x0, from_x0 = _x0_maps(self.cfg, x.double(), t, self._acp)
        if to_x0 is None:
            return guided  # t = 0 of rflow: the prediction does not move x
        x0_g, x0_c = to_x0(guided.double()), to_x0(cond.double())
        dims = tuple(range(1, x.ndim))
        ratio = x0_c.std(dim=dims, keepdim=True) / x0_g.std(dim=dims, keepdim=True).clamp(min=1e-12)
        x0 = self.rescale * (x0_g * ratio) + (1 - self.rescale) * x0_g
        return from_x0(x0).float()


def _x0_maps(cfg: ScheduleConfig, x: torch.Tensor, t: int, acp: torch.Tensor | None):
    """``(prediction -> x0, x0 -> prediction)`` at timestep ``t`` for noisy ``x`` (float64).

    ddpm: ``x = sqrt(a) x0 + sqrt(1 - a) eps`` and ``v = sqrt(a) eps - sqrt(1 - a) x0``;
    rflow (MONAI): ``x = (1 - s) x0 + s noise`` with ``s = t / T`` and velocity ``x0 - noise``,
    so ``x0 = x + s v``. Returns ``(None, None)`` where the map is not invertible (s = 0).
    """
    if cfg.kind == "rflow":
        s = int(t) / cfg.num_train_timesteps
        if s <= 0:
            return None, None
        return (lambda v: x + s * v), (lambda x0: (x0 - x) / s)
    a = acp[int(t)].to(x.device)
    sa, sb = a.sqrt(), (1 - a).sqrt()
    if cfg.prediction_type == "v_prediction":
        return (lambda v: sa * x - sb * v), (lambda x0: (sa * x - x0) / sb)
    return (lambda e: (x - sb * e) / sa), (lambda x0: (x - sa * x0) / sb)


_x0_from = x0_from_prediction


def sampling_timesteps(cfg: ScheduleConfig, steps: int, spacing: str = "trailing") -> list[int]:
    """The descending timesteps a ddim, ddpm or dpmpp sampler of ``steps`` calls visits."""
    if spacing == "trailing":
        return trailing_timesteps(cfg.num_train_timesteps, steps)
    if spacing != "karras":
        raise ValueError(f"timestep_spacing must be one of {list(SPACINGS)}, not {spacing!r}")
    acp = training_scheduler(cfg).alphas_cumprod.double()
    return karras_timesteps(((1 - acp) / acp).sqrt().tolist(), steps)


@SAMPLERS.register("ddim")
def _ddim(
    denoise,
    x,
    noise: StackedNoise,
    cfg: ScheduleConfig,
    steps: int,
    progress,
    *,
    eta=0.0,
    spacing="trailing",
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) on the trailing grid, stochasticity ``eta`` in [0, 1].

    Written out rather than MONAI's ``DDIMScheduler``, whose ``step`` moves by a fixed
    ``T // n`` over a ``linspace(T - 1, 0, n)`` grid, so the image is noisier than the level
    the next call is told; it also takes one generator per batch, where here every sample
    draws from its own seed. Float64 update; ``eta = 0`` draws no noise.
    """
    acp = training_scheduler(cfg).alphas_cumprod.to(x.device, torch.float64)
    ts = sampling_timesteps(cfg, steps, spacing)
    one = torch.tensor(1.0, dtype=torch.float64, device=x.device)
    for i, t in enumerate(progress(ts)):
        a_t = acp[t]
        a_prev = acp[ts[i + 1]] if i + 1 < len(ts) else one
        xd = x.double()
        x0 = _x0_from(denoise(x, t).double(), xd, a_t, cfg.prediction_type)
        eps = (xd - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp(min=0).sqrt()
        xd = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta and i + 1 < len(ts):  # the last step (to a_prev = 1) has sigma = 0
            xd = xd + sigma * noise.randn(tuple(x.shape[1:]), x.device).double()
        x = xd.float()
    return x


@SAMPLERS.register("ddpm")
def _ddpm(
    denoise,
    x,
    noise: StackedNoise,
    cfg: ScheduleConfig,
    steps: int,
    progress,
    *,
    spacing="trailing",
) -> torch.Tensor:
    # Ancestral DDPM with fixed_small variance (as MONAI's DDPMScheduler), per-sample noise.
    acp = training_scheduler(cfg).alphas_cumprod.to(x.device, torch.float64)
    ts = sampling_timesteps(cfg, steps, spacing)
    one = torch.tensor(1.0, dtype=torch.float64, device=x.device)
    for i, t in enumerate(progress(ts)):
        last = i + 1 == len(ts)
        a_t, a_prev = acp[t], one if last else acp[ts[i + 1]]
        x0 = _x0_from(denoise(x, t).double(), x.double(), a_t, cfg.prediction_type)
        alpha = a_t / a_prev
        mean = (a_prev.sqrt() * (1 - alpha) / (1 - a_t)) * x0 + (
            alpha.sqrt() * (1 - a_prev) / (1 - a_t)
        ) * x
        if not last:
            var = ((1 - a_prev) / (1 - a_t) * (1 - alpha)).clamp(min=1e-20)
            mean = mean + var.sqrt() * noise.randn(tuple(x.shape[1:]), x.device).double()
        x = mean.float()
    return x


@SAMPLERS.register("dpmpp")
def _dpmpp(
    denoise, x, noise, cfg: ScheduleConfig, steps: int, progress, *, spacing="trailing"
) -> torch.Tensor:
    sched = dpmpp_scheduler(cfg)
    if spacing == "trailing":  # diffusers' own trailing grid: the pools made before the knob
        sched.set_timesteps(steps, device=x.device)
    else:
        sched.set_timesteps(timesteps=sampling_timesteps(cfg, steps, spacing), device=x.device)
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


@SAMPLERS.register("distilled")
def _distilled(denoise, x, noise, cfg: ScheduleConfig, steps: int, progress, *, params=None):
    if params is None:
        raise ValueError(
            "sampler 'distilled' needs a distilled snapshot (made by `medsynth distill`); "
            "this one is a plain diffusion model"
        )
    acp = training_scheduler(cfg).alphas_cumprod
    return consistency_sample(denoise, x, noise, cfg, steps, progress, params=params, acp=acp)


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
    guidance_rescale: float = 0.0,
    guidance_interval: Sequence[float] = (0.0, 1.0),
    timestep_spacing: str = "trailing",
    class_guidance: dict[int, ClassScale] | None = None,
    guide: torch.nn.Module | None = None,
    guide_classes: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    net_batch: int = 16,
    distilled: dict | None = None,
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
    ``guidance_rescale``: phi in [0, 1] of rescaled guidance (0 = plain CFG);
    ``guidance_interval``: ``[lo, hi]`` share of the timestep range ``t / T`` that is guided
    (``[0, 1]`` = every step); other steps take one conditional pass.
    ``timestep_spacing``: ``trailing`` (even in t, the last call at ``T / steps - 1``) or
    ``karras`` (EDM's sigma spacing, the last call at t = 0); ddim, ddpm and dpmpp only.
    ``class_guidance``: class index -> that class's own guidance scale (the others take
    ``guidance_scale``), or a list of scales each row of the class picks one of by its seed
    (:func:`pick_scale`); a row at scale 1 takes one conditional pass, as at guidance 1.
    ``guide``: autoguidance (Karras et al. 2024): a weaker model of the same task (e.g. the
    same recipe trained for fewer steps), on ``device``, called with each row's own class
    where plain guidance calls ``model`` with the null class; a scale ``s`` then gives
    ``guide + s (model - guide)``. ``guide_classes``: the class indices whose guided rows use
    ``guide`` (None: every class); the other guided rows extrapolate from the null class.
    ``distilled``: the student's :class:`ConsistencyConfig` as a dict (its snapshot's
    ``distill``); only with sampler ``distilled``, whose guidance is the distilled-in scale.
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
    if timestep_spacing not in SPACINGS:
        raise ValueError(
            f"timestep_spacing must be one of {list(SPACINGS)}, not {timestep_spacing!r}"
        )
    if timestep_spacing != "trailing" and sampler not in GRID_SAMPLERS:
        raise ValueError(
            f"timestep_spacing {timestep_spacing!r} applies to {', '.join(GRID_SAMPLERS)}; "
            f"{sampler!r} keeps its own grid"
        )
    if not 0 <= guidance_rescale <= 1:
        raise ValueError(f"guidance_rescale must lie in [0, 1], got {guidance_rescale}")
    lo, hi = (float(v) for v in guidance_interval)
    if not 0 <= lo < hi <= 1:
        raise ValueError(
            f"guidance_interval must be [lo, hi] with 0 <= lo < hi <= 1, got {[lo, hi]}"
        )
    fn = SAMPLERS.get(sampler)
    if (distilled is not None) != (sampler == "distilled"):
        raise ValueError(
            "a distilled snapshot samples with sampler 'distilled' only"
            if distilled is not None
            else "sampler 'distilled' needs a distilled snapshot (made by `medsynth distill`)"
        )
    if distilled is not None:
        if float(guidance_scale) != float(distilled["guidance_scale"]):
            raise ValueError(
                f"this student has guidance {distilled['guidance_scale']:g} distilled in; "
                f"set the guidance scale to {distilled['guidance_scale']:g} (got {guidance_scale:g})"
            )
        if class_guidance or guide is not None:
            raise ValueError("class_guidance and guide do not apply to a distilled student")
        fn = partial(_distilled, params=distilled)
        guidance_scale = 1.0  # one conditional pass per step: guidance lives in the weights
    if ddim_eta:
        fn = partial(_ddim, eta=float(ddim_eta))
    if timestep_spacing != "trailing":
        fn = partial(fn, spacing=timestep_spacing)
    device = torch.device(device)
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    noise = StackedNoise(seeds)
    x = noise.randn(image_shape, device) if x_init is None else x_init.to(device).float()
    if cond is not None:
        cond = cond.to(device).float()

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    scales = None  # one scale for every row, unless a class has its own
    if class_guidance:
        scales = row_scales(labels.tolist(), seeds, guidance_scale, class_guidance)
    denoise = _Denoiser(
        model,
        labels,
        null_label,
        float(guidance_scale),
        autocast,
        net_batch,
        cfg=cfg,
        rescale=float(guidance_rescale),
        interval=(lo, hi),
        cond=cond,
        scales=scales,
        guide=guide,
        guide_classes=guide_classes,
    )
    # Switching modes walks every submodule (~30 % of a 1-step single-sample request on a CPU):
    # only a model in training mode is switched, and switched back.
    switched = [m for m in (model, guide) if m is not None and m.training]
    for m in switched:
        m.eval()
    try:
        x = fn(denoise, x, noise, cfg, steps, progress or (lambda it: it))
    finally:
        for m in switched:
            m.train()
    return x.clamp(-1, 1) if clip else x
