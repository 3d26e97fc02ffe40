"""Data provenance of a generator, and the leak check an adaptation runs against its base.

Every snapshot's ``config.json`` carries ``provenance``: the datasets it was trained on (hashes
of their ingest caches, split, fraction) and a pixel hash of every training image, its base's
included. Adapting to a target refuses a base that has seen any of the target's validation or
test images: they would then reach the generator, and every uplift figure measured on them
would be biased.

Pixel hash: SHA-256 (first 32 hex digits) of the image quantised to 8 bits after the ingest's
resize and intensity mapping, with its shape. It matches the same source image only when base
and target were ingested with the same ``spatial_size`` and intensity mode (an adapted model
must match the resolution anyway); a differently windowed copy of the same scan is not caught.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from medsynth.data.datasets import load_split


class DataLeakError(ValueError):
    """The base model has seen images the target holds out for validation or testing."""


def pixel_hashes(images: torch.Tensor) -> list[str]:
    """One hash per image; ``images``: ``(N, C, H, W)`` float in [-1, 1]."""
    q = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
    shape = "x".join(str(s) for s in q.shape[1:]).encode()
    return [hashlib.sha256(shape + img.tobytes()).hexdigest()[:32] for img in q]


def ingest_fingerprint(ingest_dir: str | Path) -> str:
    """SHA-256 over the ingest cache's index and images (names the dataset).

    Not summary.json: it holds the ingest's duration, and two ingests of the same data must
    give the same fingerprint (and so the same snapshot hash).
    """
    h = hashlib.sha256()
    for name in ("index.csv", "images.npy"):
        with (Path(ingest_dir) / name).open("rb") as fh:
            for block in iter(lambda f=fh: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def build_provenance(
    images: torch.Tensor, datasets: list[dict] | None, base_cfg: dict | None
) -> dict:
    """``provenance`` for a snapshot: own datasets and training images, plus the base's."""
    base = (base_cfg or {}).get("provenance") or {}
    hashes = sorted(set(pixel_hashes(images)) | set(base.get("train_pixel_sha256", [])))
    return {
        "datasets": list(base.get("datasets", [])) + list(datasets or []),
        "train_pixel_sha256": hashes,
    }


def merge_provenance(old: dict | None, new: dict) -> dict:
    """Union of two provenance records (a resumed run keeps what it saw before)."""
    if not old:
        return new
    datasets = list(old.get("datasets", []))
    datasets += [d for d in new.get("datasets", []) if d not in datasets]
    hashes = set(old.get("train_pixel_sha256", [])) | set(new.get("train_pixel_sha256", []))
    return {"datasets": datasets, "train_pixel_sha256": sorted(hashes)}


def check_no_leak(base_cfg: dict, base_dir: Path, target_ingest: str | Path) -> int:
    """Raise :class:`DataLeakError` if the base saw a target val/test image; return the count
    of held-out images checked."""
    prov = base_cfg.get("provenance")
    if not prov or "train_pixel_sha256" not in prov:
        raise DataLeakError(
            f"base snapshot {base_dir} records no training-image provenance, so it cannot be "
            "checked against the target's validation and test images; retrain the base with "
            "this version of medsynth"
        )
    seen = set(prov["train_pixel_sha256"])
    checked = 0
    for split in ("val", "test"):
        held = load_split(target_ingest, split)
        overlap = sum(h in seen for h in pixel_hashes(held.images))
        checked += len(held.images)
        if overlap:
            raise DataLeakError(
                f"base snapshot {base_dir} was trained on {overlap} of the {len(held.images)} "
                f"{split} images of the target ({target_ingest}); adapting it would leak held-out "
                "images into the generator and bias every uplift figure. Pretrain the base "
                "without the target's validation and test splits"
            )
    return checked
