"""Server-side PNG thumbnails with window/level, marked SYNTHETIC (never JPEG).

Grey images give grey thumbnails; RGB images (``dataset.color: rgb``) keep their colour, with
the window applied to each channel alike.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from medsynth.dicom.read import load_unit_image, read_header
from medsynth.dicom.write import synthetic_decode_options

# Grey synthetic instances store the training scale [-1, 1] as modality values.
TRAINING_SCALE = synthetic_decode_options(1)


def window(unit: np.ndarray, level: float, width: float) -> np.ndarray:
    """Map a [0, 1] image through a window (level/width in the same [0, 1] units) to [0, 1]."""
    return np.clip((unit - (level - width / 2)) / max(width, 1e-6), 0, 1)


def _channels_last(img: np.ndarray) -> np.ndarray:
    """``(H, W)`` or ``(1, H, W)`` -> ``(H, W)``; ``(3, H, W)`` -> ``(H, W, 3)``."""
    if img.ndim == 3 and img.shape[0] == 1:
        return img[0]
    if img.ndim == 3 and img.shape[0] == 3:
        return np.ascontiguousarray(img.transpose(1, 2, 0))
    if img.ndim != 2:
        raise ValueError(f"image must be (H, W), (1, H, W) or (3, H, W), got {img.shape}")
    return img


def to_png(img01: np.ndarray, size: int = 112, marker: str | None = "SYNTHETIC") -> bytes:
    """``(H, W)``, ``(1, H, W)`` or ``(3, H, W)`` (RGB) in [0, 1] -> PNG bytes, upsampled to
    ``size`` px, with a corner marker."""
    pixels = (_channels_last(img01) * 255).round().astype(np.uint8)
    im = Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST)
    im = im.convert("RGB")
    if marker:
        d = ImageDraw.Draw(im)
        w = int(d.textlength(marker)) + 6
        d.rectangle([0, 0, w, 11], fill=(200, 30, 30))
        d.text((3, 0), marker, fill=(255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def dicom_thumbnail(
    path: str | Path,
    level: float = 0.5,
    width: float = 1.0,
    size: int = 112,
    marker: str | None = "SYNTHETIC",
) -> bytes:
    """A synthetic instance (grey or RGB, as ``dicom.write`` stores them) as a PNG thumbnail."""
    spp = int(read_header(path).get("SamplesPerPixel") or 1)
    unit = load_unit_image(path, synthetic_decode_options(spp))
    return to_png(window(unit, level, width), size, marker)


def array_thumbnail(
    img: np.ndarray,
    level: float = 0.5,
    width: float = 1.0,
    size: int = 112,
    marker: str | None = None,
) -> bytes:
    """``img``: ``(H, W)``, ``(1, H, W)`` or ``(3, H, W)`` in [-1, 1] (the ingest cache scale;
    pass a whole cache row ``cache[i]`` to keep colour)."""
    return to_png(window((img.astype(np.float32) + 1) / 2, level, width), size, marker)
