"""The autoencoder stage of latent diffusion: train AutoencoderKL in-run, resumable.

Writes into its folder (``RUN/autoencoder/``) the same kinds of files as the diffusion stage:
``state-XXXXXXX.pt`` (weights, optimizer, LR schedule, data generator and RNG states),
``snapshot-XXXXXXX/`` (``config.json`` with the latent ``scale_factor`` + ``autoencoder.safetensors``)
and ``log.jsonl``; plus ``recon.json``, the reconstruction PSNR/SSIM on the validation split.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from medsynth.diffusion.autoencoder import (
    AutoencoderConfig,
    autoencoder_loss,
    build_autoencoder,
    decode,
    encode_means,
    psnr,
    scale_factor,
    ssim,
)
from medsynth.training.checkpoint import (
    clean_orphans,
    latest_snapshot,
    latest_state,
    rng_state,
    save_snapshot,
    save_state,
    set_rng_state,
)
from medsynth.training.loop import (
    NonFiniteLossError,
    _lr_factor,
    _truncate_log,
    pick_device,
    random_crops,
)

WEIGHTS = "autoencoder.safetensors"


def train_autoencoder(
    images: torch.Tensor,
    out_dir: str | Path,
    *,
    config: AutoencoderConfig | None = None,
    max_steps: int = 1000,  # optimizer steps in total (including resumed ones)
    batch_size: int = 16,
    lr: float = 1e-4,  # peak learning rate after warm-up
    warmup_steps: int = 50,  # linear warm-up, then cosine decay to 0 at max_steps
    ssim_weight: float = 0.5,  # weight of (1 - SSIM) next to L1
    kl_weight: float = 1e-6,  # weight of the KL term (small: a near-deterministic latent)
    patch_px: int | None = None,  # train on random crops of this side (None: whole images)
    grad_clip_norm: float = 1.0,
    checkpoint_every_steps: int = 250,
    keep_states: int = 2,
    log_every_steps: int = 10,
    max_nonfinite_steps: int = 5,
    seed: int = 0,
    device: str = "auto",
    resume: bool = True,
    progress: bool = True,
) -> Path:
    """Train the autoencoder on ``images`` ``(N, C, H, W)`` in [-1, 1]; return its snapshot.

    Each snapshot's ``config.json`` holds the autoencoder settings, the image shape and the
    latent ``scale_factor`` (1 / std of the training images' whole-image latent means at that
    step). With ``patch_px`` each step sees ``batch_size`` random crops (the network is
    convolutional, so it still encodes whole images).
    """
    dev = pick_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config or AutoencoderConfig()
    config.in_channels = int(images.shape[1])
    image_shape = tuple(int(s) for s in images.shape[1:])
    latent_shape = config.latent_shape(image_shape)
    settings = {
        "autoencoder": config.to_dict(),
        "image_shape": list(image_shape),
        "latent_shape": list(latent_shape),
        "loss": {"ssim_weight": ssim_weight, "kl_weight": kl_weight},
    }
    if patch_px is not None:  # only when set: older states (whole images) keep resuming
        if patch_px % config.downsample or patch_px > min(image_shape[1:]):
            raise ValueError(
                f"patch_px {patch_px} must divide by the downsampling {config.downsample} and "
                f"fit in the images {image_shape[1:]}"
            )
        settings["patch_px"] = patch_px
    torch.manual_seed(seed)
    ae = build_autoencoder(config).to(dev)
    opt = torch.optim.AdamW(ae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup_steps, max_steps))
    gen = torch.Generator().manual_seed(seed)
    step = 0
    clean_orphans(out)
    state = latest_state(out) if resume else None
    if state is not None:
        if state.get("config") != settings:
            raise ValueError(
                f"{out} holds autoencoder states of other settings; resume only with the same "
                "model.autoencoder settings and image size (or remove the folder)"
            )
        ae.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
        gen.set_state(state["data_generator"])
        set_rng_state(state["rng"])
        step = int(state["step"])
    _truncate_log(out / "log.jsonl", step)
    images = images.float()

    def snapshot() -> None:
        scale = scale_factor(encode_means(ae, images))
        save_snapshot(
            out, step, ae, dict(settings, scale_factor=scale), keep_states, weights_file=WEIGHTS
        )
        payload = {
            "model": ae.state_dict(),
            "optimizer": opt.state_dict(),
            "lr_scheduler": sched.state_dict(),
            "step": step,
            "data_generator": gen.get_state(),
            "rng": rng_state(),
            "config": settings,
        }
        save_state(out, step, payload, keep_states)

    if state is not None and step >= max_steps and not list(out.glob("snapshot-*")):
        snapshot()
    bar = tqdm(total=max_steps, initial=step, disable=not progress, unit="step", desc="autoencoder")
    consecutive, t_last, n_last, parts = 0, time.perf_counter(), step, []
    while step < max_steps:
        if patch_px is None:
            batch = images[torch.randint(0, len(images), (batch_size,), generator=gen)]
        else:
            batch = random_crops(images, batch_size, patch_px, gen)
        loss, part = autoencoder_loss(
            ae, batch.to(dev), ssim_weight=ssim_weight, kl_weight=kl_weight
        )
        step += 1
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            consecutive += 1
            if consecutive >= max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{consecutive} consecutive non-finite autoencoder losses at step {step}; "
                    f"stopped. The last good state is in {out}. Lower model.autoencoder.lr."
                )
            continue
        consecutive = 0
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), grad_clip_norm)
        opt.step()
        sched.step()
        parts.append(dict(part, loss=loss.item()))
        bar.update(1)
        if step % log_every_steps == 0 or step == max_steps:
            now = time.perf_counter()
            rec = {"step": step, "lr": sched.get_last_lr()[0]}
            rec |= {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}
            rec["img_per_s"] = (step - n_last) * batch_size / (now - t_last)
            with (out / "log.jsonl").open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            t_last, n_last, parts = now, step, []
        if step % checkpoint_every_steps == 0 or step == max_steps:
            snapshot()
    bar.close()
    return latest_snapshot(out)


def load_autoencoder(snapshot_dir: str | Path, device: str | torch.device = "cpu"):
    """Rebuild ``(autoencoder, config_dict)`` from an autoencoder snapshot folder alone."""
    snapshot_dir = Path(snapshot_dir)
    config = json.loads((snapshot_dir / "config.json").read_text())
    ae = build_autoencoder(AutoencoderConfig(**config["autoencoder"]))
    ae.load_state_dict(load_file(snapshot_dir / WEIGHTS))
    return ae.to(device).eval(), config


def reconstruction_metrics(
    snapshot_dir: str | Path, images: torch.Tensor, batch: int = 16
) -> dict[str, float | int]:
    """Mean and worst PSNR (dB) and SSIM of encode -> decode on ``images`` (N, C, H, W).

    Run ``batch`` images at a time: memory is bounded by the batch, not the split.
    """
    ae, _ = load_autoencoder(snapshot_dir)
    p, s = [], []
    for i in range(0, len(images), batch):
        x = images[i : i + batch].float()
        r = decode(ae, encode_means(ae, x, batch), batch)
        p.append(psnr(r, x))
        s.append(ssim(r, x))
    p, s = torch.cat(p), torch.cat(s)
    return {
        "images": len(p),
        "psnr_db_mean": float(p.mean()),
        "psnr_db_min": float(p.min()),
        "ssim_mean": float(s.mean()),
        "ssim_min": float(s.min()),
    }
