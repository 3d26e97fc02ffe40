"""Schedules, objective and sampler: shapes, schedule agreement, per-sample determinism."""

import numpy as np
import pytest
import torch

from medsynth.diffusion.consistency import x0_from_prediction
from medsynth.diffusion.sampler import SAMPLERS, StackedNoise, sample
from medsynth.diffusion.schedule import ScheduleConfig, dpmpp_scheduler, training_scheduler
from medsynth.diffusion.unet import UNetConfig, build_unet

TINY = UNetConfig(
    num_classes=2, channels=[16, 32], attention_levels=[False, True], num_head_channels=16
)


@pytest.fixture(scope="module")
def perturbed_unet():
    # A fresh MONAI UNet outputs exactly zero (zero-initialised output conv): perturb it so
    # sampler tests see a network that depends on its inputs.
    torch.manual_seed(0)
    m = build_unet(TINY)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


@pytest.mark.parametrize("betas", ["linear_beta", "scaled_linear_beta", "cosine"])
def test_dpmpp_uses_the_training_betas(betas):
    cfg = ScheduleConfig(beta_schedule=betas)
    monai = training_scheduler(cfg).alphas_cumprod.double()
    diff = dpmpp_scheduler(cfg).alphas_cumprod.double()
    tol = 2e-3 if betas == "cosine" else 1e-6
    assert torch.allclose(monai, diff, atol=tol), (monai - diff).abs().max()


@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", 25), ("ddim", 10), ("dpmpp", 10)])
def test_sample_k_is_bit_identical_whatever_the_batch(perturbed_unet, sampler, steps):
    kw = dict(
        image_shape=(1, 16, 16), null_label=2, sampler=sampler, steps=steps, guidance_scale=2.0
    )
    a = sample(perturbed_unet, ScheduleConfig(), [0, 1, 0, 1, 1], [10, 11, 12, 13, 14], **kw)
    b = sample(perturbed_unet, ScheduleConfig(), [1, 0], [13, 12], **kw)
    assert a.shape == (5, 1, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a[2], b[1]) and torch.equal(a[3], b[0])
    assert not torch.equal(a[0], a[2])  # different seeds, different images


def test_guidance_changes_output_and_scale_one_is_single_pass(perturbed_unet):
    kw = dict(image_shape=(1, 16, 16), null_label=2, sampler="ddim", steps=5)
    one = sample(perturbed_unet, ScheduleConfig(), [0, 1], [1, 2], guidance_scale=1.0, **kw)
    two = sample(perturbed_unet, ScheduleConfig(), [0, 1], [1, 2], guidance_scale=3.0, **kw)
    calls = []
    h = perturbed_unet.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    sample(perturbed_unet, ScheduleConfig(), [0, 1], [1, 2], guidance_scale=1.0, net_batch=2, **kw)
    assert calls == [2] * 5  # one pass per step, no null-class batch
    calls.clear()
    sample(perturbed_unet, ScheduleConfig(), [0, 1], [1, 2], guidance_scale=3.0, net_batch=2, **kw)
    h.remove()
    assert calls == [2] * 10  # conditional + null class
    assert not torch.allclose(one, two)


def test_unknown_sampler_and_rflow_pairing(perturbed_unet):
    kw = dict(image_shape=(1, 16, 16), null_label=2, steps=2)
    with pytest.raises(KeyError, match="valid choices: ddim, ddpm, distilled, dpmpp, euler"):
        sample(perturbed_unet, ScheduleConfig(), [0], [0], sampler="heun", **kw)
    with pytest.raises(ValueError, match="euler"):
        sample(perturbed_unet, ScheduleConfig(kind="rflow"), [0], [0], sampler="ddim", **kw)
    out = sample(perturbed_unet, ScheduleConfig(kind="rflow"), [0], [0], sampler="euler", **kw)
    assert torch.isfinite(out).all()
    assert SAMPLERS.names() == ["ddim", "ddpm", "distilled", "dpmpp", "euler"]


def test_stacked_noise_is_per_sample():
    a = StackedNoise([1, 2, 3]).randn((4,))
    b = StackedNoise([3]).randn((4,))
    assert torch.equal(a[2], b[0])


def test_class_embedding_survives_groupnorm():
    """With 8 groups (not one channel per group), the class embedding changes the output."""
    torch.manual_seed(0)
    m = build_unet(TINY)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([500, 500])
    a = m(x, timesteps=t, class_labels=torch.tensor([0, 0]))
    b = m(x, timesteps=t, class_labels=torch.tensor([1, 1]))
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()
    assert np.isfinite(a.detach().numpy()).all()


def _diffusers_ddim(denoise, x, noise, cfg, steps, progress):
    """diffusers' DDIM, trailing spacing: its fixed stride T // n is exact when n divides T."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="scaled_linear",
        prediction_type=cfg.prediction_type,
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        x = sched.step(denoise(x, int(t)), t, x).prev_sample
    return x


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
def test_ddim_matches_diffusers_at_eta_zero_and_ddpm_at_eta_one(
    perturbed_unet, monkeypatch, prediction
):
    import medsynth.diffusion.sampler as smp

    cfg = ScheduleConfig(prediction_type=prediction)
    kw = dict(image_shape=(1, 16, 16), null_label=2, sampler="ddim", steps=8, guidance_scale=2.0)
    labels, seeds = [0, 1, 1], [5, 6, 7]
    ours = sample(perturbed_unet, cfg, labels, seeds, **kw)
    with monkeypatch.context() as m:
        m.setitem(smp.SAMPLERS._items, "ddim", _diffusers_ddim)
        ref = sample(perturbed_unet, cfg, labels, seeds, **kw)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    # eta = 1 is the DDPM posterior (Song et al. 2021): the ancestral sampler, draw for draw.
    eta = sample(perturbed_unet, cfg, labels, seeds, ddim_eta=1.0, **kw)
    ddpm = sample(perturbed_unet, cfg, labels, seeds, **dict(kw, sampler="ddpm"))
    assert torch.allclose(eta, ddpm, atol=1e-4), (eta - ddpm).abs().max()
    assert (eta - ours).abs().max() > 1e-2  # stochastic steps move the sample
    again = sample(perturbed_unet, cfg, [1], [7], ddim_eta=1.0, **kw)
    assert torch.equal(eta[2], again[0])  # noise is the sample's own, whatever the batch
    with pytest.raises(ValueError, match="ddim_eta"):
        sample(perturbed_unet, cfg, [0], [1], **dict(kw, sampler="dpmpp"), ddim_eta=0.5)


def _ddpm_before_revision_2(denoise, x, noise, cfg, steps, progress):
    """The ancestral sampler as it was before the trailing grid (a stride over range)."""
    acp = training_scheduler(cfg).alphas_cumprod.to(x.device, torch.float64)
    ratio = cfg.num_train_timesteps // steps
    one = torch.tensor(1.0, dtype=torch.float64)
    for t in range(cfg.num_train_timesteps - 1, -1, -ratio):
        a_t, a_prev = acp[t], acp[t - ratio] if t - ratio >= 0 else one
        x0 = x0_from_prediction(denoise(x, t).double(), x.double(), a_t, cfg.prediction_type)
        alpha = a_t / a_prev
        mean = (a_prev.sqrt() * (1 - alpha) / (1 - a_t)) * x0 + (
            alpha.sqrt() * (1 - a_prev) / (1 - a_t)
        ) * x
        if t - ratio >= 0:
            var = ((1 - a_prev) / (1 - a_t) * (1 - alpha)).clamp(min=1e-20)
            mean = mean + var.sqrt() * noise.randn(tuple(x.shape[1:]), x.device).double()
        x = mean.float()
    return x


@pytest.mark.parametrize("steps", [10, 25])
def test_ddpm_is_unchanged_where_steps_divide_t(perturbed_unet, monkeypatch, steps):
    """Its pools keep their hashes there (sampler_revision), so the pixels must not move."""
    import medsynth.diffusion.sampler as smp

    kw = dict(image_shape=(1, 16, 16), null_label=2, sampler="ddpm", steps=steps)
    now = sample(perturbed_unet, ScheduleConfig(), [0, 1], [3, 4], guidance_scale=2.0, **kw)
    with monkeypatch.context() as m:
        m.setitem(smp.SAMPLERS._items, "ddpm", _ddpm_before_revision_2)
        before = sample(perturbed_unet, ScheduleConfig(), [0, 1], [3, 4], guidance_scale=2.0, **kw)
    assert torch.equal(now, before)


def test_trailing_timesteps():
    from medsynth.diffusion.timesteps import trailing_timesteps

    assert trailing_timesteps(1000, 10) == list(range(999, 0, -100))
    assert trailing_timesteps(1000, 1) == [999]
    ts = trailing_timesteps(1000, 30)
    assert len(ts) == 30 and ts[0] == 999 and ts[-1] == 32
    assert trailing_timesteps(1000, 16)[-1] == 62  # 62.5 rounds half up, in integers
    for n in range(1, 1001):  # n distinct steps from T - 1 down, never below 0
        ts = trailing_timesteps(1000, n)
        assert len(ts) == n and ts[0] == 999 and ts[-1] >= 0
        assert all(a > b for a, b in zip(ts, ts[1:], strict=False))
    with pytest.raises(ValueError, match="steps"):
        trailing_timesteps(1000, 0)
