"""Read the ingest cache back as tensors (the only way later stages see real images)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsynth.data.leakage import excluded_rows
from medsynth.utils.csvsafe import read_rows


@dataclass
class CachedSplit:
    images: torch.Tensor  # (N, C, S, S) float32 in [-1, 1]
    labels: torch.Tensor  # (N,) long class indices
    classes: list[str]
    rows: list[dict]  # index.csv rows of these images (ids stay inside the run folder)


def fraction_rows(rows: list[dict], fraction: float, seed: int = 0) -> list[dict]:
    """A patient-level, class-stratified subset holding about ``fraction`` of ``rows``.

    Patients are shuffled once per class with ``seed`` and taken in that order, so subsets are
    nested (5 % within 10 % within 25 %) and the same for the generator and the classifier.
    """
    if fraction >= 1.0:
        return list(rows)
    by_class: dict[str, list[str]] = {}
    for r in rows:
        pid = r.get("PatientID") or r["path"]
        by_class.setdefault(r["label"], [])
        if pid not in by_class[r["label"]]:
            by_class[r["label"]].append(pid)
    rng = np.random.default_rng(seed)
    keep: set[str] = set()
    for label in sorted(by_class):
        pids = sorted(by_class[label])
        rng.shuffle(pids)
        keep.update(pids[: max(1, round(fraction * len(pids)))])
    return [r for r in rows if (r.get("PatientID") or r["path"]) in keep]


def split_rows(
    ingest_dir: str | Path, split: str = "train", fraction: float = 1.0, fraction_seed: int = 0
) -> list[dict]:
    """index.csv rows of one split (``'all'`` for every row), optionally a nested fraction."""
    ingest_dir = Path(ingest_dir)
    if not (ingest_dir / "index.csv").is_file():
        raise FileNotFoundError(f"no ingest cache in {ingest_dir}; run `medsynth ingest` first")
    rows = [r for r in read_rows(ingest_dir / "index.csv") if split == "all" or r["split"] == split]
    if split != "all":
        # duplicate_policy: drop -> held-out near-copies of train images are not evaluated on.
        dropped = excluded_rows(ingest_dir)
        if dropped:
            rows = [r for r in rows if r["row"] not in dropped]
    return fraction_rows(rows, fraction, fraction_seed)


# Fewer training images than this in a class is worth a warning: a generator (or classifier)
# trained on a handful of images memorises them rather than learning the class.
MIN_TRAIN_IMAGES_PER_CLASS = 5


def small_class_warnings(
    rows: list[dict], classes: list[str], minimum: int = MIN_TRAIN_IMAGES_PER_CLASS
) -> list[str]:
    """One sentence per class with fewer than ``minimum`` images in ``rows`` (a training set)."""
    counts = {c: 0 for c in classes}
    for r in rows:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    return [
        f"class {c!r} has only {n} training image{'s' if n != 1 else ''} (fewer than {minimum}); "
        "results for it will not mean much — raise dataset.train_fraction or add data"
        for c, n in counts.items()
        if n < minimum
    ]


def load_split(
    ingest_dir: str | Path, split: str = "train", fraction: float = 1.0, fraction_seed: int = 0
) -> CachedSplit:
    """Images and labels of one split from ``ingest/`` (``split='all'`` for every row).

    ``fraction`` < 1 keeps a nested patient-level subset (see :func:`fraction_rows`).
    """
    rows = split_rows(ingest_dir, split, fraction, fraction_seed)
    summary = json.loads((Path(ingest_dir) / "summary.json").read_text())
    cache = np.load(Path(ingest_dir) / "images.npy", mmap_mode="r")
    idx = np.array([int(r["row"]) for r in rows], dtype=np.int64)
    images = torch.from_numpy(np.asarray(cache[idx], dtype=np.float32))
    labels = torch.tensor([int(r["label_index"]) for r in rows], dtype=torch.long)
    return CachedSplit(images, labels, list(summary["classes"]), rows)
