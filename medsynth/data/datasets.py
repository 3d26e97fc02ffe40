"""Read the ingest cache back as tensors (the only way later stages see real images)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class CachedSplit:
    images: torch.Tensor  # (N, C, S, S) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) long class indices
    classes: list[str]
    rows: list[dict]  # index.csv rows of these images (ids stay inside the run folder)


def load_split(ingest_dir: str | Path, split: str = "train") -> CachedSplit:
    """Images and labels of one split from ``ingest/`` (``split='all'`` for every row)."""
    ingest_dir = Path(ingest_dir)
    if not (ingest_dir / "index.csv").is_file():
        raise FileNotFoundError(f"no ingest cache in {ingest_dir}; run `medsynth ingest` first")
    summary = json.loads((ingest_dir / "summary.json").read_text())
    with (ingest_dir / "index.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if split == "all" or r["split"] == split]
    cache = np.load(ingest_dir / "images.npy", mmap_mode="r")
    idx = np.array([int(r["row"]) for r in rows], dtype=np.int64)
    images = torch.from_numpy(np.asarray(cache[idx], dtype=np.float32))
    labels = torch.tensor([int(r["label_index"]) for r in rows], dtype=torch.long)
    return CachedSplit(images, labels, list(summary["classes"]), rows)
