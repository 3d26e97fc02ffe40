"""``medsynth distill``: consistency-distil a trained (teacher) snapshot into a 1-4 step student.

The method and why it was chosen are in :mod:`medsynth.diffusion.consistency`. One step, for a
batch of training images ``x0`` with labels ``y`` (all draws from one seeded generator):

1. pick a grid index ``n`` and noise ``x0`` to ``t_n``;
2. the teacher takes one *guided* DDIM step ``t_n -> t_{n-1}`` (conditional and null-class
   passes mixed with ``guidance_scale``; the conditional one alone at 1): guidance is distilled
   in here;
3. the loss is the pseudo-Huber distance (per pixel, or per image with ``huber_over``) between
   the student's ``f(x_{t_n}, t_n, y)`` and the target network's ``f(x_{t_{n-1}}, t_{n-1}, y)``
   (an EMA of the student, no gradient).

The output folder looks like ``train/``: ``state-*.pt`` (resume) and ``snapshot-*/`` (the target
network's weights, with the teacher's config plus ``distill`` and ``teacher``), so
:func:`~medsynth.training.checkpoint.load_snapshot` and generation treat a student like any
snapshot. Resuming continues the exact stream (same generator, RNG and optimizer state).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from medsynth.diffusion.consistency import (
    ConsistencyConfig,
    consistency_output,
    eps_from_prediction,
    solver_grid,
    x0_from_prediction,
)
from medsynth.diffusion.schedule import training_scheduler
from medsynth.training.checkpoint import (
    clean_orphans,
    latest_state,
    load_snapshot,
    rng_state,
    save_snapshot,
    save_state,
    set_rng_state,
    snapshot_sha256,
)
from medsynth.training.ema import EMA
from medsynth.training.loop import _truncate_log, pick_device


def _pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float, over: str = "pixel") -> torch.Tensor:
    """``sqrt(e^2 + c^2) - c``, quadratic near 0 and linear far, averaged over the batch.

    ``over="pixel"`` (LCM): ``e`` per pixel, so with a small ``c`` every pixel's gradient has the
    same size whatever its error (L1-like). ``over="image"`` (iCT, Song & Dhariwal 2023, on the
    RMS rather than the norm): ``e`` is each image's RMS error, so gradients follow the error
    (L2 direction) and only whole images are down-weighted when far off.
    """
    if over == "image":
        rms2 = ((a - b) ** 2).flatten(1).mean(1)
        return ((rms2 + c**2).sqrt() - c).mean()
    if over != "pixel":
        raise ValueError(f"huber_over must be 'pixel' or 'image', not {over!r}")
    return (((a - b) ** 2 + c**2).sqrt() - c).mean()


def _guided(teacher, x_t, t, y, null: int, scale: float) -> torch.Tensor:
    """The teacher's guided output in float64; at scale 1 the null-class pass cancels out, so
    the teacher runs once (the distillation default, as generation's guidance 1)."""
    if scale == 1.0:
        return teacher(x_t, timesteps=t, class_labels=y).double()
    both = teacher(
        torch.cat([x_t, x_t]),
        timesteps=torch.cat([t, t]),
        class_labels=torch.cat([y, torch.full_like(y, null)]),
    ).double()
    cond, uncond = both.chunk(2)
    return uncond + scale * (cond - uncond)


def distill(
    teacher_dir: str | Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    out_dir: str | Path,
    *,
    max_steps: int = 2000,  # optimizer steps in total (including resumed ones)
    batch_size: int = 64,
    lr: float = 1e-4,  # AdamW learning rate (constant: the student starts at the teacher)
    grad_clip_norm: float = 1.0,
    guidance_scale: float = 2.0,  # teacher guidance distilled into the student
    solver_steps: int = 50,  # teacher DDIM grid: each target is one step of T / solver_steps
    target_ema_halflife_steps: float = 13.5,  # target network EMA (LCM's decay 0.95)
    huber_c: float = 0.001,  # pseudo-Huber constant (LCM)
    huber_over: str = "pixel",  # pixel (LCM) | image (each image's RMS error, iCT-style)
    checkpoint_every_steps: int = 500,
    keep_states: int = 2,
    log_every_steps: int = 10,
    seed: int = 0,
    device: str = "auto",
    resume: bool = True,
    progress: bool = True,
) -> Path:
    """Distil ``teacher_dir`` into a consistency student; return its final snapshot folder.

    ``images``: ``(N, C, H, W)`` float in [-1, 1], the teacher's own training split;
    ``labels``: ``(N,)`` long in ``[0, K)``. The student has the teacher's architecture and
    starts from its weights. Writes ``state-*.pt``, ``snapshot-*/`` and ``log.jsonl`` in
    ``out_dir``.
    """
    dev = pick_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    teacher, sched_cfg, tcfg = load_snapshot(teacher_dir, dev)
    if sched_cfg.kind != "ddpm":
        raise ValueError(
            f"{teacher_dir}: consistency distillation needs a ddpm-kind teacher, not {sched_cfg.kind}"
        )
    if not tcfg["classes"]:
        raise ValueError(f"{teacher_dir}: an unconditional teacher has no guidance to distil")
    teacher.requires_grad_(False)
    cc = ConsistencyConfig(guidance_scale=guidance_scale, solver_steps=solver_steps)
    grid = torch.as_tensor(solver_grid(sched_cfg.num_train_timesteps, solver_steps))
    acp = training_scheduler(sched_cfg).alphas_cumprod.to(dev, torch.float64)
    null = len(tcfg["classes"])
    config = {
        k: v for k, v in tcfg.items() if k not in ("step", "base", "adapter", "distill", "teacher")
    }
    config["distill"] = cc.to_dict()
    config["teacher"] = {"snapshot_sha256": snapshot_sha256(teacher_dir)}
    settings = dict(
        config, lr=lr, batch_size=batch_size, huber_c=huber_c, ema=target_ema_halflife_steps
    )
    if huber_over != "pixel":  # added later: states made before it stay resumable
        settings["huber_over"] = huber_over

    torch.manual_seed(seed)
    student, _, _ = load_snapshot(teacher_dir, dev)
    student.train().requires_grad_(True)
    target = EMA(student, target_ema_halflife_steps)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    clean_orphans(out)
    state = latest_state(out) if resume else None
    if state is not None:
        if state.get("settings") != settings:
            raise ValueError(
                f"{out} holds distillation states of another teacher or settings; resume only "
                "with the same ones (or distil into another folder, or pass --no-resume)"
            )
        student.load_state_dict(state["model"])
        target.module.load_state_dict(state["ema"])
        target.updates = int(state["ema_updates"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["data_generator"])
        set_rng_state(state["rng"])
        step = int(state["step"])
    _truncate_log(out / "log.jsonl", step)
    images, labels = images.float(), labels.long()
    kind = sched_cfg.prediction_type

    def payload() -> dict:
        return {
            "model": student.state_dict(),
            "ema": target.module.state_dict(),
            "ema_updates": target.updates,
            "optimizer": opt.state_dict(),
            "step": step,
            "data_generator": gen.get_state(),
            "rng": rng_state(),
            "settings": settings,
            "config": config,
        }

    bar = tqdm(total=max_steps, initial=step, disable=not progress, unit="step", desc="distill")
    losses, t_last, n_last = [], time.perf_counter(), step
    while step < max_steps:
        # Draw the batch, grid indices and noise for this step from the one generator.
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        n = torch.randint(0, solver_steps, (batch_size,), generator=gen)
        noise = torch.randn(images[idx].shape, generator=gen)
        x0, y = images[idx].to(dev), labels[idx].to(dev)
        t, t_prev = grid[n].to(dev), (grid[n] - grid[0] - 1).clamp(min=0).to(dev)
        shape = (-1,) + (1,) * (x0.dim() - 1)
        a_t, a_prev = acp[t].view(shape), acp[t_prev].view(shape)
        x_t = (a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise.to(dev)).float()
        f_student = consistency_output(
            student(x_t, timesteps=t, class_labels=y), x_t, t, acp, kind, cc
        )
        with torch.no_grad():
            # Teacher: one guided DDIM step t -> t_prev.
            pred = _guided(teacher, x_t, t, y, null, guidance_scale)
            x0_g = x0_from_prediction(pred, x_t.double(), a_t, kind)
            eps_g = eps_from_prediction(pred, x_t.double(), a_t, kind)
            x_prev = (a_prev.sqrt() * x0_g + (1 - a_prev).sqrt() * eps_g).float()
            f_target = consistency_output(
                target.module(x_prev, timesteps=t_prev, class_labels=y),
                x_prev,
                t_prev,
                acp,
                kind,
                cc,
            )
        loss = _pseudo_huber(f_student.float(), f_target.float(), huber_c, huber_over)
        if not torch.isfinite(loss):
            raise ValueError(
                f"non-finite distillation loss at step {step + 1}; the last good state is in "
                f"{out}. Lower distill.lr."
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), grad_clip_norm)
        opt.step()
        target.update(student)
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if step % log_every_steps == 0 or step == max_steps:
            now = time.perf_counter()
            rec = {
                "step": step,
                "loss": sum(losses) / len(losses),
                "grad_norm": float(grad_norm),
                "img_per_s": (step - n_last) * batch_size / (now - t_last),
            }
            with (out / "log.jsonl").open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            t_last, n_last, losses = now, step, []
        if step % checkpoint_every_steps == 0 or step == max_steps:
            save_snapshot(out, step, target.module, config, keep_states)
            save_state(out, step, payload(), keep_states)
    bar.close()
    return out / f"snapshot-{step:07d}"


def distill_from_protocol(
    proto, run_dir: str | Path, *, resume: bool = True, progress=True
) -> Path:
    """Distil the newest snapshot of ``RUN/train`` into ``RUN/distill`` on the same train split
    (``dataset.train_fraction``) the teacher saw, with ``proto.distill`` (defaults if absent)."""
    from medsynth.data.datasets import load_split
    from medsynth.protocol import DistillSection
    from medsynth.training.checkpoint import latest_snapshot

    run = Path(run_dir)
    teacher = latest_snapshot(run / "train")
    data = load_split(
        run / "ingest", "train", proto.dataset.train_fraction, proto.dataset.fraction_seed
    )
    section = proto.distill or DistillSection()
    return distill(
        teacher,
        data.images,
        data.labels,
        run / "distill",
        resume=resume,
        progress=progress,
        **section.model_dump(),
    )
