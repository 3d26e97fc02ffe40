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


@pytest.mark.parametrize(
    ("sampler", "steps", "eta", "spacing"),
    [
        ("dpmpp", 10, 0.0, "trailing"),
        ("ddpm", 25, 0.0, "trailing"),
        ("ddim", 50, 0.0, "trailing"),
        ("ddim", 10, 0.0, "trailing"),
        ("ddim", 20, 0.0, "trailing"),
        ("ddim", 10, 1.0, "trailing"),
        ("ddim", 30, 0.0, "trailing"),
        ("ddpm", 30, 0.0, "trailing"),
        ("dpmpp", 50, 0.0, "karras"),
        ("dpmpp", 10, 0.0, "karras"),
        ("ddim", 50, 0.0, "karras"),
        ("ddim", 20, 1.0, "karras"),
        ("ddpm", 30, 0.0, "karras"),
    ],
)
def test_network_is_told_the_noise_level_the_image_is_at(sampler, steps, eta, spacing):
    cfg = ScheduleConfig()
    spy = ZeroDataSpy(cfg)
    n = 64
    kw = dict(image_shape=(1, 16, 16), null_label=1, net_batch=n, clip=False)
    sample(
        spy,
        cfg,
        [0] * n,
        list(range(n)),
        sampler=sampler,
        steps=steps,
        ddim_eta=eta,
        timestep_spacing=spacing,
        **kw,
    )
    assert len(spy.calls) == steps
    if spacing == "karras":  # EDM's grid ends at t = 0, with distinct calls
        assert spy.calls[-1][0] == 0 and len({t for t, _ in spy.calls}) == steps
    for t, std in spy.calls:
        want = (1 - spy.acp[t]).sqrt().item()
        assert abs(std / want - 1) < 0.05, (
            f"{sampler}-{steps} called at t={t}: std {std:.4f}, level says {want:.4f}"
        )


# Generate-stage hashes of the quickstart (precision bf16, as pinned in test_quality_knobs)
# computed by the code before the revision-2 samplers.
BEFORE_REVISION_2 = {
    ("ddim", 10): "bba3d4a953306eac87f81446d815f6318bb566bd60cc0228037163aac403cb8c",
    ("ddpm", 20): "183999e22f4b85012819c62719ad985957622389b64ad6c7ad9b463119a2c1f9",
    ("ddpm", 30): "635e9a63be5ffe053a8d531e1dd3a07297ef7f29bf775b11c018aa7ec68def9e",
    ("dpmpp", 20): "b922454887e22ebbc1595e69c85648cb0b8da2f9888e8af955cd8f28805c29aa",
}


@pytest.mark.parametrize(("sampler", "steps"), list(BEFORE_REVISION_2))
def test_a_pool_of_a_revised_sampler_is_remade_and_no_other(sampler, steps):
    """DDIM, and DDPM where ``steps`` does not divide T, changed pixels: their old pools must
    not be resumed into. Every other pool keeps its hash (no needless regeneration)."""
    from pathlib import Path

    from medsynth.protocol import load_protocol
    from medsynth.runfolder import stage_inputs

    root = Path(__file__).resolve().parents[1]
    sets = ["training.precision=bf16", f"generation.sampler={sampler}", f"generation.steps={steps}"]
    now = stage_inputs(load_protocol(root / "protocols" / "quickstart.yaml", sets))["generate"]
    changed = sampler == "ddim" or 1000 % steps != 0
    assert (now != BEFORE_REVISION_2[sampler, steps]) == changed


def test_a_sweep_pool_of_ddim_is_remade_and_dpmpp_is_kept():
    from pathlib import Path

    from medsynth.experiment.sweep import _pool_sha, expand
    from medsynth.protocol import load_protocol

    root = Path(__file__).resolve().parents[1]
    p = load_protocol(root / "protocols" / "smoke_sweep.yaml")
    pools = {pool.name: pool for pool in expand(p).pools_at(0.5)}
    before = {  # the code before revision 2
        "g2-ddim3-eta0-p1": "79b43d91d5b4d86d617fa105f773ed42947172888d81b0d1f15fb5c9dd3bc771",
        "g2-ddim3-eta1-p1": "3de1dd72de30fce237f75ce12fa342769ad2d80f92ec49cd5e10099f75b5686c",
        "g2-dpmpp3-p1": "6f01eb203566cbdbbb689ba90b016862305dc254c376e97094d247bbbe5d55c6",
    }
    for name, sha in before.items():
        assert (_pool_sha(p, 0.5, pools[name]) != sha) == ("ddim" in name), name


@pytest.mark.parametrize(
    ("sampler", "before"),
    [
        ("ddim", "ee6d7f5b5103fcb2fa81b5b5927bae83ac013bb8b61f6cdde7f85a6bb429f0e4"),
        ("dpmpp", "7dd026f463019e42440703a23a4b41b92274c72dc782572d8214a3a2ef1f9d65"),
    ],
)
def test_an_upscaler_sampling_with_ddim_is_compared_again(sampler, before):
    """The train stage compares the upsampler with bicubic using its sampler: a ddim comparison
    of the code before revision 2 is redone (train hash), a dpmpp one is kept."""
    from pathlib import Path

    from medsynth.protocol import load_protocol
    from medsynth.runfolder import stage_inputs

    root = Path(__file__).resolve().parents[1]
    sets = ["training.precision=bf16", f"upscaler={{sampler: {sampler}}}"]
    now = stage_inputs(load_protocol(root / "protocols" / "quickstart.yaml", sets))["train"]
    assert (now != before) == (sampler == "ddim")


def test_karras_grid_is_distinct_descending_and_denser_at_low_noise():
    from medsynth.diffusion.timesteps import karras_timesteps

    for beta in ("scaled_linear_beta", "linear_beta", "cosine"):
        acp = training_scheduler(ScheduleConfig(beta_schedule=beta)).alphas_cumprod.double()
        sigmas = ((1 - acp) / acp).sqrt().tolist()
        assert karras_timesteps(sigmas, 1) == [999]
        for n in (2, 3, 10, 50, 100, 500, 999, 1000):
            ts = karras_timesteps(sigmas, n)
            assert ts[0] == 999 and ts[-1] == 0 and len(ts) == n, (beta, n)
            assert all(a > b for a, b in zip(ts, ts[1:], strict=False)), (beta, n)
    acp = training_scheduler(ScheduleConfig()).alphas_cumprod.double()
    ts = karras_timesteps(((1 - acp) / acp).sqrt().tolist(), 50)
    assert ts[-6:] == [12, 7, 4, 2, 1, 0]  # where the trailing grid has one call, at t = 19
    assert sum(t < 100 for t in ts) >= 10
    with pytest.raises(ValueError, match=r"steps must lie in \[1, 1000\]"):
        karras_timesteps(acp.tolist(), 0)


def test_karras_spacing_is_refused_where_a_sampler_keeps_its_own_grid():
    cfg = ScheduleConfig()
    spy = ZeroDataSpy(cfg)
    kw = dict(image_shape=(1, 8, 8), null_label=1, steps=2)
    with pytest.raises(ValueError, match="must be one of"):
        sample(spy, cfg, [0], [0], sampler="ddim", timestep_spacing="leading", **kw)
    rflow = ScheduleConfig(kind="rflow")
    with pytest.raises(ValueError, match="dpmpp; 'euler' keeps its own grid"):
        sample(spy, rflow, [0], [0], sampler="euler", timestep_spacing="karras", **kw)


def test_timestep_spacing_is_validated_and_part_of_a_pools_identity_off_its_default():
    from pathlib import Path

    from medsynth.protocol import ProtocolError, load_protocol
    from medsynth.runfolder import stage_inputs

    root = Path(__file__).resolve().parents[1]
    quick = root / "protocols" / "quickstart.yaml"
    sets = ["training.precision=bf16", "generation.sampler=dpmpp", "generation.steps=20"]
    q = load_protocol(quick, sets)
    k = load_protocol(quick, [*sets, "generation.timestep_spacing=karras"])
    a, b = stage_inputs(q), stage_inputs(k)
    assert q.generation.timestep_spacing == "trailing"
    assert a["train"] == b["train"] and a["generate"] != b["generate"]
    assert a["generate"] == BEFORE_REVISION_2["dpmpp", 20]  # the default keeps every hash
    with pytest.raises(ProtocolError, match="trailing.*karras"):
        load_protocol(quick, ["generation.timestep_spacing=leading"])
    with pytest.raises(ProtocolError, match="keeps its own grid"):
        load_protocol(quick, ["generation.timestep_spacing=karras", "generation.sampler=distilled"])
