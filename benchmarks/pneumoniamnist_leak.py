"""PneumoniaMNIST split hygiene: duplicate counts and the effect of leaking test images on AUC.

Ingests ../shared/data/pneumoniamnist-dicom with the protocol's dataset section (28 px, official
split), prints exact and near-duplicate counts within and across splits, then trains the
real-only classifier at the protocol's classifier settings for a few seeds and scores each on the
full test split and on the test split without the images that have a near-duplicate in train
(same predictions, paired). Usage:
OMP_NUM_THREADS=1 python benchmarks/pneumoniamnist_leak.py [--fractions 0.1 1.0] [--seeds 5]
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from medsynth.data.datasets import load_split
from medsynth.data.ingest import ingest
from medsynth.evaluation.classifier import Classifier, ClassifierConfig
from medsynth.evaluation.stats import metrics
from medsynth.protocol import load_protocol

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDSYNTH_SHARED_DATA", ROOT.parent / "shared/data"))


def duplicate_figures(ingest_dir: Path, threshold: float) -> tuple[set[str], dict]:
    """Leaking val/test cache rows and counts of pairs/groups by split, from duplicates.csv."""
    dup = list(csv.DictReader((ingest_dir / "duplicates.csv").open()))
    by = Counter()
    leaking: dict[str, set[str]] = {"val": set(), "test": set()}
    exact_leaking: dict[str, set[str]] = {"val": set(), "test": set()}
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        parent.setdefault(a, a)
        while parent[a] != a:
            a = parent[a]
        return a

    for r in dup:
        kind = "exact" if r["exact"] == "1" else "near"
        by[(kind, "-".join(sorted((r["split_a"], r["split_b"]))))] += 1
        if r["exact"] == "1":
            parent[find(r["row_a"])] = find(r["row_b"])
        for held, s_h, s_o in ((r["row_a"], r["split_a"], r["split_b"]),
                               (r["row_b"], r["split_b"], r["split_a"])):  # fmt: skip
            if s_h in leaking and s_o == "train":
                leaking[s_h].add(held)
                if r["exact"] == "1":
                    exact_leaking[s_h].add(held)
    index = {r["row"]: r["split"] for r in csv.DictReader((ingest_dir / "index.csv").open())}
    groups: dict[str, set[str]] = {}
    for row in parent:
        groups.setdefault(find(row), set()).add(index[row])
    print(f"duplicate pairs at corr >= {threshold:g} (28 px cache):")
    for (kind, splits), n in sorted(by.items()):
        print(f"  {kind:<5} {splits:<11} {n}")
    print(f"exact-duplicate groups: {len(groups)}, spanning splits: "
          f"{sum(len(s) > 1 for s in groups.values())}")  # fmt: skip
    for s in ("val", "test"):
        print(f"{s}: {len(leaking[s])} images with a near-duplicate in train "
              f"({len(exact_leaking[s])} exact)")  # fmt: skip
    return leaking["test"], {"pairs": dict(by), "groups": len(groups)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fractions", nargs="*", type=float, default=[0.1, 1.0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=None)
    args = ap.parse_args()
    proto = load_protocol(ROOT / "protocols/pneumoniamnist.yaml")
    root = SHARED / "pneumoniamnist-dicom"
    upd = dict(root=str(root), labels_csv=str(root / "labels.csv"), workers=2)
    if args.threshold is not None:
        upd["duplicate_threshold"] = args.threshold
    ds = proto.dataset.model_copy(update=upd)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ingest"
        t0 = time.perf_counter()
        summary = ingest(ds, out)
        print(summary.line(), f"(ingest incl. duplicate search {time.perf_counter() - t0:.1f} s)")
        leaking_test, _ = duplicate_figures(out, ds.duplicate_threshold)
        val, test = load_split(out, "val"), load_split(out, "test")
        clean = np.array([r["row"] not in leaking_test for r in test.rows])
        y = test.labels.numpy()
        cfg = ClassifierConfig(**proto.evaluation.classifier.model_dump())
        print(f"classifier {cfg.kind}, epochs {cfg.epochs}, batch {cfg.batch_size}; test {len(y)} "
              f"images, {int((~clean).sum())} leaking (labels {np.bincount(y[~clean], minlength=2)})")  # fmt: skip
        for frac in args.fractions:
            real = load_split(out, "train", frac, ds.fraction_seed)
            aucs = []
            for seed in range(args.seeds):
                t1 = time.perf_counter()
                clf = Classifier(2, 1, cfg, seed=seed)
                clf.fit(real.images, real.labels, val.images, val.labels)
                p = clf.predict_proba(test.images)
                a_all = metrics(y, p, test.classes)["auc"]
                a_clean = metrics(y[clean], p[clean], test.classes)["auc"]
                a_leak = metrics(y[~clean], p[~clean], test.classes)["auc"] if len(
                    set(y[~clean])) > 1 else float("nan")  # fmt: skip
                aucs.append((a_all, a_clean, a_leak))
                print(f"  fraction {frac:g} (n={len(real.labels)}) seed {seed}: AUC all {a_all:.4f}, "
                      f"without leaking {a_clean:.4f}, leaking only {a_leak:.4f} "
                      f"({time.perf_counter() - t1:.0f} s)")  # fmt: skip
            a = np.array(aucs)
            d = a[:, 0] - a[:, 1]
            print(f"fraction {frac:g}: AUC all {a[:, 0].mean():.4f} ± {a[:, 0].std(ddof=1):.4f}, "
                  f"without leaking {a[:, 1].mean():.4f} ± {a[:, 1].std(ddof=1):.4f}, "
                  f"difference {d.mean():+.4f} ± {d.std(ddof=1):.4f} (mean ± sd over {len(d)} seeds)")  # fmt: skip


if __name__ == "__main__":
    main()
