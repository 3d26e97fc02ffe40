"""Peak memory of an ingest over a hostile corpus with small files declaring huge frames.

Builds the corpus of tests/hostile.py (symlink loops, FIFO, stubs, DICOMDIR, 60000² header,
bits 64, Modality LUT, multi-frame, ...) with a deflated file declaring a SIDE × SIDE 16-bit
frame (a few hundred KB on disk), plus 64 good small files so two worker processes run, then
ingests it in a fresh subprocess. Peak RSS is polled from /proc every 20 ms and summed over the
process tree (parent + workers at the same instant), and also read from ``ru_maxrss``.

Cases: 16384² and 32768² at the default ``dataset.max_pixels``; a deflated 8192² frame (at the
limit) that is decoded and averaged down; and, for comparison, 16384² with the limit off, run
under a 6 GB address-space cap (skipped with ``--safe``). Usage:

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/hostile_ingest.py [--safe]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CASE = r"""
import json, resource, sys, time
from medsynth.data.ingest import ingest
from medsynth.protocol import DatasetSection
cfg = json.loads(sys.argv[1])
if cfg.get("as_limit"):
    resource.setrlimit(resource.RLIMIT_AS, (cfg["as_limit"], cfg["as_limit"]))
t0 = time.perf_counter()
s = ingest(DatasetSection(**cfg["dataset"]), cfg["out"])
print(json.dumps({"files": s.files_scanned, "images": s.images, "skipped": s.skipped,
                  "unlabelled": s.unlabelled, "seconds": time.perf_counter() - t0,
                  "self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "child_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def _tree_rss_bytes(root_pid: int) -> int:
    """Resident memory of ``root_pid`` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            parents[int(entry)] = int(fields[1])
            rss[int(entry)] = int(fields[21]) * page
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in tree]
        tree.update(kids)
        frontier.extend(kids)
    return sum(rss.get(p, 0) for p in tree)


def run_case(dataset: dict, out: Path, as_limit: int | None = None) -> dict:
    cfg = {"dataset": dataset, "out": str(out), "as_limit": as_limit}
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", CASE, json.dumps(cfg)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = [0]

    def poll() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_bytes(proc.pid))
            time.sleep(0.02)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    stdout, stderr = proc.communicate()
    t.join()
    if proc.returncode != 0:
        last = (stderr.strip().splitlines() or ["?"])[-1]
        return {"error": last[:120], "tree_mib": peak[0] / 2**20}
    res = json.loads(stdout.strip().splitlines()[-1])
    return res | {"tree_mib": peak[0] / 2**20}


def corpus(tmp: Path, side: int) -> tuple[Path, Path]:
    import numpy as np

    from tests.hostile import build_hostile_corpus, image_dataset, label_table, write_native

    root = tmp / f"corpus{side}"
    build_hostile_corpus(root, huge_side=side)
    rng = np.random.default_rng(1)
    for i in range(64):
        ds = image_dataset(64, 64, StudyID=f"pad{i}", PatientID=f"PAD{i}")
        write_native(root / f"pad{i:02d}.dcm", ds, rng.integers(0, 4096, 4096, np.uint16).tobytes())
    return root, label_table(root, tmp / f"labels{side}.csv")


def main() -> None:
    from tests.hostile import label_table, write_deflated_huge

    safe = "--safe" in sys.argv
    print(f"hostile ingest: {os.cpu_count()} CPUs, workers=2, spatial_size 64")
    head = (
        f"{'case':<46}{'files':>6}{'index':>6}{'skip':>6}{'s':>7}{'tree MiB':>10}{'worker MiB':>11}"
    )
    print(head)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = dict(join_column="sop", spatial_size=64, workers=2, multiframe="middle")
        cases = []
        for side in (16384, 32768):
            root, table = corpus(tmp, side)
            cases.append((f"corpus, deflated {side}² declared", root, table, {}, None))
        at_limit = tmp / "limit"
        at_limit.mkdir()
        write_deflated_huge(at_limit / "d8192.dcm", 8192, 8192)
        table = label_table(at_limit, tmp / "limit.csv")
        cases.append(("deflated 8192² (= max_pixels), decoded", at_limit, table, {}, None))
        if not safe:
            root16 = tmp / "corpus16384"
            cases.append(
                (
                    "corpus 16384², max_pixels 0 (no limit), 6 GB cap",
                    root16,
                    tmp / "labels16384.csv",
                    {"max_pixels": 0},
                    6_000_000_000,
                )
            )
        for i, (name, root, table, extra, cap) in enumerate(cases):
            ds = dict(base, root=str(root), labels_csv=str(table), **extra)
            r = run_case(ds, tmp / f"out{i}", cap)
            if "error" in r:
                print(f"{name:<46} failed: {r['error']} (tree peak {r['tree_mib']:.0f} MiB)")
                continue
            print(
                f"{name:<46}{r['files']:>6}{r['images']:>6}{r['skipped']:>6}{r['seconds']:>7.1f}"
                f"{r['tree_mib']:>10.0f}{r['child_mib']:>11.0f}"
            )


if __name__ == "__main__":
    main()
