"""Protocol sections -> training call (the one function the CLI and the runner use)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from medsynth.data.datasets import load_split, small_class_warnings
from medsynth.diffusion.schedule import ScheduleConfig
from medsynth.diffusion.unet import UNetConfig
from medsynth.protocol import ModelSection, ScheduleSection, TrainingSection
from medsynth.training.loop import train
from medsynth.training.provenance import check_no_leak, ingest_fingerprint


def unet_config(model: ModelSection, num_classes: int, in_channels: int) -> UNetConfig:
    return UNetConfig(
        num_classes=num_classes, in_channels=in_channels, **model.model_dump(exclude={"kind"})
    )


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
    this ingest, a :class:`DataLeakError` stops the run.
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
    return train(
        data.images,
        data.labels,
        data.classes,
        out_dir,
        unet=unet_config(model, len(data.classes), int(data.images.shape[1])),
        schedule=schedule_config(schedule),
        resume=resume,
        progress=progress,
        datasets=datasets,
        **training.model_dump(),
    )
