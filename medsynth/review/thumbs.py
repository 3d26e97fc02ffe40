"""Server-side PNG thumbnails with window/level, marked SYNTHETIC (never JPEG)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from medsynth.dicom.read import DecodeOptions, load_unit_image

# Synthetic instances store the training scale [-1, 1] as modality values.
TRAINING_SCALE = DecodeOptions(intensity="window", window_center=0.0, window_width=2.0)


def window(unit: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map a [0, 1] image through a window (level/width in the same [0, 1] units) to [0, 1]."""
    return np.clip((unit - (level - width / 2)) / max(width, 1e-6), 0, 1)


def to_png(img01: np.ndarray, size: int = 112, marker: str | None = "SYNTHETIC") -> bytes:
    """``(H, W)`` in [0, 1] -> PNG bytes, upsampled to ``size`` px, with a corner marker."""
    im = Image.fromarray((img01 * 255).round().astype(np.uint8)).resize(
        (size, size), Image.Resampling.NEAREST
    )
    im = im.convert("RGB")
    if marker:
        d = ImageDraw.Draw(im)
        w = int(d.textlength(marker)) + 6
        d.rectangle([0, 0, w, 11], fill=(200, 30, 30))
        d.text((3, 0), marker, fill=(255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def dicom_thumbnail(path: str | Path, level: float = 0.5, width: float = 1.0, size: int = 112,
                    marker: str | None = "SYNTHETIC") -> bytes:  # fmt: skip
    unit = load_unit_image(path, TRAINING_SCALE)[0]
    return to_png(window(unit, level, width), size, marker)


def array_thumbnail(img: np.ndarray, level: float = 0.5, width: float = 1.0, size: int = 112,
                    marker: str | None = None) -> bytes:  # fmt: skip
    """``img``: ``(H, W)`` in [-1, 1] (the ingest cache scale)."""
    return to_png(window((img.astype(np.float32) + 1) / 2, level, width), size, marker)
