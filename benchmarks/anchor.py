"""Real-only classifier anchor on an ingested dataset (e.g. PneumoniaMNIST at 28 px).

Trains the ResNet-18-style default (or --kind small_cnn) on the real train split for each seed,
keeps the best validation-AUC epoch, and prints test AUC / accuracy per seed and their mean.
MedMNIST v2 anchor for PneumoniaMNIST (ResNet-18, 28 px): AUC 0.944, ACC 0.854.

    python benchmarks/anchor.py RUN/ingest [--seeds 5] [--epochs 30] [--kind resnet18]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medsynth.data.datasets import load_split  # noqa: E402
from medsynth.evaluation.classifier import Classifier, ClassifierConfig  # noqa: E402
from medsynth.evaluation.stats import metrics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ingest", type=Path)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--kind", default="resnet18")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    train, val, test = (load_split(args.ingest, s) for s in ("train", "val", "test"))
    print(
        f"{args.kind} on {dev}: train {len(train.labels)}, val {len(val.labels)}, test {len(test.labels)}, "
        f"{args.epochs} epochs, best epoch by validation AUC"
    )
    rows = []
    for seed in range(args.seeds):
        t0 = time.perf_counter()
        cfg = ClassifierConfig(
            kind=args.kind, epochs=args.epochs, batch_size=128, lr=args.lr, device=dev
        )
        clf = Classifier(len(train.classes), 1, cfg, seed=seed).fit(
            train.images, train.labels, val.images, val.labels
        )
        m = metrics(test.labels.numpy(), clf.predict_proba(test.images), train.classes)
        rows.append(
            {"seed": seed, "best_epoch": clf.best_epoch, "seconds": time.perf_counter() - t0, **m}
        )
        print(
            f"  seed {seed}: test AUC {m['auc']:.4f}  ACC {m['accuracy']:.4f}  bal.acc {m['balanced_accuracy']:.4f}"
            f"  (best epoch {clf.best_epoch}, {rows[-1]['seconds']:.0f} s)",
            flush=True,
        )
    auc, acc = np.array([r["auc"] for r in rows]), np.array([r["accuracy"] for r in rows])
    print(
        f"mean over {len(rows)} seeds: AUC {auc.mean():.4f} ± {auc.std(ddof=1) if len(rows) > 1 else 0:.4f}, "
        f"ACC {acc.mean():.4f} ± {acc.std(ddof=1) if len(rows) > 1 else 0:.4f} (MedMNIST v2: 0.944 / 0.854)"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
