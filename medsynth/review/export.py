"""Export the accepted samples of a reviewed pool as a pool of its own (manifest + DICOM).

An export never destroys another export: the default destination is the next free version
(``<pool>-accepted``, ``<pool>-accepted-2``, ...), an explicit destination must not exist yet,
and an export with nothing in it is refused. Each export folder carries ``export.json`` (what was
exported, from which decisions), which also keeps the dashboard from offering it as a pool to
review. A corrected label is applied everywhere the label lives: manifest ``class_name`` and
``class_index``, the folder ``dicom/<class>/`` and the DICOM header (see ``dicom/relabel.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from medsynth.dicom.relabel import relabel_synthetic
from medsynth.generation.dataset import read_manifest
from medsynth.review.db import db_path, status_by_sample
from medsynth.utils.csvsafe import write_rows

EXPORT_MARKER = "export.json"


def sample_key(pool: str, row: dict) -> str:
    return f"{pool}/{row['path']}"


def is_export(pool_dir: str | Path) -> bool:
    """True for a folder written by :func:`export_accepted` (not a pool to review)."""
    return (Path(pool_dir) / EXPORT_MARKER).is_file()


def flagged_paths(run_dir: str | Path, pool: str) -> set[str]:
    """Manifest paths the memorization audit flagged as possible copies (empty if not audited)."""
    memo = Path(run_dir) / "evaluate" / "memorization.json"
    if not memo.is_file():
        return set()
    m = json.loads(memo.read_text()).get(pool)
    if not m:
        return set()
    flags = m["per_sample"]["flagged"]
    return {p for p, f in zip(m["synthetic_paths"], flags, strict=True) if f}


@dataclass
class ExportPlan:
    """What an export would write: output manifest rows (``source_path`` = file in the pool)."""

    pool: str
    reviewer: str | None
    rows: list[dict] = field(default_factory=list)
    relabels: list[dict] = field(default_factory=list)  # {path, from, to}
    flagged_excluded: list[str] = field(default_factory=list)
    flagged_included: list[str] = field(default_factory=list)

    def per_class(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            out[r["class_name"]] = out.get(r["class_name"], 0) + 1
        return dict(sorted(out.items()))


def plan_export(
    run_dir: str | Path, pool: str, *, reviewer: str | None = None, exclude_flagged: bool = False
) -> ExportPlan:
    """The accepted samples with corrected labels applied; flagged copies kept or left out."""
    run = Path(run_dir)
    rows = read_manifest(run / "generate" / pool)
    status = status_by_sample(
        db_path(run), {sample_key(pool, r): r["pixel_sha256"] for r in rows}, reviewer
    )
    index_of = {r["class_name"]: int(r["class_index"]) for r in rows}
    flagged = flagged_paths(run, pool)
    plan = ExportPlan(pool, reviewer)
    taken: set[str] = set()
    for r in rows:
        st = status.get(sample_key(pool, r))
        if not st or st["status"] != "accept":
            continue
        if r["path"] in flagged:
            (plan.flagged_excluded if exclude_flagged else plan.flagged_included).append(r["path"])
            if exclude_flagged:
                continue
        row = dict(r, source_path=r["path"], original_class=r["class_name"], review_note=st["note"])
        new = st["corrected_label"]
        if new and new != r["class_name"]:
            if new not in index_of:
                raise ValueError(
                    f"{sample_key(pool, r)}: corrected label {new!r} is not a class of pool "
                    f"{pool} ({', '.join(sorted(index_of))}); fix the decision before exporting"
                )
            name = Path(r["path"]).name
            path = f"dicom/{new}/{name}"
            if path in taken or any(x["path"] == path for x in rows):
                path = f"dicom/{new}/relabelled-{r['class_name']}-{name}"
            row.update(class_name=new, class_index=str(index_of[new]), path=path)
            plan.relabels.append({"path": r["path"], "from": r["class_name"], "to": new})
        taken.add(row["path"])
        plan.rows.append(row)
    return plan


def next_export_dir(run_dir: str | Path, pool: str) -> Path:
    """The first free ``RUN/generate/<pool>-accepted[-N]`` folder."""
    base = Path(run_dir) / "generate" / f"{pool}-accepted"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def export_accepted(
    run_dir: str | Path,
    pool: str,
    out_dir: str | Path | None = None,
    *,
    reviewer: str | None = None,
    link: bool = False,
    exclude_flagged: bool = False,
) -> tuple[Path, int]:
    """Write ``manifest.csv`` of the accepted samples (corrected labels applied everywhere, the
    original kept in ``original_class``), their DICOM files (copies, or symlinks with ``link``;
    a relabelled file is always a rewritten copy) and ``export.json``.

    The default destination (the next free ``RUN/generate/<pool>-accepted[-N]``) is itself a
    pool that ``medsynth evaluate`` can name in ``evaluation.pools``. Returns (folder, count).
    Raises ``ValueError`` when there is nothing to export or the destination exists.
    """
    run = Path(run_dir)
    src = run / "generate" / pool
    plan = plan_export(run, pool, reviewer=reviewer, exclude_flagged=exclude_flagged)
    whose = f"reviewer {reviewer!r}" if reviewer else "any reviewer"
    if not plan.rows:
        raise ValueError(
            f"nothing to export from pool {pool}: no sample is accepted by {whose}; "
            "no folder was written and earlier exports are untouched"
        )
    out = Path(out_dir) if out_dir else next_export_dir(run, pool)
    if out.resolve() == src.resolve():
        raise ValueError("export folder must differ from the pool folder")
    if out.exists():
        raise ValueError(
            f"export folder {out} already exists; exports never overwrite one another. "
            "Choose a new folder (or leave --out out for the next free version)"
        )
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    relabelled = {x["path"] for x in plan.relabels}
    for row in plan.rows:
        dst = tmp / row["path"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        source = src / row["source_path"]
        if row["source_path"] in relabelled:
            data, uid = relabel_synthetic(source, row["class_name"], int(row["class_index"]))
            dst.write_bytes(data)
            row.update(SOPInstanceUID=uid, file_sha256=hashlib.sha256(data).hexdigest())
        elif link:
            # Relative to where the link will live once the folder is renamed.
            os.symlink(os.path.relpath(source, (out / row["path"]).parent), dst)
        else:
            shutil.copy2(source, dst)
    cols = list(read_manifest(src)[0].keys()) + ["original_class", "review_note"]
    with (tmp / "manifest.csv").open("w", newline="") as fh:
        # Labels and reviewer notes are free text: neutralise spreadsheet formulas.
        write_rows(fh, cols, plan.rows, lineterminator="\n")
    meta = {
        "source_pool": pool,
        "reviewer": reviewer,
        "exported_at": time.time(),
        "count": len(plan.rows),
        "per_class": plan.per_class(),
        "relabels": plan.relabels,
        "flagged_excluded": plan.flagged_excluded,
        "flagged_included": plan.flagged_included,
    }
    (tmp / EXPORT_MARKER).write_text(json.dumps(meta, indent=1))
    os.replace(tmp, out)
    return out, len(plan.rows)
