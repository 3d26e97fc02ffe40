"""Source | edit | difference | mask for one edited sample (the dashboard's edit strip).

Reads the run folder only: the source is the ingest cache row the manifest names (never a
source file), the edit its DICOM, the mask the PNG the edit wrote beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from medsynth.dicom.read import load_unit_image
from medsynth.dicom.write import synthetic_decode_options

PANELS = ("source", "edit", "difference", "mask")


def is_edit_row(row: dict) -> bool:
    return bool(row.get("edit"))


def edit_panels(run: str | Path, pool_dir: str | Path, row: dict) -> dict[str, np.ndarray]:
    """``panel -> (H, W) or (3, H, W)`` float in [0, 1] for ``PANELS`` (mask only if inpainted).

    ``difference`` is ``|edit - source|`` (channel mean) scaled by its own maximum, so a faint
    edit is still visible; its caption should give the unscaled maximum (``difference_max``).
    """
    run, pool_dir = Path(run), Path(pool_dir)
    cache = np.load(run / "ingest" / "images.npy", mmap_mode="r")
    src = (np.asarray(cache[int(row["source_row"])], np.float32) + 1) / 2
    edit = load_unit_image(pool_dir / row["path"], synthetic_decode_options(src.shape[0]))
    if edit.shape != src.shape:
        raise ValueError(
            f"edit {row['path']} is {edit.shape} but its source cache row is {src.shape}"
        )
    diff = np.abs(edit - src).mean(0)
    out = {
        "source": src,
        "edit": edit,
        "difference": diff / max(float(diff.max()), 1e-6),
        "difference_max": np.array(float(diff.max())),
    }
    if row.get("mask_path"):
        out["mask"] = np.asarray(Image.open(pool_dir / row["mask_path"]), np.float32) / 255
    return out
