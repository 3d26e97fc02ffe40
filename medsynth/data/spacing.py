"""Physical pixel spacing of the cached images, for the synthetic DICOM a model writes.

A synthetic image has a physical scale only when every training image had the same one at the
cache size; otherwise the DICOM carries no ``PixelSpacing`` and says why (``ImageComments``).
"""

from __future__ import annotations

import math
import re

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def parse_spacing(text: str) -> tuple[float, float] | None:
    """``"[0.168, 0.168]"`` or ``"0.168\\0.168"`` -> (row, column) mm; None when absent or bad
    (not two values, zero, negative or not finite)."""
    vals = [float(v) for v in _NUMBER.findall(text or "")]
    if len(vals) != 2 or not all(0 < v < math.inf for v in vals):
        return None
    return vals[0], vals[1]


def cache_spacing(
    rows: list[dict], size: int, resize_mode: str = "pad", tolerance: float = 0.01
) -> tuple[tuple[float, float] | None, str]:
    """(row, column) spacing in mm of ``size`` px cache images made from index ``rows``.

    ``rows``: index.csv rows (``PixelSpacing``, ``Rows``, ``Columns``) of the images the model
    learned from. ``pad`` maps the long side to ``size``, ``crop`` the short side, ``stretch``
    each side. Returns the spacing when every row agrees within ``tolerance`` (relative), else
    ``(None, reason)``; the reason is empty when a spacing is returned.
    """
    found, missing = [], 0
    for r in rows:
        src = parse_spacing(r.get("PixelSpacing", ""))
        h, w = int(r.get("Rows") or 0), int(r.get("Columns") or 0)
        if src is None or not h or not w:
            missing += 1
            continue
        if resize_mode == "stretch":
            scale = (h / size, w / size)
        else:
            side = max(h, w) if resize_mode == "pad" else min(h, w)
            scale = (side / size, side / size)
        found.append((src[0] * scale[0], src[1] * scale[1]))
    if not rows:
        return None, "PixelSpacing omitted: no training images to derive it from"
    if missing:
        return None, (
            f"PixelSpacing omitted: {missing} of {len(rows)} training images have no "
            "PixelSpacing (or no size)"
        )
    lo = tuple(min(f[k] for f in found) for k in (0, 1))
    hi = tuple(max(f[k] for f in found) for k in (0, 1))
    if any(hi[k] > lo[k] * (1 + tolerance) for k in (0, 1)):
        return None, (
            f"PixelSpacing omitted: the training images' spacing at {size} px ranges "
            f"{lo[0]:.4g}-{hi[0]:.4g} mm, so a synthetic image has no single physical scale"
        )
    return (round((lo[0] + hi[0]) / 2, 6), round((lo[1] + hi[1]) / 2, 6)), ""
