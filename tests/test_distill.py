"""Consistency distillation: a tiny teacher that knows where each class puts its blob, a student
distilled from it, and the ``distilled`` sampler (determinism, guidance, FD, resume, errors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsynth.diffusion.consistency import ConsistencyConfig, sampling_timesteps
from medsynth.diffusion.sampler import sample
from medsynth.diffusion.schedule import ScheduleConfig
from medsynth.diffusion.unet import UNetConfig
from medsynth.evaluation.fidelity import fd
from medsynth.training.checkpoint import load_snapshot
from medsynth.training.distill import _guided, _pseudo_huber, distill
from medsynth.training.loop import train

PX = 16
# 8 groups of 2+ channels: the class embedding is not normalised away (DESIGN rule 10).
TINY = UNetConfig(
    channels=[16, 32], attention_levels=[False, False], num_head_channels=16, norm_num_groups=8
)


def blobs(n: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 1, 16, 16)`` in [-1, 1]: a bright blob left (class 0) or right (class 1) of centre."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    yy, xx = torch.meshgrid(torch.arange(PX), torch.arange(PX), indexing="ij")
    cx = torch.where(y == 0, PX * 0.3, PX * 0.7)[:, None, None] + torch.randn(n, 1, 1, generator=g)
    cy = PX / 2 + torch.randn(n, 1, 1, generator=g)
    blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (PX / 6) ** 2))
    x = -0.8 + 1.6 * blob + 0.05 * torch.randn(n, PX, PX, generator=g)
    return x[:, None].clamp(-1, 1), y


def features(images: torch.Tensor) -> np.ndarray:
    """``(N, 4)``: blob centre (x, y) in px, mean and standard deviation of intensity."""
    w = images[:, 0] + 1
    ar = torch.arange(PX, dtype=torch.float32)
    cx = (w.sum(1) * ar).sum(1) / w.sum((1, 2))
    cy = (w.sum(2) * ar).sum(1) / w.sum((1, 2))
    return torch.stack([cx, cy, images.mean((1, 2, 3)), images.std((1, 2, 3))], 1).numpy()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    x, y = blobs()
    common = dict(batch_size=32, checkpoint_every_steps=10_000, progress=False, device="cpu")
    teacher = train(
        x,
        y,
        ["left", "right"],
        root / "train",
        unet=UNetConfig(**TINY.to_dict()),
        schedule=ScheduleConfig(),
        max_steps=150,
        lr=3e-3,
        warmup_steps=20,
        ema_halflife_steps=20,
        **common,
    )
    student = distill(teacher, x, y, root / "distill", max_steps=60, **common)
    return {"teacher": teacher, "student": student, "x": x, "y": y, "root": root}


def _student_samples(snap, labels, seeds, steps=4, **kw):
    m, sc, cfg = load_snapshot(snap)
    return sample(
        m,
        sc,
        labels,
        seeds,
        image_shape=(1, PX, PX),
        null_label=2,
        sampler="distilled",
        steps=steps,
        guidance_scale=2.0,
        distilled=cfg["distill"],
        net_batch=8,
        **kw,
    )


def test_sampling_timesteps_follow_the_grid():
    cc = ConsistencyConfig(solver_steps=50)
    assert sampling_timesteps(1000, cc, 1) == [999]
    assert sampling_timesteps(1000, cc, 4) == [999, 739, 499, 239]
    with pytest.raises(ValueError, match="1..50 steps"):
        sampling_timesteps(1000, cc, 0)


def test_teacher_guidance_one_pass_at_scale_one():
    """At guidance 1 the null-class pass cancels: the teacher runs once, with the same result."""
    calls = []

    def teacher(x, timesteps, class_labels):
        calls.append(len(x))
        return x * (1 + class_labels.view(-1, 1, 1, 1)) + timesteps.view(-1, 1, 1, 1) / 1000

    x, t, y = torch.randn(4, 1, 2, 2), torch.tensor([9, 19, 29, 39]), torch.tensor([0, 1, 0, 1])
    cond, uncond = teacher(x, t, y).double(), teacher(x, t, torch.full_like(y, 2)).double()
    calls.clear()
    for scale in (1.0, 2.5):
        want = uncond + scale * (cond - uncond)
        torch.testing.assert_close(_guided(teacher, x, t, y, 2, scale), want)
    assert calls == [4, 8]


def test_student_is_deterministic_per_seed(models):
    a = _student_samples(models["student"], [0, 1, 1], [5, 6, 7])
    b = _student_samples(models["student"], [1, 0], [7, 5])
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    c = _student_samples(models["student"], [0, 1, 1], [5, 6, 7])
    assert torch.equal(a, c)
    d = _student_samples(models["student"], [0], [8])
    assert not torch.equal(a[0], d[0])  # another seed, another sample


@pytest.mark.parametrize("steps", [1, 4])
def test_student_honours_the_class_like_its_teacher(models, steps):
    labels, seeds = [0] * 24 + [1] * 24, list(range(48))
    student = features(_student_samples(models["student"], labels, seeds, steps=steps))
    m, sc, _ = load_snapshot(models["teacher"])
    teacher = features(
        sample(
            m,
            sc,
            labels,
            seeds,
            image_shape=(1, PX, PX),
            null_label=2,
            sampler="dpmpp",
            steps=20,
            guidance_scale=2.0,
        )
    )
    s0, s1 = student[:24, 0].mean(), student[24:, 0].mean()
    t0, t1 = teacher[:24, 0].mean(), teacher[24:, 0].mean()
    assert t1 - t0 > 2.5  # the teacher separates the classes by > 2.5 px
    assert s1 - s0 > 2.5  # so does the student, in one conditional pass per step
    assert abs(s0 - t0) < 0.75 and abs(s1 - t1) < 0.75  # and where the teacher puts them


def test_student_fd_within_tolerance_of_teacher(models):
    x = models["x"]
    labels, seeds = [0] * 64 + [1] * 64, [1000 + i for i in range(128)]
    real = features(x)
    m, sc, _ = load_snapshot(models["teacher"])
    kw = dict(image_shape=(1, PX, PX), null_label=2, guidance_scale=2.0)
    fd_teacher = fd(real, features(sample(m, sc, labels, seeds, sampler="dpmpp", steps=20, **kw)))
    fd_student = fd(real, features(_student_samples(models["student"], labels, seeds)))
    # Noise only: two draws of 128 real images are about 0.1 apart in this space.
    assert fd_student <= 1.5 * fd_teacher + 0.1, (fd_student, fd_teacher)


def test_distill_resumes_the_exact_stream(models, tmp_path):
    x, y = models["x"], models["y"]
    kw = dict(batch_size=8, progress=False, device="cpu", checkpoint_every_steps=2)
    whole = distill(models["teacher"], x, y, tmp_path / "a", max_steps=4, **kw)
    distill(models["teacher"], x, y, tmp_path / "b", max_steps=2, **kw)
    resumed = distill(models["teacher"], x, y, tmp_path / "b", max_steps=4, **kw)
    wa, wb = load_snapshot(whole)[0].state_dict(), load_snapshot(resumed)[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(ValueError, match="another teacher or settings"):
        distill(models["teacher"], x, y, tmp_path / "b", max_steps=6, **dict(kw, batch_size=4))


def test_sampler_and_snapshot_must_agree(models):
    m, sc, cfg = load_snapshot(models["teacher"])
    kw = dict(image_shape=(1, PX, PX), null_label=2, steps=2)
    with pytest.raises(ValueError, match="needs a distilled snapshot"):
        sample(m, sc, [0], [0], sampler="distilled", guidance_scale=2.0, **kw)
    student_cfg = load_snapshot(models["student"])[2]
    assert student_cfg["distill"]["guidance_scale"] == 2.0
    assert student_cfg["teacher"]["snapshot_sha256"]
    with pytest.raises(ValueError, match="samples with sampler 'distilled' only"):
        sample(m, sc, [0], [0], sampler="dpmpp", distilled=student_cfg["distill"], **kw)
    with pytest.raises(ValueError, match="guidance 2 distilled in"):
        sample(
            m,
            sc,
            [0],
            [0],
            sampler="distilled",
            guidance_scale=3.0,
            distilled=student_cfg["distill"],
            **kw,
        )


def test_generate_pool_with_the_student(models, tmp_path):
    from medsynth.generation.pool import generate_pool

    res = generate_pool(
        models["student"],
        tmp_path / "pool",
        {"left": 2, "right": 2},
        sampler="distilled",
        steps=4,
        guidance_scale=2.0,
        device="cpu",
        progress=False,
    )
    assert res["pool_images"] == 4 and res["pool_complete"]
    manifest = (tmp_path / "pool" / "manifest.csv").read_text()
    assert ",distilled,4," in manifest
    with pytest.raises(ValueError, match="is a distilled student"):
        generate_pool(
            models["student"], tmp_path / "p2", {"left": 1}, sampler="dpmpp", progress=False
        )
    with pytest.raises(ValueError, match="plain diffusion snapshot"):
        generate_pool(
            models["teacher"], tmp_path / "p3", {"left": 1}, sampler="distilled", progress=False
        )


def test_protocol_without_distill_keeps_its_hash():
    from medsynth.protocol import parse_protocol

    plain = parse_protocol("dataset: {kind: phantoms}\n", [])
    assert "distill" not in plain.dump()
    with_section = parse_protocol("dataset: {kind: phantoms}\ndistill: {max_steps: 10}\n", [])
    assert with_section.distill.max_steps == 10
    assert with_section.sha256() != plain.sha256()


def test_sampling_an_eval_model_does_not_switch_modes(models, monkeypatch):
    m, sc, cfg = load_snapshot(models["student"])
    assert not m.training

    def no_switch(mode=True):
        raise AssertionError("train()/eval() walked the module tree on the latency path")

    monkeypatch.setattr(m, "train", no_switch)
    kw = dict(image_shape=(1, PX, PX), null_label=2, sampler="distilled", steps=1)
    sample(m, sc, [0], [0], guidance_scale=2.0, distilled=cfg["distill"], **kw)
    monkeypatch.undo()
    m.train()
    sample(m, sc, [0], [0], guidance_scale=2.0, distilled=cfg["distill"], **kw)
    assert m.training  # a model in training mode is put back


def test_a_distilled_pool_depends_on_the_distill_settings():
    from medsynth.protocol import parse_protocol
    from medsynth.runfolder import stage_inputs

    def gen_hash(*sets):
        return stage_inputs(parse_protocol("dataset: {kind: phantoms}\n", list(sets)))["generate"]

    plain = gen_hash()
    assert gen_hash("distill.max_steps=7") == plain  # a dpmpp pool does not use the student
    fast = gen_hash("generation.sampler=distilled")
    assert fast != plain
    assert gen_hash("generation.sampler=distilled", "distill.max_steps=2000") == fast  # default
    assert gen_hash("generation.sampler=distilled", "distill.max_steps=7") != fast
    # A knob added later keeps the hash at its old-behaviour value and changes it otherwise.
    assert gen_hash("generation.sampler=distilled", "distill.huber_over=pixel") == fast
    assert gen_hash("generation.sampler=distilled", "distill.huber_over=image") != fast


def test_pseudo_huber_per_pixel_or_per_image():
    """Per pixel (c small) every pixel pulls equally hard; per image the pull follows the error."""
    target = torch.zeros(2, 1, 2, 2)
    pred = torch.tensor([[[[0.1, 0.2], [0.4, 0.8]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    grads = {}
    for over in ("pixel", "image"):
        p = pred.clone().requires_grad_(True)
        _pseudo_huber(p, target, 1e-6, over).backward()
        grads[over] = p.grad[0].flatten()
    g = grads["pixel"] / grads["pixel"][0]
    torch.testing.assert_close(g, torch.ones(4), rtol=1e-3, atol=0)
    g = grads["image"] / grads["image"][0]
    torch.testing.assert_close(g, torch.tensor([1.0, 2.0, 4.0, 8.0]), rtol=1e-4, atol=0)
    rms = pred[0].pow(2).mean().sqrt()  # a perfect image adds 0; the other its RMS error
    torch.testing.assert_close(
        _pseudo_huber(pred, target, 1e-6, "image"), rms / 2, rtol=1e-4, atol=0
    )
    with pytest.raises(ValueError, match="'pixel' or 'image'"):
        _pseudo_huber(pred, target, 1e-6, "images")


CLI_YAML = """\
name: fast
dataset:
  kind: phantoms
  spatial_size: 16
  workers: 1
  phantoms: {n_patients: 12, size_px: 32}
model: {channels: [16, 32], attention_levels: [false, false], num_head_channels: 16}
training: {max_steps: 4, batch_size: 4, checkpoint_every_steps: 4, warmup_steps: 1}
distill: {max_steps: 3, batch_size: 4, checkpoint_every_steps: 2}
generation: {per_class: 2, sampler: distilled, steps: 2}
"""


def test_cli_distill_then_generate(tmp_path):
    from typer.testing import CliRunner

    from medsynth.cli import app
    from medsynth.data.ingest import ingest_dataset
    from medsynth.protocol import parse_protocol
    from medsynth.training.api import train_from_sections

    run, p = tmp_path / "run", tmp_path / "p.yaml"
    p.write_text(CLI_YAML)
    proto = parse_protocol(CLI_YAML)
    ingest_dataset(proto.dataset, run)
    cli, base = CliRunner(), [str(p), "--run-dir", str(run)]
    res = cli.invoke(app, ["distill", *base])
    assert res.exit_code == 2 and "run `medsynth train` first" in res.output
    train_from_sections(
        run / "ingest", run / "train", proto.model, proto.schedule, proto.training, progress=False
    )
    res = cli.invoke(app, ["generate", *base])
    assert res.exit_code == 2 and "run `medsynth distill` first" in res.output
    res = cli.invoke(app, ["distill", *base])
    assert res.exit_code == 0 and "snapshot-0000003" in res.output, res.output
    res = cli.invoke(app, ["generate", *base])
    assert res.exit_code == 0, res.output
    rows = (run / "generate" / "main" / "manifest.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and all(",distilled,2," in r for r in rows[1:])
