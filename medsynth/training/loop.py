"""The training loop: AdamW, warm-up + cosine LR, clipping, EMA, bf16, resumable, DDP-ready.

Each step draws, from one seeded generator, the batch indices, augmentation and diffusion noise
for the whole *global* batch; each process trains on its contiguous slice. So one process and N
processes see the same data, and a resumed run continues the exact stream it left.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from medsynth.diffusion.objective import diffusion_loss, draw
from medsynth.diffusion.sampler import sample
from medsynth.diffusion.schedule import ScheduleConfig, training_scheduler
from medsynth.diffusion.unet import UNetConfig, build_unet, count_parameters
from medsynth.runtime import resolve_precision
from medsynth.training.adapt import (
    adapted_model,
    base_reference,
    check_compatible,
    resolve_base,
    snapshot_format,
)
from medsynth.training.checkpoint import (
    clean_orphans,
    latest_state,
    rng_state,
    save_snapshot,
    save_state,
    set_rng_state,
)
from medsynth.training.ema import EMA
from medsynth.training.provenance import build_provenance, merge_provenance


class NonFiniteLossError(RuntimeError):
    """Too many consecutive NaN/inf losses; the last good state is kept on disk."""


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun set up (gloo on CPU, nccl on GPU); no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size())


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(device)


def _lr_factor(step: int, warmup_steps: int, max_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _augment(x: torch.Tensor, g: torch.Generator, hflip: bool, shift_px: int) -> torch.Tensor:
    if hflip:
        flip = torch.rand(x.shape[0], generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if shift_px > 0:
        shifts = torch.randint(-shift_px, shift_px + 1, (x.shape[0], 2), generator=g)
        padded = F.pad(x, (shift_px,) * 4, mode="reflect")
        h, w = x.shape[-2:]
        x = torch.stack(
            [
                padded[i, :, shift_px + dy : shift_px + dy + h, shift_px + dx : shift_px + dx + w]
                for i, (dy, dx) in enumerate(shifts.tolist())
            ]
        )
    return x


CLASS_BALANCES = ("none", "balanced", "sqrt")


def random_crops(images: torch.Tensor, n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """``n`` random ``size`` px crops ``(n, C, size, size)`` of random images ``(N, C, H, W)``.

    Image, row and column are drawn from ``g`` (in that order), so a resumed run that restores
    ``g`` draws the same crops.
    """
    idx = torch.randint(0, len(images), (n,), generator=g)
    h, w = images.shape[-2:]
    ys = torch.randint(0, h - size + 1, (n,), generator=g)
    xs = torch.randint(0, w - size + 1, (n,), generator=g)
    return torch.stack(
        [images[i, :, y : y + size, x : x + size] for i, y, x in zip(idx, ys, xs, strict=True)]
    )


def draw_weights(labels: torch.Tensor, class_balance: str) -> torch.Tensor | None:
    """Per-image draw probabilities ``(N,)`` float64 summing to 1, or None for uniform draws.

    ``balanced``: each class present is equally likely (its images share ``1/K``); ``sqrt``:
    a class's share is proportional to ``sqrt(count)``. Within a class images stay uniform.
    ``none`` returns None so the default keeps the original ``randint`` stream bit for bit.
    """
    if class_balance not in CLASS_BALANCES:
        raise ValueError(
            f"unknown class_balance {class_balance!r}; valid choices: {', '.join(CLASS_BALANCES)}"
        )
    if class_balance == "none":
        return None
    counts = torch.bincount(labels.long()).double()
    share = torch.where(counts > 0, counts.sqrt() if class_balance == "sqrt" else 1.0, 0.0)
    share = share / share.sum()
    per_image = (share / counts.clamp(min=1))[labels.long()]
    return per_image / per_image.sum()


def draw_indices(
    n: int, batch_size: int, weights: torch.Tensor | None, gen: torch.Generator
) -> torch.Tensor:
    """``(batch_size,)`` long indices into the ``n`` training images, drawn from ``gen``."""
    if weights is None:
        return torch.randint(0, n, (batch_size,), generator=gen)
    return torch.multinomial(weights, batch_size, replacement=True, generator=gen)


def save_preview(
    path: Path,
    ema_model,
    schedule_cfg: ScheduleConfig,
    classes: list[str],
    image_shape: tuple[int, int, int],
    device,
    per_class: int = 8,
    decode=None,
) -> None:
    """A PNG grid: one row per class, ``per_class`` samples (DPM-Solver++ 20, guidance 2).

    ``image_shape``: ``(C, H, W)``; C = 1 gives a grey PNG, C = 3 an RGB one. ``decode``: a
    latent model's latents ``(B, L, h, w)`` -> images ``(B, C, H, W)`` in [-1, 1].
    """
    from PIL import Image

    rows = max(1, len(classes))  # an unconditional model previews one row of null-class samples
    labels = [c for c in range(rows) for _ in range(per_class)]
    imgs = sample(
        ema_model,
        schedule_cfg,
        labels,
        list(range(len(labels))),
        image_shape=image_shape,
        null_label=len(classes),
        sampler="euler" if schedule_cfg.kind == "rflow" else "dpmpp",
        steps=20,
        guidance_scale=2.0,
        device=device,
        clip=decode is None,
    )
    if decode is not None:
        imgs = decode(imgs)
    c, h, w = imgs.shape[1:]
    # (K*per, C, H, W) -> (K, H, per, W, C) -> (K*H, per*W, C): rows of classes, channels last.
    grid = imgs.reshape(rows, per_class, c, h, w).permute(0, 3, 1, 4, 2)
    grid = grid.reshape(rows * h, per_class * w, c)
    pixels = ((grid + 1) * 127.5).round().clamp(0, 255).byte().cpu().numpy()
    Image.fromarray(pixels[..., 0] if c == 1 else pixels).save(path)


def train(
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    out_dir: str | Path,
    *,
    unet: UNetConfig | None = None,
    schedule: ScheduleConfig | None = None,
    max_steps: int = 2000,  # optimizer steps in total (including resumed ones)
    batch_size: int = 64,  # global batch, split over processes
    lr: float = 2e-3,  # peak learning rate after warm-up
    weight_decay: float = 0.0,
    warmup_steps: int = 100,  # linear warm-up, then cosine decay to 0 at max_steps
    grad_clip_norm: float = 1.0,
    ema_halflife_steps: float = 200.0,
    label_dropout: float = 0.15,  # share of null-class labels, for classifier-free guidance
    precision: str = "fp32",  # auto | fp32 | bf16 (autocast; auto = bf16 where native)
    augment_hflip: bool = False,
    augment_shift_px: int = 0,
    checkpoint_every_steps: int = 500,
    keep_states: int = 2,
    preview_every_steps: int = 0,  # 0 = preview only at the end
    log_every_steps: int = 10,
    max_nonfinite_steps: int = 5,
    seed: int = 0,
    device: str = "auto",
    init_from: str | Path | None = None,  # base snapshot / train / run folder to adapt
    adapter: dict | None = None,  # {kind: full|lora, rank, alpha, targets}; needs init_from
    unconditional: bool = False,  # train the null class only (e.g. a base on other labels)
    loss_weighting: str = "uniform",  # uniform | min_snr (Min-SNR-gamma, ddpm schedules)
    min_snr_gamma: float = 5.0,  # SNR clip of min_snr
    class_balance: str = "none",  # none | balanced | sqrt: class probabilities per batch draw
    datasets: list[dict] | None = None,  # provenance of ``images`` (dataset hashes), recorded
    latent: dict | None = None,  # a latent model: {autoencoder_dir, scale_factor, ...} (see below)
    resume: bool = True,
    progress: bool = True,
) -> Path:
    """Train a class-conditional diffusion model; return the final snapshot folder.

    ``images``: ``(N, C, H, W)`` float in [-1, 1]; ``labels``: ``(N,)`` long in
    ``[0, len(classes))``. Writes ``state-*.pt``, ``snapshot-*/``, ``log.jsonl`` and
    ``preview-*.png`` into ``out_dir``; with ``resume`` it continues from the newest state.
    With ``init_from`` it adapts that base (see :mod:`medsynth.training.adapt`); every snapshot
    records the training images' pixel hashes (and its base's) under ``provenance``.

    A latent model passes latents as ``images`` (already multiplied by ``scale_factor``) and
    ``latent``: ``autoencoder_dir`` (its snapshot, copied into every snapshot of this model so it
    decodes alone), ``scale_factor``, ``image_shape`` (decoded ``(C, H, W)``), recorded in
    ``config.json`` under ``latent``.
    """
    dev = pick_device(device)
    precision = resolve_precision(precision, str(dev), "training")
    info = init_distributed(dev)
    if batch_size % info.world:
        raise ValueError(f"batch_size {batch_size} must divide by the {info.world} processes")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if unconditional:
        classes, labels = [], torch.zeros_like(labels)  # every label is the null class
    unet = unet or UNetConfig()
    unet.num_classes, unet.in_channels = len(classes), int(images.shape[1])
    schedule = schedule or ScheduleConfig()
    image_shape = tuple(int(s) for s in images.shape[1:])
    config = {
        "unet": unet.to_dict(),
        "schedule": schedule.to_dict(),
        "classes": list(classes),
        "image_shape": list(image_shape),
    }
    if loss_weighting == "min_snr" and schedule.kind == "rflow":
        raise ValueError("loss_weighting 'min_snr' is defined for ddpm schedules, not 'rflow'")
    draws = {"loss_weighting": loss_weighting, "class_balance": class_balance}
    if loss_weighting == "min_snr":
        draws["min_snr_gamma"] = float(min_snr_gamma)
    if draws != {"loss_weighting": "uniform", "class_balance": "none"}:
        # Recorded (only off the defaults, so older states still resume) so that a resume with
        # another batch stream or loss is refused like one with another model.
        config["objective"] = draws
    base_dir, base_cfg = None, None
    if init_from:
        adapter = dict(adapter or {"kind": "full"})
        base_dir = resolve_base(init_from)
        base_cfg = json.loads((base_dir / "config.json").read_text())
        check_compatible(base_cfg, base_dir, image_shape, unet, schedule)
        config.update(base=base_reference(base_dir, out), adapter=adapter)
    config["provenance"] = build_provenance(images, datasets, base_cfg)
    snapshot_files, decode = None, None
    if latent is not None:
        from medsynth.training.latent import latent_decoder, latent_record

        config["latent"] = latent_record(latent)
        snapshot_files = {
            "autoencoder.safetensors": Path(latent["autoencoder_dir"]) / "autoencoder.safetensors"
        }
        decode = latent_decoder(Path(latent["autoencoder_dir"]), config["latent"])

    torch.manual_seed(seed)
    if base_dir is None:
        model = build_unet(unet).to(dev)
    else:
        model = adapted_model(base_dir, base_cfg, list(classes), adapter)[0].to(dev)
    ema = EMA(model, ema_halflife_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, warmup_steps, max_steps))
    gen = torch.Generator().manual_seed(seed)
    step, nonfinite_total = 0, 0

    if info.main:
        # Temp files of a write a kill interrupted: never resumed from, so never kept.
        clean_orphans(out)
    state = latest_state(out) if resume else None
    if state is not None:
        # The data may change between runs (provenance is not a setting), but every image the
        # weights have seen stays in the record.
        config["provenance"] = merge_provenance(
            state.get("config", {}).get("provenance"), config["provenance"]
        )
    if state is not None and _settings(state.get("config")) != _settings(config):
        raise ValueError(
            f"{out} holds training states of another model, schedule or class list; "
            "resume only with the same settings (or train into another folder, or pass --no-resume)"
        )
    if state is not None:
        model.load_state_dict(state["model"])
        ema.module.load_state_dict(state["ema"])
        ema.updates = int(state["ema_updates"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["lr_scheduler"])
        gen.set_state(state["data_generator"])
        set_rng_state(state["rng"])
        step, nonfinite_total = int(state["step"]), int(state["nonfinite_total"])
        if state.get("threads", torch.get_num_threads()) != torch.get_num_threads():
            warnings.warn(
                f"resuming {out} at step {step} with {torch.get_num_threads()} threads; the run "
                f"was interrupted with {state['threads']} threads. Training goes on correctly but "
                "not bit-identically to an uninterrupted run (use --threads "
                f"{state['threads']} for that)",
                stacklevel=2,
            )
        if state.get("precision", precision) != precision:
            # precision "auto" picks per machine: a run moved between machines changes it.
            warnings.warn(
                f"resuming {out} at step {step} in {precision}; it was trained in "
                f"{state['precision']} so far. Training goes on correctly but not "
                "bit-identically to an uninterrupted run",
                stacklevel=2,
            )
    if info.main:
        _truncate_log(out / "log.jsonl", step)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if info.world > 1 else model
    noise_sched = training_scheduler(schedule)
    local = batch_size // info.world
    sl = slice(info.rank * local, (info.rank + 1) * local)
    use_bf16 = precision == "bf16"
    images, labels = images.float(), labels.long()
    weights = draw_weights(labels, class_balance)

    def payload() -> dict:
        return {
            "model": model.state_dict(),
            "ema": ema.module.state_dict(),
            "ema_updates": ema.updates,
            "optimizer": opt.state_dict(),
            "lr_scheduler": sched.state_dict(),
            "step": step,
            "data_generator": gen.get_state(),
            "rng": rng_state(),
            "nonfinite_total": nonfinite_total,
            "config": config,
            "threads": torch.get_num_threads(),
            "precision": precision,
        }

    if info.main:
        print(
            f"training {sum(p.numel() for p in trainable) / 1e6:.2f} of {count_parameters(model) / 1e6:.2f} M "
            f"parameters on {dev} x{info.world} in {precision}, "
            f"{len(images)} images {image_shape}, steps {step}->{max_steps}"
        )
    bar = tqdm(total=max_steps, initial=step, disable=not (progress and info.main), unit="step")
    consecutive, t_last, n_last, losses = 0, time.perf_counter(), 0, []
    while step < max_steps:
        # Draw everything for the global batch, then take this process's slice.
        idx = draw_indices(len(images), batch_size, weights, gen)
        x = _augment(images[idx], gen, augment_hflip, augment_shift_px)
        d = draw(tuple(x.shape), schedule.num_train_timesteps, label_dropout, gen)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = diffusion_loss(
                ddp,
                noise_sched,
                schedule,
                x[sl].to(dev),
                labels[idx][sl].to(dev),
                d.slice(sl),
                null_label=unet.num_classes,
                loss_weighting=loss_weighting,
                min_snr_gamma=min_snr_gamma,
            )
        finite = torch.isfinite(loss.detach()).float()
        if info.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        step += 1
        if finite.item() < 1:
            opt.zero_grad(set_to_none=True)
            consecutive += 1
            nonfinite_total += 1
            if consecutive >= max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{consecutive} consecutive non-finite losses at step {step}; stopped. "
                    f"The last good state is in {out}. Lower training.lr or check the input data."
                )
            continue
        consecutive = 0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        opt.step()
        sched.step()
        ema.update(model)
        losses.append(loss.item())
        bar.update(1)

        if info.main and (step % log_every_steps == 0 or step == max_steps):
            now = time.perf_counter()
            rec = {
                "step": step,
                "loss": sum(losses) / len(losses),
                "lr": sched.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "img_per_s": (step - n_last) * batch_size / (now - t_last) if n_last else None,
                "nonfinite_total": nonfinite_total,
            }
            with (out / "log.jsonl").open("a") as fh:
                fh.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            t_last, n_last, losses = now, step, []
        if step % checkpoint_every_steps == 0 or step == max_steps:
            if info.main:
                save_snapshot(
                    out,
                    step,
                    ema.module,
                    config,
                    keep_states,
                    extra_files=snapshot_files,
                    **snapshot_format(config),
                )
                save_state(out, step, payload(), keep_states)
            if info.world > 1:
                dist.barrier()
        if (
            info.main
            and preview_every_steps
            and step % preview_every_steps == 0
            and step != max_steps
        ):
            save_preview(
                out / f"preview-{step:07d}.png",
                ema.module,
                schedule,
                classes,
                image_shape,
                dev,
                decode=decode,
            )
    bar.close()
    if info.main:
        save_preview(
            out / f"preview-{step:07d}.png",
            ema.module,
            schedule,
            classes,
            image_shape,
            dev,
            decode=decode,
        )
    return out / f"snapshot-{step:07d}"


def _settings(config: dict | None) -> dict | None:
    """A config without its provenance: what must match for a state to be resumed."""
    return None if config is None else {k: v for k, v in config.items() if k != "provenance"}


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the state we resume from) and torn lines."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError):
            continue
    path.write_text("".join(k + "\n" for k in keep))
