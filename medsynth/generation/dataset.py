"""Serve a generated pool (from its manifest) with the same preprocessing as real data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsynth.data.transforms import fit_to_square
from medsynth.dicom.read import load_unit_image
from medsynth.dicom.write import synthetic_decode_options
from medsynth.utils.csvsafe import read_rows


@dataclass
class Pool:
    images: torch.Tensor  # (N, C, S, S) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) long, indices into ``classes``
    classes: list[str]
    rows: list[dict]  # manifest rows, in manifest order


def read_manifest(pool_dir: str | Path) -> list[dict]:
    path = Path(pool_dir) / "manifest.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest.csv in {pool_dir}; run `medsynth generate` first")
    return read_rows(path)


def load_pool(
    pool_dir: str | Path,
    classes: list[str] | None = None,
    spatial_size: int | None = None,
    rows: list[dict] | None = None,
    channels: int = 1,
) -> Pool:
    """Decode a pool's DICOM files listed in its manifest (or ``rows``, e.g. an accepted subset).

    ``classes`` fixes the label order (e.g. the real dataset's); a manifest class outside it is an
    error. ``spatial_size`` resizes like ingest does (``None`` keeps the generated size).
    ``channels``: 1 (grey) or 3 (RGB): the channel count of the model that generated the pool,
    which is the real data's (``images.shape[1]`` of the ingest cache).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    pool_dir = Path(pool_dir)
    rows = read_manifest(pool_dir) if rows is None else rows
    names = classes or sorted(
        {r["class_name"] for r in rows},
        key=lambda c: int(next(r["class_index"] for r in rows if r["class_name"] == c)),
    )
    missing = sorted({r["class_name"] for r in rows} - set(names))
    if missing:
        raise ValueError(f"pool classes {missing} are not among {names}")
    # The writer picks the storage by the generated channel count; the model matches the data.
    opts = synthetic_decode_options(channels)
    arrays = []
    for r in rows:
        unit = load_unit_image(pool_dir / r["path"], opts)
        size = spatial_size or unit.shape[-1]
        arrays.append(fit_to_square(unit, size))
    images = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty(0)
    labels = torch.tensor([names.index(r["class_name"]) for r in rows], dtype=torch.long)
    return Pool(images, labels, list(names), rows)
