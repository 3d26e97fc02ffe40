"""PneumoniaMNIST split hygiene: duplicate counts and the effect of leaking test images on AUC.

Ingests ../shared/data/pneumoniamnist-dicom with the protocol's dataset section (28 px, official
split), prints exact and near-duplicate counts within and across splits, then trains the
real-only classifier at the protocol's classifier settings for a few seeds and scores each on the
full test split and on the test split without the images that have a near-duplicate in train
(same predictions, paired), and with the leaking validation images dropped from model selection
(duplicate_policy: drop; a second fit per seed). Usage:
OMP_NUM_THREADS=1 python benchmarks/pneumoniamnist_leak.py [--fraction F] [--seeds 5]
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
from medsynth.data.duplicates import find_duplicates
from medsynth.data.ingest import ingest
from medsynth.data.leakage import leak_summary
from medsynth.evaluation.classifier import Classifier, ClassifierConfig
from medsynth.evaluation.stats import metrics
from medsynth.protocol import load_protocol

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDSYNTH_SHARED_DATA", ROOT.parent / "shared/data"))


def duplicate_figures(ingest_dir: Path, threshold: float) -> None:
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
        for held, s_h, s_o in (
            (r["row_a"], r["split_a"], r["split_b"]),
            (r["row_b"], r["split_b"], r["split_a"]),
        ):
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
    print(
        f"exact-duplicate groups: {len(groups)}, spanning splits: "
        f"{sum(len(s) > 1 for s in groups.values())}"
    )
    for s in ("val", "test"):
        print(
            f"{s}: {len(leaking[s])} images with a near-duplicate in train "
            f"({len(exact_leaking[s])} exact)"
        )


def leaking_rows(ingest_dir: Path, threshold: float) -> dict[str, set[str]]:
    """Val/test cache rows (strings, as in index.csv) with a train image at corr >= threshold."""
    rows = list(csv.DictReader((ingest_dir / "index.csv").open()))
    pairs = find_duplicates(np.load(ingest_dir / "images.npy", mmap_mode="r"), threshold)
    leak = {str(k) for k in leak_summary(rows, pairs)["leaking_rows"]}
    return {
        s: {r["row"] for r in rows if r["split"] == s and r["row"] in leak} for s in ("val", "test")
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fraction", type=float, default=None, help="default: the protocol's")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--sensitivity", nargs="*", type=float, default=[0.95, 0.93])
    args = ap.parse_args()
    proto = load_protocol(ROOT / "protocols/pneumoniamnist.yaml")
    root = SHARED / "pneumoniamnist-dicom"
    ds = proto.dataset.model_copy(update=dict(root=str(root), labels_csv=str(root / "labels.csv")))
    frac = args.fraction or ds.train_fraction
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ingest"
        t0 = time.perf_counter()
        summary = ingest(ds, out)
        print(summary.line(), f"(ingest incl. duplicate search {time.perf_counter() - t0:.1f} s)")
        duplicate_figures(out, ds.duplicate_threshold)
        thresholds = [ds.duplicate_threshold, *args.sensitivity]
        leaks = {t: leaking_rows(out, t) for t in thresholds}
        for t, d in leaks.items():
            print(
                f"corr >= {t:g}: val {len(d['val'])}, test {len(d['test'])} with a train neighbour"
            )
        real = load_split(out, "train", frac, ds.fraction_seed)
        val, test = load_split(out, "val"), load_split(out, "test")
        y = test.labels.numpy()
        val_drop = np.array(
            [r["row"] not in leaks[ds.duplicate_threshold]["val"] for r in val.rows]
        )
        cfg = ClassifierConfig(**proto.evaluation.classifier.model_dump())
        print(
            f"real-only {cfg.kind}, epochs {cfg.epochs}, batch {cfg.batch_size}, train fraction "
            f"{frac:g} (n={len(real.labels)}), test {len(y)}"
        )
        res = []
        for seed in range(args.seeds):
            rec = {}
            for policy, keep in (("keep", np.ones(len(val.rows), bool)), ("drop", val_drop)):
                t1 = time.perf_counter()
                clf = Classifier(2, 1, cfg, seed=seed)
                clf.fit(real.images, real.labels, val.images[keep], val.labels[keep])
                p = clf.predict_proba(test.images)
                rec[policy] = metrics(y, p, test.classes)["auc"]
                for t in thresholds:  # the same predictions, scored without test images near train
                    clean = np.array([r["row"] not in leaks[t]["test"] for r in test.rows])
                    rec[f"{policy}@{t:g}"] = metrics(y[clean], p[clean], test.classes)["auc"]
                rec[f"{policy}_s"] = time.perf_counter() - t1
            res.append(rec)
            print(f"  seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in rec.items()))
        for key in res[0]:
            if key.endswith("_s"):
                continue
            v = np.array([r[key] for r in res])
            d = v - np.array([r["keep"] for r in res])
            print(
                f"AUC {key:<10} {v.mean():.4f} ± {v.std(ddof=1):.4f}; vs keep/full test "
                f"{d.mean():+.4f} ± {d.std(ddof=1):.4f} (mean ± sd, {len(v)} seeds)"
            )


if __name__ == "__main__":
    main()
