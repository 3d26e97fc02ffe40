"""Issue 18 candidate knobs: Min-SNR loss weighting, class-balanced batches, rescaled guidance
and guidance interval; their protocol fields, hashes, resume and sweep expansion."""

import csv
import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from medsynth.diffusion.objective import diffusion_loss, draw, min_snr_weights
from medsynth.diffusion.sampler import _Denoiser, _x0_maps, sample
from medsynth.diffusion.schedule import ScheduleConfig, training_scheduler
from medsynth.diffusion.unet import UNetConfig, build_unet
from medsynth.experiment.sweep import SweepPlan, _pool_sha, estimate, expand, pool_protocol
from medsynth.protocol import ProtocolError, load_protocol, parse_protocol
from medsynth.runfolder import stage_inputs
from medsynth.training.loop import draw_indices, draw_weights, train

ROOT = Path(__file__).resolve().parents[1]
TINY = UNetConfig(
    num_classes=2, channels=[16, 32], attention_levels=[False, True], num_head_channels=16
)
BASE = "dataset: {kind: phantoms}\n"


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    m = build_unet(TINY)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


# --- protocol ----------------------------------------------------------------------------------


def test_defaults_are_the_old_behaviour_and_keep_every_hash():
    p = parse_protocol(BASE)
    assert p.training.loss_weighting == "uniform" and p.training.min_snr_gamma == 5.0
    assert p.training.class_balance == "none"
    assert p.generation.guidance_rescale == 0.0 and p.generation.guidance_interval == [0.0, 1.0]
    # Hashes computed with the code before these knobs existed: run folders stay valid. (The
    # quickstart then said precision bf16; it says auto now.)
    q = load_protocol(ROOT / "protocols" / "quickstart.yaml", ["training.precision=bf16"])
    assert q.sha256() == "db3df2a2a3735c195575e5a3b8168da73e0a81f99129a5230efbbaa201979f93"
    assert stage_inputs(q)["report"] == (
        "c3072f187a163e02c427bc350388395804023d3b76d0fa076fa84f304e0988ab"
    )
    # Off the default, a knob is part of the identity of its stage and the ones after it.
    r = load_protocol(
        ROOT / "protocols" / "quickstart.yaml",
        ["training.precision=bf16", "generation.guidance_rescale=0.7"],
    )
    a, b = stage_inputs(q), stage_inputs(r)
    assert a["train"] == b["train"] and a["generate"] != b["generate"] and q.sha256() != r.sha256()


def test_set_overrides_reach_the_new_knobs():
    p = parse_protocol(
        BASE,
        [
            "training.loss_weighting=min_snr",
            "training.min_snr_gamma=3",
            "training.class_balance=sqrt",
            "generation.guidance_rescale=0.5",
            "generation.guidance_interval=[0.2, 0.8]",
        ],
    )
    assert (p.training.loss_weighting, p.training.min_snr_gamma) == ("min_snr", 3.0)
    assert p.training.class_balance == "sqrt"
    assert p.generation.guidance_rescale == 0.5 and p.generation.guidance_interval == [0.2, 0.8]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.loss_weighting=minsnr", "loss_weighting.*'uniform' or 'min_snr'"),
        ("training.min_snr_gamma=0", "min_snr_gamma.*greater than 0"),
        ("training.class_balance=equal", "class_balance.*'none', 'balanced' or 'sqrt'"),
        ("generation.guidance_rescale=1.5", "guidance_rescale.*less than or equal to 1"),
        ("generation.guidance_interval=[0.8, 0.2]", "0 <= lo < hi <= 1; got \\[0.8, 0.2\\]"),
        ("generation.guidance_interval=[0.5]", "guidance_interval must be \\[lo, hi\\]"),
    ],
)
def test_bad_values_fail_loudly(override, message):
    with pytest.raises(ProtocolError, match=message):
        parse_protocol(BASE, [override])


def test_min_snr_with_rflow_is_refused_clearly():
    with pytest.raises(ProtocolError, match="min_snr.*'ddpm'.*not 'rflow'"):
        parse_protocol(BASE, ["training.loss_weighting=min_snr", "schedule.kind=rflow"])


# --- loss weighting ----------------------------------------------------------------------------


def test_min_snr_weights_follow_the_paper():
    cfg = ScheduleConfig()
    acp = training_scheduler(cfg).alphas_cumprod
    t = torch.tensor([0, 100, 500, 999])
    snr = (acp[t] / (1 - acp[t])).double()
    eps = min_snr_weights(acp, t, "epsilon", 5.0).double()
    v = min_snr_weights(acp, t, "v_prediction", 5.0).double()
    assert torch.allclose(eps, snr.clamp(max=5) / snr, rtol=1e-5)
    assert torch.allclose(v, snr.clamp(max=5) / (snr + 1), rtol=1e-5)
    assert snr[0] > 5 > snr[-1]  # both branches of the min are exercised
    assert eps[-1] == pytest.approx(1.0) and eps[0] < 0.1


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_loss_weights_each_sample(unet, prediction):
    cfg = ScheduleConfig(prediction_type=prediction)
    sched = training_scheduler(cfg)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    y = torch.tensor([0, 1, 0, 1])
    d = draw(tuple(x.shape), cfg.num_train_timesteps, 0.0, torch.Generator().manual_seed(3))
    d.timesteps = torch.tensor([5, 200, 600, 990])
    uniform = diffusion_loss(unet, sched, cfg, x, y, d, null_label=2)
    weighted = diffusion_loss(
        unet, sched, cfg, x, y, d, null_label=2, loss_weighting="min_snr", min_snr_gamma=5.0
    )
    # By hand: the per-sample MSE times the weight, averaged.
    noisy = sched.add_noise(x, d.noise, d.timesteps)
    target = d.noise if prediction == "epsilon" else sched.get_velocity(x, d.noise, d.timesteps)
    pred = unet(noisy, timesteps=d.timesteps, class_labels=y)
    per = (pred - target).pow(2).flatten(1).mean(1)
    w = min_snr_weights(sched.alphas_cumprod, d.timesteps, prediction, 5.0)
    assert torch.allclose(weighted, (w * per).mean(), rtol=1e-5)
    assert torch.allclose(uniform, F.mse_loss(pred, target), rtol=1e-6)
    assert not torch.allclose(uniform, weighted)
    with pytest.raises(ValueError, match="not 'rflow'"):
        diffusion_loss(
            unet, sched, ScheduleConfig(kind="rflow"), x, y, d, 2, loss_weighting="min_snr"
        )


# --- class balance -----------------------------------------------------------------------------


def test_class_balance_draws_classes_as_asked():
    labels = torch.tensor([0] * 90 + [1] * 10)
    assert draw_weights(labels, "none") is None
    g = torch.Generator().manual_seed(0)
    # The default keeps the original randint stream bit for bit.
    assert torch.equal(
        draw_indices(100, 64, None, g), torch.randint(0, 100, (64,), generator=g.manual_seed(0))
    )
    for mode, share_of_1 in (("balanced", 0.5), ("sqrt", 1 / (1 + 3))):  # sqrt(90)/sqrt(10) = 3
        w = draw_weights(labels, mode)
        assert w.sum().item() == pytest.approx(1.0)
        assert w[labels == 1].sum().item() == pytest.approx(share_of_1)
        idx = draw_indices(100, 20000, w, torch.Generator().manual_seed(1))
        assert (labels[idx] == 1).float().mean().item() == pytest.approx(share_of_1, abs=0.02)
    with pytest.raises(ValueError, match="valid choices: none, balanced, sqrt"):
        draw_weights(labels, "even")


def _fit(out: Path, **kw) -> Path:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(20, 1, 16, 16, generator=g) * 2 - 1
    labels = torch.tensor([0] * 16 + [1] * 4)
    cfg = UNetConfig(channels=[16, 32], attention_levels=[False, True], num_head_channels=16)
    args = dict(max_steps=6, batch_size=4, warmup_steps=2, checkpoint_every_steps=3)
    args.update(kw)
    return train(images, labels, ["a", "b"], out, unet=cfg, progress=False, **args)


def test_balanced_min_snr_training_resumes_bit_identically(tmp_path):
    from safetensors.torch import load_file

    kw = dict(class_balance="balanced", loss_weighting="min_snr", min_snr_gamma=5.0)
    ref = load_file(_fit(tmp_path / "ref", **kw) / "ema.safetensors")
    # Interrupted after step 3: the newest state and snapshot of step 6 are gone.
    run = tmp_path / "run"
    _fit(run, **kw)
    (run / "state-0000006.pt").unlink()
    shutil.rmtree(run / "snapshot-0000006")
    again = load_file(_fit(run, **kw) / "ema.safetensors")
    assert ref.keys() == again.keys() and all(torch.equal(ref[k], again[k]) for k in ref)
    # Another batch stream is not the same run: resuming it is refused.
    with pytest.raises(ValueError, match="another model, schedule or class list"):
        _fit(run, class_balance="sqrt", max_steps=9)
    plain = load_file(_fit(tmp_path / "plain") / "ema.safetensors")
    assert not all(torch.equal(ref[k], plain[k]) for k in ref)  # the knobs change training


# --- guidance ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "rflow"])
def test_rescale_one_gives_the_conditional_x0_std(unet, prediction):
    cfg = (
        ScheduleConfig(kind="rflow")
        if prediction == "rflow"
        else ScheduleConfig(prediction_type=prediction)
    )
    labels = torch.tensor([0, 1, 1])
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))

    def den(rescale):
        return _Denoiser(unet, labels, 2, 4.0, torch.no_grad, 4, cfg=cfg, rescale=rescale)

    t = 600
    with torch.no_grad():
        cond = den(0.0)._net(x, t, labels)
        plain, full, half = den(0.0)(x, t), den(1.0)(x, t), den(0.5)(x, t)
    acp = None if cfg.kind == "rflow" else training_scheduler(cfg).alphas_cumprod.double()
    to_x0, _ = _x0_maps(cfg, x.double(), t, acp)
    std = [to_x0(p.double()).std(dim=(1, 2, 3)) for p in (cond, plain, full, half)]
    assert torch.allclose(std[2], std[0], rtol=1e-4)  # phi = 1: the conditional std exactly
    assert (std[1] - std[0]).abs().max() > 1e-3  # plain CFG changes it
    # phi mixes linearly between plain and fully rescaled x0.
    mid = 0.5 * (to_x0(plain.double()) + to_x0(full.double()))
    assert torch.allclose(to_x0(half.double()), mid, atol=1e-4)


@pytest.mark.parametrize(
    ("sched", "sampler"),
    [
        ("ddpm", "ddpm"),
        ("ddpm", "ddim"),
        ("ddpm", "dpmpp"),
        ("ddpm", "ddim-eta"),
        ("rflow", "euler"),
    ],
)
def test_every_sampler_takes_rescale_and_interval_per_sample(unet, sched, sampler):
    cfg = ScheduleConfig(kind=sched)
    kw = dict(
        image_shape=(1, 16, 16),
        null_label=2,
        sampler=sampler.split("-")[0],
        steps=10,
        guidance_scale=3.0,
        ddim_eta=1.0 if sampler == "ddim-eta" else 0.0,
    )
    plain = sample(unet, cfg, [0, 1, 1], [4, 5, 6], **kw)
    assert torch.equal(plain, sample(unet, cfg, [0, 1, 1], [4, 5, 6], guidance_rescale=0.0, **kw))
    knobs = dict(guidance_rescale=0.7, guidance_interval=[0.2, 0.8])
    if sampler != "euler":  # the Karras grid too: still per sample, whatever the batch
        knobs["timestep_spacing"] = "karras"
    a = sample(unet, cfg, [0, 1, 1], [4, 5, 6], **knobs, **kw)
    b = sample(unet, cfg, [1], [6], **knobs, **kw)
    assert torch.isfinite(a).all() and torch.equal(a[2], b[0])
    assert (a - plain).abs().max() > 1e-3


def test_interval_guides_only_inside_and_outside_is_conditional(unet):
    kw = dict(image_shape=(1, 16, 16), null_label=2, sampler="ddim", steps=10, net_batch=2)
    calls = []
    h = unet.register_forward_hook(
        lambda m, a, k, o: calls.append(int(k["timesteps"][0])), with_kwargs=True
    )
    try:
        sample(unet, ScheduleConfig(), [0, 1], [1, 2], guidance_scale=3.0, **kw)
        assert len(calls) == 20
        calls.clear()
        sample(
            unet,
            ScheduleConfig(),
            [0, 1],
            [1, 2],
            guidance_scale=3.0,
            guidance_interval=[0.25, 0.75],
            **kw,
        )
    finally:
        h.remove()
    # Two passes exactly at the steps with t/T in [0.25, 0.75], one pass at the others.
    twice = sorted({t for t in calls if calls.count(t) == 2})
    inside = sorted({t for t in calls if 0.25 <= t / 1000 <= 0.75})
    assert twice == inside and 0 < len(inside) < 10 and len(calls) == 10 + len(inside)
    # An interval no step falls into is the conditional sampler (guidance scale 1).
    assert not [t for t in calls if 300 <= t <= 390]
    cond = sample(unet, ScheduleConfig(), [0, 1], [1, 2], guidance_scale=1.0, **kw)
    none = sample(
        unet,
        ScheduleConfig(),
        [0, 1],
        [1, 2],
        guidance_scale=3.0,
        guidance_interval=[0.30, 0.39],
        **kw,
    )
    assert torch.equal(cond, none)
    with pytest.raises(ValueError, match="guidance_interval"):
        sample(unet, ScheduleConfig(), [0], [1], guidance_interval=[0.5, 0.5], **kw)
    with pytest.raises(ValueError, match="guidance_rescale"):
        sample(unet, ScheduleConfig(), [0], [1], guidance_rescale=2.0, **kw)


# --- sweep -------------------------------------------------------------------------------------


def test_sweep_enumerates_the_guidance_knobs():
    smoke = ROOT / "protocols" / "smoke_sweep.yaml"
    old = [p.name for p in expand(load_protocol(smoke)).pools]
    assert old == ["g2-ddim3-eta0-p1", "g2-ddim3-eta1-p1", "g2-dpmpp3-p1"]  # names unchanged
    proto = load_protocol(
        smoke,
        [
            "sweep.samplers=[{sampler: dpmpp, steps: 3}]",
            "sweep.guidance_rescale=[0, 0.7]",
            "sweep.guidance_interval=[[0, 1], [0.2, 0.8]]",
        ],
    )
    plan = expand(proto)
    names = [p.name for p in plan.pools]
    assert names == [
        "g2-dpmpp3-p1",
        "g2-i0.2-0.8-dpmpp3-p1",
        "g2-r0.7-dpmpp3-p1",
        "g2-r0.7-i0.2-0.8-dpmpp3-p1",
    ]
    gen = pool_protocol(proto, 1.0, plan.pools[3], 10).generation
    assert gen.guidance_rescale == 0.7 and gen.guidance_interval == [0.2, 0.8]
    with pytest.raises(ProtocolError, match="guidance_rescale values must lie in"):
        load_protocol(smoke, ["sweep.guidance_rescale=[1.2]"])


# The smoke sweep's unguided DPM-Solver++ pool as hashed before sweep.class_guidance existed
# (commit 3a00b41): the axis at {} must keep it, or every earlier sweep's pools would rerun.
PLAIN_POOL_SHA = "f9368e53147ee317dd7145ebb876a391164697c4237bee170fec166555457b3b"


def test_sweep_enumerates_guidance_per_class(tmp_path):
    from medsynth.experiment.runner import StudyError

    smoke = ROOT / "protocols" / "smoke_sweep.yaml"
    sets = ["sweep.samplers=[{sampler: dpmpp, steps: 3}]", "sweep.guidance_scale=[1]"]
    axis = "sweep.class_guidance=[{}, {opacity: 2}, {normal: 3, opacity: 1.5}]"
    proto = load_protocol(smoke, [*sets, axis])
    plan = expand(proto)
    assert [p.name for p in plan.pools] == [
        "g1-dpmpp3-p1",
        "g1-c.opacity_2-dpmpp3-p1",
        "g1-c.normal_3-c.opacity_1.5-dpmpp3-p1",
    ]
    gen = pool_protocol(proto, 1.0, plan.pools[2], 10).generation
    assert gen.class_guidance == {"normal": 3.0, "opacity": 1.5}
    assert pool_protocol(proto, 1.0, plan.pools[0], 10).generation.class_guidance == {}
    # Each pool its own identity; the unguided pool keeps the hash it had before the axis.
    shas = [_pool_sha(proto, 1.0, p) for p in plan.pools]
    assert len(set(shas)) == 3 and shas[0] == PLAIN_POOL_SHA
    plain = load_protocol(smoke, sets)
    assert _pool_sha(plain, 1.0, expand(plain).pools[0]) == PLAIN_POOL_SHA
    # A guided class takes the null pass as well: the estimate counts it per class.
    secs = [
        estimate(proto, SweepPlan([1.0], [p], ["proportional"], ["random"], [1.0]), tmp_path)
        for p in plan.pools
    ]
    gen_s = [e["generate"] for e in secs]
    assert gen_s[0] < gen_s[1] < gen_s[2] == pytest.approx(2 * gen_s[0])
    # A class given the scale every class has already would only repeat a pool.
    with pytest.raises(StudyError, match=r"gives \['opacity'\] the scale 1"):
        expand(load_protocol(smoke, [*sets, "sweep.class_guidance=[{}, {opacity: 1}]"]))
    with pytest.raises(ProtocolError, match="lists a value twice"):
        load_protocol(smoke, ["sweep.class_guidance=[{opacity: 2}, {opacity: 2.0}]"])
    with pytest.raises(ProtocolError, match="greater than or equal to 0"):
        load_protocol(smoke, ["sweep.class_guidance=[{opacity: -2}]"])
    # Where the protocol names its classes, a typo fails at load; numeric names are names.
    full = ROOT / "protocols" / "pneumoniamnist_sweep_1h.yaml"
    with pytest.raises(ProtocolError, match=r"sweep.class_guidance names unknown classes"):
        load_protocol(full, ["sweep.class_guidance=[{}, {Normal: 2}]"])
    rsna = ROOT / "protocols" / "rsna_sweep_cpu.yaml"
    two = load_protocol(rsna, ["sweep.class_guidance=[{1: 11.5}, {0: 1.5}]"]).sweep
    assert two.class_guidance == [{"1": 11.5}, {"0": 1.5}]
    # Names ending in digits stay apart from their scales.
    names = [
        p.name
        for p in expand(load_protocol(smoke, ["sweep.class_guidance=[{a1: 3}, {a: 13}]"])).pools
    ]
    assert len(set(names)) == len(names) and any("-c.a1_3-" in n for n in names)


def test_pool_records_the_guidance_knobs_and_refuses_to_mix(tmp_path):
    import pydicom

    from medsynth.generation.pool import generate_pool

    snap = _fit(tmp_path / "train", max_steps=3)
    kw = dict(sampler="ddim", steps=3, device="cpu", progress=False, net_batch=2)
    knobs = dict(guidance_rescale=0.7, guidance_interval=[0.2, 0.8], timestep_spacing="karras")
    generate_pool(snap, tmp_path / "pool", {"a": 1, "b": 1}, **knobs, **kw)
    ds = pydicom.dcmread(next((tmp_path / "pool" / "dicom" / "b").glob("*.dcm")))
    assert "rescale=0.7 interval=0.2-0.8 spacing=karras" in ds.DerivationDescription
    with pytest.raises(ValueError, match="another request"):
        generate_pool(snap, tmp_path / "pool", {"a": 1, "b": 1}, **kw)
    generate_pool(snap, tmp_path / "plain", {"a": 1}, **kw)
    request = (tmp_path / "plain" / "request.json").read_text()
    assert not {"rescale", "interval", "spacing"} & set(request.split('"'))  # older pools match
    # DDIM since its timestep fix (revision 2): recorded, and a pool of the code before it (a
    # request without the revision) is refused rather than resumed into.
    req = json.loads(request)
    assert req["sampler_revision"] == 2 and "rev=2" in ds.DerivationDescription
    del req["sampler_revision"]
    (tmp_path / "plain" / "request.json").write_text(json.dumps(req))
    with pytest.raises(ValueError, match="another request"):
        generate_pool(snap, tmp_path / "plain", {"a": 1}, **kw)
    generate_pool(snap, tmp_path / "dpmpp", {"a": 1}, **dict(kw, sampler="dpmpp"))
    assert "sampler_revision" not in (tmp_path / "dpmpp" / "request.json").read_text()


def test_report_names_the_guidance_knobs_only_when_set():
    from medsynth.experiment.report import _guidance

    assert _guidance(parse_protocol(BASE).generation) == "guidance 1"
    g = parse_protocol(
        BASE, ["generation.guidance_rescale=0.7", "generation.guidance_interval=[0.2, 0.8]"]
    ).generation
    assert _guidance(g) == "guidance 1 (rescaled, φ 0.7) within t/T ∈ [0.2, 0.8]"


def test_report_names_the_timestep_grid_only_off_the_default():
    from medsynth.experiment.report import _sampler

    assert _sampler(parse_protocol(BASE).generation) == "dpmpp-20"
    g = parse_protocol(BASE, ["generation.timestep_spacing=karras"]).generation
    assert _sampler(g) == "dpmpp-20 on the Karras timestep grid"


# --- guidance per class -----------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
def test_class_guidance_guides_only_its_class_per_sample(unet, sampler):
    kw = dict(image_shape=(1, 16, 16), null_label=2, sampler=sampler, steps=5, net_batch=2)
    labels, seeds = [0, 1, 0, 1], [4, 5, 6, 7]
    per_class = sample(unet, ScheduleConfig(), labels, seeds, class_guidance={0: 3.0}, **kw)
    cond = sample(unet, ScheduleConfig(), labels, seeds, guidance_scale=1.0, **kw)
    guided = sample(unet, ScheduleConfig(), labels, seeds, guidance_scale=3.0, **kw)
    # The other class takes the conditional pass alone: the same pixels as guidance 1.
    assert torch.equal(per_class[1::2], cond[1::2])
    # Its own class is guided at its scale (the null pass in another call: equal up to rounding).
    assert torch.allclose(per_class[0::2], guided[0::2], atol=1e-5)
    assert (per_class[0::2] - cond[0::2]).abs().max() > 1e-3
    # Per sample, whatever else is in the batch.
    alone = sample(unet, ScheduleConfig(), [0], [6], class_guidance={0: 3.0}, **kw)
    assert torch.equal(alone[0], per_class[2])
    # A class set to the global scale changes nothing; every class at 1 is guidance 1.
    same = sample(unet, ScheduleConfig(), labels, seeds, class_guidance={1: 1.0}, **kw)
    assert torch.equal(same, cond)


def test_class_guidance_protocol_pool_and_report(tmp_path):
    import pydicom

    from medsynth.experiment.report import _guidance
    from medsynth.generation.pool import generate_pool

    g = parse_protocol(BASE, ["generation.class_guidance={normal: 2}"]).generation
    assert g.class_guidance == {"normal": 2.0}
    assert _guidance(g) == "guidance 1 (normal: 2)"
    with pytest.raises(ProtocolError, match="class_guidance"):
        parse_protocol(BASE, ["generation.class_guidance={normal: -1}"])
    with pytest.raises(ProtocolError, match="distilled"):
        parse_protocol(
            BASE, ["generation.sampler=distilled", "generation.class_guidance={normal: 2}"]
        )
    # Class names that YAML reads as numbers (RSNA's "0" / "1") are taken as the names.
    rsna = load_protocol(ROOT / "protocols" / "rsna.yaml", ["generation.class_guidance={1: 2}"])
    assert rsna.generation.class_guidance == {"1": 2.0}
    full = ROOT / "protocols" / "pneumoniamnist_full.yaml"
    assert load_protocol(full, ["generation.class_guidance={normal: 2}"]).generation.class_guidance
    with pytest.raises(ProtocolError, match=r"unknown classes \['Normal'\]"):
        load_protocol(full, ["generation.class_guidance={Normal: 2}"])
    # Off its default it is part of the generate stage's identity; at it, hashes are unchanged.
    q = load_protocol(ROOT / "protocols" / "quickstart.yaml")
    r = load_protocol(ROOT / "protocols" / "quickstart.yaml", ["generation.class_guidance={}"])
    s = load_protocol(ROOT / "protocols" / "quickstart.yaml", ["generation.class_guidance={a: 2}"])
    assert stage_inputs(q) == stage_inputs(r)
    assert stage_inputs(q)["train"] == stage_inputs(s)["train"]
    assert stage_inputs(q)["generate"] != stage_inputs(s)["generate"]

    snap = _fit(tmp_path / "train", max_steps=3)
    kw = dict(sampler="dpmpp", steps=3, device="cpu", progress=False, net_batch=2)
    generate_pool(snap, tmp_path / "pool", {"a": 1, "b": 1}, class_guidance={"b": 2.0}, **kw)
    ds = pydicom.dcmread(next((tmp_path / "pool" / "dicom" / "b").glob("*.dcm")))
    assert "class_guidance=b:2" in ds.DerivationDescription
    req = json.loads((tmp_path / "pool" / "request.json").read_text())
    assert req["class_guidance"] == {"b": 2.0}
    with pytest.raises(ValueError, match="another request"):
        generate_pool(snap, tmp_path / "pool", {"a": 1, "b": 1}, **kw)
    with pytest.raises(ValueError, match=r"unknown classes \['normal'\]"):
        generate_pool(snap, tmp_path / "x", {"a": 1}, class_guidance={"normal": 2.0}, **kw)


def test_manifest_records_each_rows_own_guidance_scale(tmp_path):
    """A reviewer filters and reads the scale a sample was drawn at, not the pool's default."""
    from medsynth.generation.pool import generate_pool

    snap = _fit(tmp_path / "train", max_steps=3)
    kw = dict(sampler="dpmpp", steps=3, device="cpu", progress=False, net_batch=2)
    plan = {"a": 2, "b": 1}
    generate_pool(
        snap, tmp_path / "pool", plan, guidance_scale=1.0, class_guidance={"b": 2.5}, **kw
    )
    with open(tmp_path / "pool" / "manifest.csv") as fh:
        scales = [(r["class_name"], float(r["guidance_scale"])) for r in csv.DictReader(fh)]
    assert scales == [("a", 1.0), ("a", 1.0), ("b", 2.5)]


def test_a_set_of_scales_gives_each_row_one_picked_by_its_seed(unet):
    """``class_guidance: {c: [1.5, 2.5]}``: each row of c is drawn at one of the scales, the one
    its seed picks, with the pixels it has in a pool at that single scale."""
    from medsynth.diffusion.sampler import pick_scale

    seeds = list(range(40, 60))
    picks = [pick_scale([1.5, 2.5], s) for s in seeds]
    assert set(picks) == {1.5, 2.5} and 6 <= picks.count(1.5) <= 14  # both, near half each
    assert picks == [pick_scale([1.5, 2.5], s) for s in seeds]  # a function of the seed alone
    assert pick_scale(2.0, 7) == 2.0
    kw = dict(image_shape=(1, 16, 16), null_label=2, sampler="dpmpp", steps=3, net_batch=2)
    labels, seeds = [0, 1, 0, 0, 1, 0], seeds[:6]
    mixed = sample(unet, ScheduleConfig(), labels, seeds, class_guidance={0: [1.5, 2.5]}, **kw)
    at = {
        v: sample(unet, ScheduleConfig(), labels, seeds, class_guidance={0: v}, **kw)
        for v in (1.5, 2.5)
    }
    for i, (y, s) in enumerate(zip(labels, seeds, strict=True)):
        want = at[pick_scale([1.5, 2.5], s)] if y == 0 else at[1.5]  # class 1: guidance 1
        assert torch.equal(mixed[i], want[i])
    assert {pick_scale([1.5, 2.5], s) for y, s in zip(labels, seeds, strict=True) if y == 0} == {
        1.5,
        2.5,
    }


def test_a_set_of_scales_in_the_protocol_pool_manifest_and_report(tmp_path):
    import pydicom

    from medsynth.diffusion.sampler import pick_scale
    from medsynth.experiment.report import _guidance
    from medsynth.generation.pool import generate_pool

    g = parse_protocol(BASE, ["generation.class_guidance={normal: [2.5, 1.5]}"]).generation
    assert g.class_guidance == {"normal": [1.5, 2.5]}  # sorted: the order draws nothing
    assert g.guided
    assert _guidance(g) == "guidance 1 (normal: 1.5 or 2.5 by seed)"
    for bad, why in (
        ("[2]", "two or more"),
        ("[2, 2]", "twice"),
        ("[1.5, -1]", ">= 0"),
        ("-1", ">= 0"),
        ("[]", "two or more"),
    ):
        with pytest.raises(ProtocolError, match=why):
            parse_protocol(BASE, [f"generation.class_guidance={{normal: {bad}}}"])
    q = ROOT / "protocols" / "quickstart.yaml"
    a = load_protocol(q, ["generation.class_guidance={a: [1.5, 2.5]}"])
    b = load_protocol(q, ["generation.class_guidance={a: [2.5, 1.5]}"])
    assert stage_inputs(a) == stage_inputs(b)
    assert stage_inputs(a)["generate"] != stage_inputs(load_protocol(q))["generate"]
    with pytest.raises(ProtocolError, match="single pool"):
        load_protocol(
            ROOT / "protocols" / "class_guidance_sweep.yaml",
            ["generation.class_guidance={normal: [1.5, 2.5]}"],
        )
    # Autoguidance refuses a set reaching below 1 (a row would move towards the guide).
    with pytest.raises(ProtocolError, match=r"normal: 0.5\|2"):
        load_protocol(
            ROOT / "protocols" / "pneumoniamnist_full.yaml",
            ["generation.autoguidance=true", "generation.class_guidance={normal: [0.5, 2]}"],
        )

    snap = _fit(tmp_path / "train", max_steps=3)
    kw = dict(sampler="dpmpp", steps=3, device="cpu", progress=False, net_batch=2)
    sets = dict(guidance_scale=1.0, class_guidance={"b": [1.5, 2.5]})
    generate_pool(snap, tmp_path / "pool", {"a": 1, "b": 6}, **sets, **kw)
    with open(tmp_path / "pool" / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:  # each row lists the scale it was drawn at
        want = pick_scale([1.5, 2.5], int(r["seed"])) if r["class_name"] == "b" else 1.0
        assert float(r["guidance_scale"]) == want
    assert {float(r["guidance_scale"]) for r in rows if r["class_name"] == "b"} == {1.5, 2.5}
    req = json.loads((tmp_path / "pool" / "request.json").read_text())
    assert req["class_guidance"] == {"b": [1.5, 2.5]}
    for r in rows:
        ds = pydicom.dcmread(tmp_path / "pool" / r["path"])
        assert "class_guidance=b:1.5|2.5" in ds.DerivationDescription
        picked = f"scale={float(r['guidance_scale']):g}"
        assert (picked in ds.DerivationDescription) == (r["class_name"] == "b")


# --- autoguidance --------------------------------------------------------------------------------


def _weaker(unet):
    """A guide: the model's weights, slightly perturbed (seeded)."""
    torch.manual_seed(1)
    weak = build_unet(TINY)
    with torch.no_grad():
        for p, q in zip(weak.parameters(), unet.parameters(), strict=True):
            p.copy_(q + torch.randn_like(q) * 0.02)
    return weak


def test_autoguidance_extrapolates_from_the_guide_under_each_rows_class(unet):
    weak = _weaker(unet)
    x, t, labels = torch.randn(3, 1, 16, 16), 500, torch.tensor([0, 1, 0])

    def den(scale, guide, **kw):
        return _Denoiser(unet, labels, 2, scale, nullcontext, 2, guide=guide, **kw)(x, t)

    with torch.no_grad():
        m = unet(x, timesteps=torch.full((3,), t), class_labels=labels)
        g = weak(x, timesteps=torch.full((3,), t), class_labels=labels)  # own class, not null
        torch.testing.assert_close(den(2.5, weak), g + 2.5 * (m - g), atol=1e-5, rtol=0)
        # Per class: rows at scale 1 keep the model's conditional prediction.
        per = den(1.0, weak, scales=[2.5, 1.0, 2.5])
        torch.testing.assert_close(per[1], m[1], atol=1e-6, rtol=0)
        torch.testing.assert_close(per[0::2], (g + 2.5 * (m - g))[0::2], atol=1e-5, rtol=0)
    # A guide equal to the model changes nothing at any scale, through a whole sampler.
    kw = dict(image_shape=(1, 16, 16), null_label=2, sampler="dpmpp", steps=4, net_batch=2)
    plain = sample(unet, ScheduleConfig(), [0, 1], [3, 4], **kw)
    same = sample(unet, ScheduleConfig(), [0, 1], [3, 4], guidance_scale=3.0, guide=unet, **kw)
    torch.testing.assert_close(same, plain, atol=1e-6, rtol=0)
    # A weaker guide moves the samples, and not as the null class would.
    auto = sample(unet, ScheduleConfig(), [0, 1], [3, 4], guidance_scale=2.0, guide=weak, **kw)
    cfg = sample(unet, ScheduleConfig(), [0, 1], [3, 4], guidance_scale=2.0, **kw)
    assert (auto - plain).abs().max() > 1e-3 and (auto - cfg).abs().max() > 1e-3
    assert weak.training  # its mode switched back after sampling


def test_autoguidance_for_some_classes_guides_the_others_from_the_null_class(unet):
    weak = _weaker(unet)
    x, t, labels = torch.randn(3, 1, 16, 16), 500, torch.tensor([0, 1, 0])
    with torch.no_grad():
        m = unet(x, timesteps=torch.full((3,), t), class_labels=labels)
        g = weak(x, timesteps=torch.full((3,), t), class_labels=labels)
        u = unet(x, timesteps=torch.full((3,), t), class_labels=torch.full((3,), 2))
        den = _Denoiser(unet, labels, 2, 2.5, nullcontext, 2, guide=weak, guide_classes=[1])
        out = den(x, t)
        torch.testing.assert_close(out[1], (g + 2.5 * (m - g))[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[0::2], (u + 2.5 * (m - u))[0::2], atol=1e-5, rtol=0)
    # Through a sampler each class is what it would be in a pool guided one way for all: the
    # autoguided class as under autoguidance, the other as under null-class guidance (at its own
    # scale), bit for bit — so a mixed pool is the per-class pools put together.
    kw = dict(image_shape=(1, 16, 16), null_label=2, sampler="dpmpp", steps=4, net_batch=2)
    labels, seeds = [0, 1, 0, 1], [3, 4, 5, 6]
    mixed = sample(
        unet,
        ScheduleConfig(),
        labels,
        seeds,
        guidance_scale=1.5,
        class_guidance={0: 2.0},
        guide=weak,
        guide_classes=[1],
        **kw,
    )
    auto = sample(unet, ScheduleConfig(), labels, seeds, guidance_scale=1.5, guide=weak, **kw)
    cfg = sample(unet, ScheduleConfig(), labels, seeds, guidance_scale=2.0, **kw)
    assert torch.equal(mixed[1::2], auto[1::2]) and torch.equal(mixed[0::2], cfg[0::2])
    assert (mixed[0::2] - auto[0::2]).abs().max() > 1e-3


class _CondStub(torch.nn.Module):
    """Any network of the sampler's signature: 1 image + 1 condition channel in, 1 out."""

    def forward(self, x, timesteps, class_labels):
        return 0.5 * x[:, :1] + 0.1 * x[:, 1:] + 0.1 * class_labels.view(-1, 1, 1, 1).float()


def test_class_guidance_with_a_concatenated_condition_passes_each_row_its_own():
    kw = dict(image_shape=(1, 8, 8), null_label=2, sampler="dpmpp", steps=3, net_batch=2)
    cond = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels, seeds = [0, 1, 0], [1, 2, 3]
    per = sample(
        _CondStub(), ScheduleConfig(), labels, seeds, cond=cond, class_guidance={0: 2.0}, **kw
    )
    plain = sample(_CondStub(), ScheduleConfig(), labels, seeds, cond=cond, **kw)
    guided = sample(
        _CondStub(), ScheduleConfig(), labels, seeds, cond=cond, guidance_scale=2.0, **kw
    )
    assert torch.equal(per[1], plain[1])
    torch.testing.assert_close(per[0::2], guided[0::2], atol=1e-5, rtol=0)
