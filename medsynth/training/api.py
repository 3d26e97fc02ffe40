"""Protocol sections -> training call (the one function the CLI and the runner use)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from medsynth.data.datasets import load_split, small_class_warnings
from medsynth.diffusion.schedule import ScheduleConfig
from medsynth.diffusion.unet import UNetConfig
from medsynth.protocol import (
    ModelSection,
    ScheduleSection,
    TrainingSection,
    drop_later_defaults,
)
from medsynth.training.loop import train
from medsynth.training.provenance import check_no_leak, ingest_fingerprint


def unet_config(model: ModelSection, num_classes: int, in_channels: int) -> UNetConfig:
    return UNetConfig(
        num_classes=num_classes,
        in_channels=in_channels,
        **model.model_dump(exclude={"kind", "autoencoder"}),
    )


def _inputs_sha(inputs: dict) -> str:
    """SHA-256 of a folder's inputs (its ``.inputs`` mark)."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _folder_for(folder: Path, inputs: dict) -> Path:
    """Clear ``folder`` if it was made from other inputs (a stage of its own inside train).

    A folder with files but no mark is what a kill during that clearing leaves: cleared too.
    The mark is written atomically, so a process reading it never sees it half-written.
    """
    import shutil

    from medsynth.dicom.write import atomic_write_bytes

    want, have = _inputs_sha(inputs), _mark_of(folder)
    stale = have != want if have is not None else _has_files(folder)
    if stale:
        shutil.rmtree(folder)
    if have != want:  # new, cleared, or never marked
        atomic_write_bytes(folder / ".inputs", (want + "\n").encode())
    return folder


def _mark_of(folder: Path) -> str | None:
    """The inputs hash ``folder`` was made from (its ``.inputs`` mark), or None."""
    mark = folder / ".inputs"
    return mark.read_text().strip() if mark.exists() else None


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def train_autoencoder_stage(
    ingest_dir: str | Path,
    out_dir: str | Path,
    model: ModelSection,
    *,
    train_fraction: float = 1.0,
    fraction_seed: int = 0,
    device: str = "auto",
    resume: bool = True,
    progress: bool = True,
    images=None,
) -> Path:
    """Train (or resume, or reuse) the AutoencoderKL of a latent model; return its snapshot.

    Trained on the train split only; writes ``recon.json`` (PSNR/SSIM of encode -> decode on
    the validation split, which it never trained on). ``out_dir`` is cleared when the
    autoencoder settings or the data changed (its own ``.inputs`` hash).
    """
    from medsynth.diffusion.autoencoder import AutoencoderConfig
    from medsynth.training.autoencoder import reconstruction_metrics, train_autoencoder

    ae = model.autoencoder
    inputs = {
        "ingest": ingest_fingerprint(ingest_dir),
        "train_fraction": train_fraction,
        "fraction_seed": fraction_seed,
        "autoencoder": drop_later_defaults(ae.model_dump(mode="json"), "model.autoencoder"),
    }
    out = _folder_for(Path(out_dir), inputs)
    if images is None:
        images = load_split(ingest_dir, "train", train_fraction, fraction_seed).images
    snap = train_autoencoder(
        images,
        out,
        config=AutoencoderConfig(
            channels=list(ae.channels),
            latent_channels=ae.latent_channels,
            num_res_blocks=ae.num_res_blocks,
            norm_num_groups=ae.norm_num_groups,
            attention=ae.attention,
        ),
        max_steps=ae.max_steps,
        batch_size=ae.batch_size,
        lr=ae.lr,
        warmup_steps=ae.warmup_steps,
        ssim_weight=ae.ssim_weight,
        kl_weight=ae.kl_weight,
        patch_px=ae.patch_px,
        checkpoint_every_steps=ae.checkpoint_every_steps,
        seed=ae.seed,
        device=device,
        resume=resume,
        progress=progress,
    )
    recon = out / "recon.json"
    if not recon.exists() or _recorded_snapshot(recon) != snap.name:
        import json

        val = load_split(ingest_dir, "val").images
        metrics = reconstruction_metrics(snap, val) if len(val) else {"images": 0}
        metrics |= {"split": "val", "snapshot": snap.name}
        recon.write_text(json.dumps(metrics, indent=2))
    return snap


def _recorded_snapshot(path: Path) -> str | None:
    import json

    try:
        return json.loads(path.read_text()).get("snapshot")
    except (OSError, ValueError):
        return None


def schedule_config(schedule: ScheduleSection) -> ScheduleConfig:
    return ScheduleConfig(**schedule.model_dump())


def _stderr(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr)


def train_from_sections(
    ingest_dir: str | Path,
    out_dir: str | Path,
    model: ModelSection,
    schedule: ScheduleSection,
    training: TrainingSection,
    *,
    train_fraction: float = 1.0,
    fraction_seed: int = 0,
    resume: bool = True,
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """Train on the ``train`` split (or its ``train_fraction``) only: val/test never reach it.

    A class with fewer than a handful of training images is reported through ``warn``
    (default: a ``warning:`` line on stderr); the report repeats it. With ``training.init_from``
    the base is first checked for leaks: if it was trained on any validation or test image of
    this ingest, a :class:`DataLeakError` stops the run. With ``training.guide_fraction`` the
    same recipe is trained again for that share of the steps into :func:`guide_dir`
    (autoguidance's guide).
    Returns the model's final snapshot.
    """
    if training.init_from:
        import json

        from medsynth.training.adapt import resolve_base

        base = resolve_base(training.init_from)
        check_no_leak(json.loads((base / "config.json").read_text()), base, ingest_dir)
    data = load_split(ingest_dir, "train", train_fraction, fraction_seed)
    for line in small_class_warnings(data.rows, data.classes):
        (warn or _stderr)(f"{line} (train_fraction {train_fraction:g})")
    datasets = [
        {
            "ingest_sha256": ingest_fingerprint(ingest_dir),
            "split": "train",
            "train_fraction": train_fraction,
            "fraction_seed": fraction_seed,
            "classes": data.classes,
            "images": len(data.images),
        }
    ]
    images, latent = data.images, None
    if model.kind == "monai_ldm":
        from medsynth.training.latent import encode_training_set

        ae_snap = train_autoencoder_stage(
            ingest_dir,
            Path(out_dir).parent / "autoencoder",
            model,
            train_fraction=train_fraction,
            fraction_seed=fraction_seed,
            device=training.device,
            resume=resume,
            progress=progress,
            images=data.images,
        )
        images, _ = encode_training_set(ae_snap, data.images)
        latent = {"autoencoder_dir": str(ae_snap)}
    recipe = dict(
        latent=latent,
        unet=unet_config(model, len(data.classes), int(images.shape[1])),
        schedule=schedule_config(schedule),
        resume=resume,
        progress=progress,
        datasets=datasets,
        **training.model_dump(exclude={"guide_fraction"}),
    )
    snap = train(images, data.labels, data.classes, out_dir, **recipe)
    if training.guide_steps:
        # Autoguidance's weaker model: the same recipe, data and seed, trained for fewer steps
        # (its own LR decay), so it errs like the model but more (Karras et al. 2024). Its
        # folder is cleared when it would pair with another model or step count.
        steps = training.guide_steps
        inputs = _guide_inputs(snap, steps)
        _refuse_clearing_under_torchrun(guide_dir(out_dir), inputs)
        folder = _folder_for(guide_dir(out_dir), inputs)
        recipe |= {"max_steps": steps, "preview_every_steps": 0}
        train(images, data.labels, data.classes, folder, **recipe)
    return snap


def guide_dir(train_dir: str | Path) -> Path:
    """Where the train stage puts the autoguidance guide (``training.guide_fraction``)."""
    return Path(train_dir) / "guide"


def _guide_inputs(model_snapshot: Path, steps: int) -> dict:
    """What names a guide: the model it pairs with (whose inputs it shares) and its length."""
    from medsynth.training.checkpoint import snapshot_sha256

    return {"model_snapshot": snapshot_sha256(model_snapshot), "guide_steps": steps}


def _refuse_clearing_under_torchrun(folder: Path, inputs: dict) -> None:
    """Every process would clear ``folder`` at once (and one might resume from a state another
    removes): under torchrun, a guide made from other inputs is refused instead."""
    import os

    have = _mark_of(folder)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and have and have != _inputs_sha(inputs):
        raise ValueError(
            f"{folder} holds a guide for another model or length; run `medsynth train` "
            "once without torchrun (it clears the folder) or remove it"
        )


def run_guide_steps(run_dir: str | Path) -> int:
    """The guide's steps a run folder's resolved ``protocol.yaml`` asks for (0: none, no
    protocol.yaml, or one this version cannot read)."""
    import yaml
    from pydantic import ValidationError

    from medsynth.protocol import TrainingSection

    path = Path(run_dir) / "protocol.yaml"
    if not path.exists():
        return 0
    training = yaml.safe_load(path.read_text()).get("training") or {}
    keys = ("max_steps", "warmup_steps", "guide_fraction", "unconditional")
    try:
        return TrainingSection(**{k: training[k] for k in keys if k in training}).guide_steps
    except ValidationError:
        return 0


def guide_snapshot(train_dir: str | Path, steps: int) -> Path | None:
    """The finished ``steps``-step guide of the model now in ``train_dir``, else None (not
    trained, interrupted, or made for another model or length)."""
    from medsynth.training.checkpoint import COMPLETE, list_snapshots

    snaps = list_snapshots(Path(train_dir))
    folder = guide_dir(train_dir)
    snap, have = folder / f"snapshot-{steps:07d}", _mark_of(folder)
    if not snaps or not (snap / COMPLETE).exists() or have is None:
        return None
    return snap if have == _inputs_sha(_guide_inputs(snaps[-1], steps)) else None


def train_upscaler_stage(
    ingest_dir: str | Path,
    out_dir: str | Path,
    upscaler,
    schedule: ScheduleSection,
    *,
    train_fraction: float = 1.0,
    fraction_seed: int = 0,
    device: str = "auto",
    resume: bool = True,
    progress: bool = True,
) -> Path:
    """Train (or resume, or reuse) the x``factor`` upsampler on the train split's images.

    ``upscaler``: the protocol's :class:`~medsynth.protocol.UpscalerSection`. Pairs are made
    from the training images at the ingest size (area-downsampled as the condition), so
    validation and test images never reach it. ``out_dir`` has its own ``.inputs`` hash.
    """
    from medsynth.diffusion.upsampler import UpsamplerConfig
    from medsynth.training.upscaler import train_upsampler

    up = upscaler
    inputs = {
        "ingest": ingest_fingerprint(ingest_dir),
        "train_fraction": train_fraction,
        "fraction_seed": fraction_seed,
        "upscaler": up.model_dump(mode="json"),
        "schedule": schedule.model_dump(mode="json"),
    }
    out = _folder_for(Path(out_dir), inputs)
    images = load_split(ingest_dir, "train", train_fraction, fraction_seed).images
    return train_upsampler(
        images,
        out,
        config=UpsamplerConfig(
            factor=up.factor,
            channels=list(up.channels),
            num_res_blocks=up.num_res_blocks,
            norm_num_groups=up.norm_num_groups,
        ),
        schedule=schedule_config(schedule),
        patch_px=up.patch_px,
        max_steps=up.max_steps,
        batch_size=up.batch_size,
        lr=up.lr,
        warmup_steps=up.warmup_steps,
        ema_halflife_steps=up.ema_halflife_steps,
        checkpoint_every_steps=up.checkpoint_every_steps,
        seed=up.seed,
        device=device,
        resume=resume,
        progress=progress,
    )
