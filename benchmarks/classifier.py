"""Classifier fits per second: the seeds of one arm fitted one after the other vs faster paths.

    python benchmarks/classifier.py [--seeds 5] [--epochs 3] [--batch-size 64] [--n-train 470]
                                    [--n-val 524] [--modes seq_fp32_nchw,seq_fp32,seq_bf16,...]

Same data (a seeded two-class 28 px task the size of PneumoniaMNIST at a 10 % train fraction:
470 train, 524 validation images), same small_cnn settings, one process; every mode fits the
same seeds. Modes: ``seq_fp32_nchw`` = the fit before this change (contiguous NCHW, fp32);
``seq_fp32`` = channels-last fp32 (the new default); ``seq_bf16`` = channels-last with bf16
autocast (``evaluation.classifier.precision: bf16``); ``grouped_*`` = all seeds as one grouped
network. Prints seconds per fit, fits/s and the ratio to the first mode, and per-seed val AUC.
Modes run interleaved, ``--rounds`` times, and the fastest round counts (the machine is shared).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medsynth.evaluation.classifier import ClassifierConfig  # noqa: E402
from medsynth.evaluation.grouped import fit_seeds  # noqa: E402

MODES = {  # name -> (precision, channels_last, grouped)
    "seq_fp32_nchw": ("fp32", False, False),
    "seq_fp32": ("fp32", True, False),
    "seq_bf16": ("bf16", True, False),
    "grouped_fp32": ("fp32", True, True),
    "grouped_bf16": ("bf16", True, True),
}


def task(n: int, g: torch.Generator, size: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images ``(n, 1, size, size)`` in [-1, 1]: noise, class 1 with a faint square."""
    y = torch.arange(n) % 2
    x = torch.randn(n, 1, size, size, generator=g) * 0.5
    x[y == 1, :, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] += 0.08
    return x.clamp(-1, 1), y


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=470)
    ap.add_argument("--n-val", type=int, default=524)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64, help="64: protocols/pneumoniamnist.yaml")
    ap.add_argument("--modes", default="seq_fp32_nchw,seq_fp32,seq_bf16,grouped_bf16")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x, y = task(args.n_train, g)
    xv, yv = task(args.n_val, g)
    modes = args.modes.split(",")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.seeds} seeds x "
        f"{args.epochs} epochs, {args.n_train} train / {args.n_val} val at 28 px, small_cnn, batch {args.batch_size}"
    )
    best = {m: float("inf") for m in modes}
    aucs = {}
    for _ in range(args.rounds):
        for m in modes:
            precision, cl, grouped = MODES[m]
            cfg = ClassifierConfig(
                epochs=args.epochs,
                batch_size=args.batch_size,
                precision=precision,
                channels_last=cl,
            )
            t0 = time.perf_counter()
            clfs = fit_seeds(2, 1, cfg, list(range(args.seeds)), x, y, xv, yv, grouped=grouped)
            best[m] = min(best[m], (time.perf_counter() - t0) / args.seeds)
            aucs[m] = [max(h["val_auc"] for h in c.history) for c in clfs]
    base = best[modes[0]]
    print(f"{'mode':<16}{'s/fit':>8}{'fits/s':>9}{'x':>7}  best val AUC per seed")
    for m in modes:
        print(
            f"{m:<16}{best[m]:>8.2f}{1 / best[m]:>9.3f}{base / best[m]:>7.2f}  "
            + " ".join(f"{a:.3f}" for a in aucs[m])
        )


if __name__ == "__main__":
    main()
