"""Train the SR3-style upsampler in-run (resumable), load it, and upscale a batch of images.

Folder layout as the other training stages: ``state-XXXXXXX.pt`` (raw + EMA weights, optimizer,
LR schedule, data generator, RNG states), ``snapshot-XXXXXXX/`` (``config.json`` +
``ema.safetensors``) and ``log.jsonl``. Training pairs come from the training images alone:
random ``patch_px`` crops, area-downsampled by ``factor`` and bicubic-upsampled as condition.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from medsynth.diffusion.schedule import ScheduleConfig, training_scheduler
from medsynth.diffusion.upsampler import (
    UpsamplerConfig,
    build_upsampler,
    upsampler_loss,
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
from medsynth.training.ema import EMA
from medsynth.training.loop import (
    NonFiniteLossError,
    _lr_factor,
    _truncate_log,
    pick_device,
    random_crops,
)


def train_upsampler(
    images: torch.Tensor,
    out_dir: str | Path,
    *,
    config: UpsamplerConfig | None = None,
    schedule: ScheduleConfig | None = None,
    patch_px: int = 64,  # training crop side at the high resolution
    max_steps: int = 1000,
    batch_size: int = 16,
    lr: float = 5e-4,
    warmup_steps: int = 50,
    ema_halflife_steps: float = 100.0,
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
    """Train on crops of ``images`` ``(N, C, H, W)`` in [-1, 1]; return the newest snapshot."""
    config = config or UpsamplerConfig()
    config.in_channels = int(images.shape[1])
    schedule = schedule or ScheduleConfig()
    h, w = images.shape[-2:]
    if patch_px > min(h, w) or patch_px % config.factor:
        raise ValueError(
            f"upscaler.patch_px {patch_px} must be at most the image side {min(h, w)} and "
            f"divisible by the factor {config.factor}"
        )
    dev = pick_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"upsampler": config.to_dict(), "schedule": schedule.to_dict(), "patch_px": patch_px}
    torch.manual_seed(seed)
    model = build_upsampler(config).to(dev)
    ema = EMA(model, ema_halflife_steps)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup_steps, max_steps))
    gen = torch.Generator().manual_seed(seed)
    step = 0
    clean_orphans(out)
    state = latest_state(out) if resume else None
    if state is not None:
        if state.get("config") != settings:
            raise ValueError(
                f"{out} holds upsampler states of other settings; resume only with the same "
                "upscaler settings (or remove the folder)"
            )
        model.load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
        ema.updates = int(state["ema_updates"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
        gen.set_state(state["data_generator"])
        set_rng_state(state["rng"])
        step = int(state["step"])
    _truncate_log(out / "log.jsonl", step)
    noise_sched = training_scheduler(schedule)
    images = images.float()
    bar = tqdm(total=max_steps, initial=step, disable=not progress, unit="step", desc="upscaler")
    consecutive, t_last, n_last, losses = 0, time.perf_counter(), step, []
    while step < max_steps:
        high = random_crops(images, batch_size, patch_px, gen)
        loss = upsampler_loss(model, noise_sched, schedule, high.to(dev), config.factor, gen)
        step += 1
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            consecutive += 1
            if consecutive >= max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{consecutive} consecutive non-finite upsampler losses at step {step}; "
                    f"stopped. The last good state is in {out}. Lower upscaler.lr."
                )
            continue
        consecutive = 0
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        opt.step()
        sched.step()
        ema.update(model)
        losses.append(loss.item())
        bar.update(1)
        if step % log_every_steps == 0 or step == max_steps:
            now = time.perf_counter()
            rec = {
                "step": step,
                "loss": sum(losses) / len(losses),
                "lr": sched.get_last_lr()[0],
                "img_per_s": (step - n_last) * batch_size / (now - t_last),
            }
            with (out / "log.jsonl").open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            t_last, n_last, losses = now, step, []
        if step % checkpoint_every_steps == 0 or step == max_steps:
            save_snapshot(out, step, ema.module, settings, keep_states)
            payload = {
                "model": model.state_dict(),
                "ema": ema.module.state_dict(),
                "ema_updates": ema.updates,
                "optimizer": opt.state_dict(),
                "lr_scheduler": sched.state_dict(),
                "step": step,
                "data_generator": gen.get_state(),
                "rng": rng_state(),
                "config": settings,
            }
            save_state(out, step, payload, keep_states)
    bar.close()
    return latest_snapshot(out)


def load_upsampler(snapshot_dir: str | Path, device: str | torch.device = "cpu"):
    """Rebuild ``(model, schedule_config, config_dict)`` from an upsampler snapshot alone."""
    snapshot_dir = Path(snapshot_dir)
    config = json.loads((snapshot_dir / "config.json").read_text())
    if "upsampler" not in config:
        raise ValueError(
            f"{snapshot_dir} is not an upsampler snapshot (its config.json has no 'upsampler'); "
            "pass the snapshot from RUN/upscaler/"
        )
    model = build_upsampler(UpsamplerConfig(**config["upsampler"]))
    model.load_state_dict(load_file(snapshot_dir / "ema.safetensors"))
    return model.to(device).eval(), ScheduleConfig(**config["schedule"]), config
