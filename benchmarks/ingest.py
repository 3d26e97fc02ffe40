"""Ingest throughput and peak memory on the shared datasets.

Prints files/s and peak RSS (parent + worker processes, MiB) for PneumoniaMNIST-DICOM at a
quarter and all of its files (RSS must not grow with file count) and for the 400 RSNA JPEG files.
Each case runs in a fresh subprocess so peak RSS is its own. Usage: python benchmarks/ingest.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED = Path(
    os.environ.get("MEDSYNTH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared/data")
)

CASE = r"""
import csv, json, resource, sys, time
from pathlib import Path
from medsynth.data.ingest import ingest
from medsynth.protocol import DatasetSection
cfg = json.loads(sys.argv[1])
ds = DatasetSection(**cfg["dataset"])
t0 = time.perf_counter()
s = ingest(ds, cfg["out"])
dt = time.perf_counter() - t0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"files": s.files_scanned, "images": s.images, "seconds": dt,
                  "self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "child_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def run_case(dataset: dict, out: Path) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", CASE, json.dumps({"dataset": dataset, "out": str(out)})],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def subset_tree(root: Path, labels: Path, keep_every: int, tmp: Path) -> tuple[Path, Path]:
    """Symlink every ``keep_every``-th labelled file into ``tmp`` (no data copied)."""
    import csv

    rows = list(csv.DictReader(labels.open()))[::keep_every]
    for r in rows:
        dst = tmp / r["path"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(root / r["path"])
    table = tmp / "labels.csv"
    with table.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return tmp, table


def main() -> None:
    workers = int(os.environ.get("WORKERS", os.cpu_count() or 2))
    print(f"ingest benchmark: {os.cpu_count()} CPUs, workers={workers}")
    print(f"{'case':<34}{'files':>7}{'files/s':>10}{'parent MiB':>12}{'worker MiB':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pm = SHARED / "pneumoniamnist-dicom"
        if pm.is_dir():
            base = dict(
                label_column="label",
                classes=["normal", "pneumonia"],
                split_column="split",
                spatial_size=28,
                intensity="bits",
                workers=workers,
            )
            for every, name in (
                (4, "pneumoniamnist 1/4 (28 px)"),
                (1, "pneumoniamnist all (28 px)"),
            ):
                root, table = (
                    (pm, pm / "labels.csv")
                    if every == 1
                    else subset_tree(pm, pm / "labels.csv", every, tmp / f"sub{every}")
                )
                r = run_case(dict(base, root=str(root), labels_csv=str(table)), tmp / f"out{every}")
                print(
                    f"{name:<34}{r['files']:>7}{r['files'] / r['seconds']:>10.0f}"
                    f"{r['self_mib']:>12.0f}{r['child_mib']:>12.0f}"
                )
        rs = SHARED / "rsna-pneumonia-dicom"
        if rs.is_dir():
            for size in (64, 128):
                r = run_case(
                    dict(
                        root=str(rs),
                        labels_csv=str(rs / "labels.csv"),
                        join_attribute="PatientID",
                        join_column="patientId",
                        label_column="Target",
                        spatial_size=size,
                        workers=workers,
                    ),
                    tmp / f"rsna{size}",
                )
                name = f"rsna JPEG 1024^2 -> {size} px"
                print(
                    f"{name:<34}{r['files']:>7}{r['files'] / r['seconds']:>10.0f}"
                    f"{r['self_mib']:>12.0f}{r['child_mib']:>12.0f}"
                )


if __name__ == "__main__":
    main()
