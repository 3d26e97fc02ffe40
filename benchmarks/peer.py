"""The peer recipe: MONAI's 2-D classifier-free-guidance DDPM tutorial, run on our ingest.

What a MONAI user follows today, written out so its samples can be scored beside medsynth's
(``benchmarks/quality.py score``) at the same wall-clock budget, on the same train split:

- ``DiffusionModelUNet(channels=(64, 64, 64), attention_levels=(False, True, True),
  num_res_blocks=1, with_conditioning=True, cross_attention_dim=1)``: the class enters as a
  scalar cross-attention context ``(B, 1, 1)`` (class index + 1; dropped labels become -1 with
  probability 0.15, the tutorial's null context);
- epsilon prediction on MONAI's default DDPM schedule (1000 steps, linear betas), MSE loss, Adam;
- sampling with DDIM and classifier-free guidance ``uncond + s * (cond - uncond)``.

Defaults follow the measurement in issue #18 (lr 1e-4, batch 32, bf16 autocast, DDIM-50, s = 3);
``--tutorial`` gives the tutorial's own training settings (lr 2.5e-5, batch 64, fp32) and
``--sampler ddpm`` its 1,000-step DDPM sampling (10 s per guided image on a 2-core CPU, so DDIM-50
is the CPU default). Training stops at ``--seconds`` of wall time (or ``--steps``);
``--checkpoints K`` saves the model at K evenly spaced points of that budget (``ckpt-XX.pt``, for a
time-to-quality curve: ``benchmarks/time_to_quality.py``), then ``--n`` samples are drawn from each
in the test split's class proportions into ``samples-XX.npz`` (``images`` in [-1, 1], ``labels``;
the last one also as ``samples.npz``).

    python benchmarks/peer.py INGEST --out DIR [--seconds 600] [--n 600] [--checkpoints 4]
    python benchmarks/peer.py INGEST --out DIR --smoke      # seconds-sized run for tests
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medsynth.data.datasets import load_split  # noqa: E402


def build_recipe_unet(in_channels: int, channels=(64, 64, 64)):
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=in_channels,
        out_channels=in_channels,
        channels=tuple(channels),
        attention_levels=(False, True, True),
        num_res_blocks=1,
        num_head_channels=channels[-1],
        with_conditioning=True,
        cross_attention_dim=1,
    )


def context(labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, 1, 1)`` scalar class context: class index + 1, or -1 where dropped (null)."""
    c = labels.float() + 1.0
    if drop is not None:
        c = torch.where(drop, torch.full_like(c, -1.0), c)
    return c.view(-1, 1, 1)


def _checkpoint_due(k: int, step: int, elapsed: float, args) -> bool:
    """Has training reached the ``k``-th of ``args.checkpoints`` evenly spaced points (1-based)?"""
    if args.steps:
        return step >= args.steps * k / args.checkpoints
    return elapsed >= args.seconds * k / args.checkpoints


def train(model, images, labels, args, log) -> dict:
    """Train until ``args.seconds`` of wall time or ``args.steps``, saving ``args.checkpoints``
    evenly spaced ``ckpt-XX.pt`` on the way (the last at the end; save time is not training
    time). Returns step count, training seconds and the checkpoints."""
    from monai.networks.schedulers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    t0, step, saving, ckpts = time.perf_counter(), 0, 0.0, []
    while True:
        elapsed = time.perf_counter() - t0 - saving
        done = (args.steps and step >= args.steps) or (not args.steps and elapsed >= args.seconds)
        if step and (done or _checkpoint_due(len(ckpts) + 1, step, elapsed, args)):
            s0 = time.perf_counter()
            path = args.out / f"ckpt-{len(ckpts):02d}.pt"
            torch.save(model.state_dict(), path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)  # appears whole: a watcher times it
            ckpts.append({"file": path.name, "step": step, "train_seconds": elapsed})
            saving += time.perf_counter() - s0
        if done:
            break
        idx = torch.randint(0, len(labels), (args.batch,), generator=g)
        x0, y = images[idx], labels[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        drop = torch.rand(args.batch, generator=g) < 0.15
        xt = sched.add_noise(original_samples=x0, noise=noise, timesteps=t)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            pred = model(xt, timesteps=t, context=context(y, drop))
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            log(f"step {step}  loss {loss.item():.4f}  {time.perf_counter() - t0:.0f} s")
    return {"steps": step, "train_seconds": ckpts[-1]["train_seconds"], "checkpoints": ckpts}


@torch.no_grad()
def sample(model, labels: torch.Tensor, shape, args) -> torch.Tensor:
    """``args.sampler`` (DDIM-``args.sample_steps`` or DDPM-1000) with guidance
    ``args.guidance``: ``(N, C, H, W)`` in [-1, 1]."""
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    model.eval()
    out = []
    for start in range(0, len(labels), 100):
        y = labels[start : start + 100]
        g = torch.Generator().manual_seed(args.seed * 100_003 + start)
        x = torch.randn((len(y), *shape), generator=g)
        if args.sampler == "ddpm":
            sched = DDPMScheduler(num_train_timesteps=1000)  # all 1,000 steps, as the tutorial
        else:
            sched = DDIMScheduler(num_train_timesteps=1000)
            sched.set_timesteps(args.sample_steps)
        ctx = torch.cat([context(y), context(y, torch.ones(len(y), dtype=torch.bool))])
        for t in sched.timesteps:
            ts = torch.full((2 * len(y),), int(t), dtype=torch.long)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                eps = model(torch.cat([x, x]), timesteps=ts, context=ctx).float()
            cond, uncond = eps[: len(y)], eps[len(y) :]
            step_kw = {"generator": g} if args.sampler == "ddpm" else {}
            x, _ = sched.step(uncond + args.guidance * (cond - uncond), int(t), x, **step_kw)
        out.append(x.clamp(-1, 1))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ingest", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--steps", type=int, default=0, help="stop at this many steps instead")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--fp32", dest="bf16", action="store_false", help="no bf16 autocast")
    ap.add_argument(
        "--tutorial", action="store_true", help="the tutorial's lr 2.5e-5, batch 64, fp32"
    )
    ap.add_argument("--checkpoints", type=int, default=1, help="evenly spaced saves (curve)")
    ap.add_argument("--n", type=int, help="samples per checkpoint (default 600; smoke 8)")
    ap.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    ap.add_argument("--sample-steps", type=int, default=50, help="DDIM steps (DDPM: 1000)")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny network, 20 steps, 8 samples")
    args = ap.parse_args()
    channels = (64, 64, 64)
    if args.tutorial:
        args.lr, args.batch, args.bf16 = 2.5e-5, 64, False
    if args.smoke:
        args.steps, args.sample_steps, args.batch, channels = 20, 5, 8, (32, 32, 32)
    args.n = args.n or (8 if args.smoke else 600)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    train_split, test = load_split(args.ingest, "train"), load_split(args.ingest, "test")
    model = build_recipe_unet(train_split.images.shape[1], channels)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"peer recipe: {n_params / 1e6:.2f} M parameters, {len(train_split.labels)} train images")
    stats = train(model, train_split.images, train_split.labels, args, print)
    from benchmarks.quality import class_counts

    counts = class_counts(test.labels, args.n, len(test.classes))
    labels = torch.cat([torch.full((k,), c) for c, k in enumerate(counts)])
    shape = tuple(train_split.images.shape[1:])
    for ck in stats["checkpoints"]:
        model.load_state_dict(torch.load(args.out / ck["file"]))
        t0 = time.perf_counter()
        x = sample(model, labels, shape, args)
        ck["sample_seconds"] = time.perf_counter() - t0
        ck["samples"] = ck["file"].replace("ckpt", "samples").replace(".pt", ".npz")
        np.savez_compressed(args.out / ck["samples"], images=x.numpy(), labels=labels.numpy())
    last = args.out / stats["checkpoints"][-1]["samples"]
    (args.out / "samples.npz").write_bytes(last.read_bytes())
    stats["sample_seconds"] = stats["checkpoints"][-1]["sample_seconds"]
    sampling = "ddpm-1000" if args.sampler == "ddpm" else f"ddim-{args.sample_steps}"
    stats.update(parameters=n_params, lr=args.lr, batch=args.batch, bf16=args.bf16, n=args.n)
    stats.update(sampler=sampling, guidance=args.guidance)
    (args.out / "peer.json").write_text(json.dumps(stats, indent=1))
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
