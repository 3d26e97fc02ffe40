"""Array transforms shared by ingest and datasets (numpy + Pillow; no torch, no pydicom)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def _resize_channel(chan: np.ndarray, width: int, height: int) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(chan, dtype=np.float32), mode="F")
    # Lanczos antialiases large reductions (1024 -> 64); `reducing_gap` keeps it fast.
    return np.asarray(img.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0))


def fit_to_square(unit: np.ndarray, size: int, mode: str = "pad") -> np.ndarray:
    """Resize ``(C, H, W)`` in [0, 1] to ``(C, size, size)`` float32 in [-1, 1].

    ``pad`` keeps the aspect ratio and pads with each channel's minimum; ``crop`` keeps it and
    centre-crops; ``stretch`` ignores it. Same-size input is passed through unresampled, so
    pixel values survive exactly.
    """
    c, h, w = unit.shape
    if mode == "stretch" or h == w:
        nh = nw = size
    else:
        scale = size / max(h, w) if mode == "pad" else size / min(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) == (h, w):
        out = unit.astype(np.float32, copy=True)
    else:
        out = np.stack([_resize_channel(ch, nw, nh) for ch in unit])
    if (nh, nw) != (size, size):
        if mode == "pad":
            canvas = np.empty((c, size, size), np.float32)
            canvas[:] = out.reshape(c, -1).min(axis=1)[:, None, None]
            top, left = (size - nh) // 2, (size - nw) // 2
            canvas[:, top : top + nh, left : left + nw] = out
            out = canvas
        else:
            top, left = (nh - size) // 2, (nw - size) // 2
            out = out[:, top : top + size, left : left + size]
    return np.clip(out * 2.0 - 1.0, -1.0, 1.0).astype(np.float32)
