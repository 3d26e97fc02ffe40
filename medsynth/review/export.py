"""Export the accepted samples of a reviewed pool as a pool of its own (manifest + DICOM)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from medsynth.generation.dataset import read_manifest
from medsynth.review.db import db_path, status_by_sample
from medsynth.utils.csvsafe import write_rows


def sample_key(pool: str, row: dict) -> str:
    return f"{pool}/{row['path']}"


def export_accepted(run_dir: str | Path, pool: str, out_dir: str | Path | None = None, *,
                    reviewer: str | None = None, link: bool = False) -> tuple[Path, int]:  # fmt: skip
    """Write ``manifest.csv`` of the accepted samples (corrected labels applied, the original kept
    in ``original_class``) and their DICOM files (copies, or symlinks with ``link``).

    The default destination ``RUN/generate/<pool>-accepted`` is itself a pool that
    ``medsynth evaluate`` can name in ``evaluation.pools``. Returns (folder, count).
    """
    run = Path(run_dir)
    src = run / "generate" / pool
    rows = read_manifest(src)
    status = status_by_sample(
        db_path(run), {sample_key(pool, r): r["pixel_sha256"] for r in rows}, reviewer
    )
    out = Path(out_dir) if out_dir else run / "generate" / f"{pool}-accepted"
    if out.resolve() == src.resolve():
        raise ValueError("export folder must differ from the pool folder")
    shutil.rmtree(out, ignore_errors=True)
    accepted = []
    for r in rows:
        st = status.get(sample_key(pool, r))
        if not st or st["status"] != "accept":
            continue
        row = dict(r, original_class=r["class_name"], review_note=st["note"])
        if st["corrected_label"]:
            row["class_name"] = st["corrected_label"]
        dst = out / r["path"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        if link:
            os.symlink(os.path.relpath(src / r["path"], dst.parent), dst)
        else:
            shutil.copy2(src / r["path"], dst)
        accepted.append(row)
    out.mkdir(parents=True, exist_ok=True)
    cols = list(rows[0].keys()) + ["original_class", "review_note"] if rows else ["path"]
    with (out / "manifest.csv").open("w", newline="") as fh:
        # Labels and reviewer notes are free text: neutralise spreadsheet formulas.
        write_rows(fh, cols, accepted, lineterminator="\n")
    return out, len(accepted)
