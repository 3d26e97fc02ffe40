"""Real-vs-synthetic grid per class from a snapshot and its ingest cache (for docs/).

    python benchmarks/grid.py RUN/train/snapshot-XXXXXXX RUN/ingest OUT.png [--per-class 12]

Rows: per class, one row of real training images and one of synthetic ones (DPM-Solver++-20,
guidance 2, seeds 0..n-1). Also prints mean intensity of both, per class.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medsynth.data.datasets import load_split  # noqa: E402
from medsynth.diffusion.sampler import sample  # noqa: E402
from medsynth.training.checkpoint import load_snapshot  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("snapshot", type=Path)
    ap.add_argument("ingest", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-class", type=int, default=12)
    ap.add_argument("--guidance", type=float, default=2.0)
    args = ap.parse_args()
    model, cfg, conf = load_snapshot(args.snapshot)
    classes, n = conf["classes"], args.per_class
    real = load_split(args.ingest, "train")
    labels = [c for c in range(len(classes)) for _ in range(n)]
    syn = sample(
        model,
        cfg,
        labels,
        list(range(len(labels))),
        image_shape=tuple(conf["image_shape"]),
        null_label=len(classes),
        sampler="dpmpp",
        steps=20,
        guidance_scale=args.guidance,
    )
    fig, axes = plt.subplots(2 * len(classes), 1, figsize=(n * 0.9, 2 * len(classes) * 1.0 + 0.4))
    for c, name in enumerate(classes):
        r = real.images[real.labels == c][:n, 0]
        s = syn[c * n : (c + 1) * n, 0]
        for ax, imgs, kind in ((axes[2 * c], r, "real"), (axes[2 * c + 1], s, "synthetic")):
            ax.imshow(
                ((imgs.permute(1, 0, 2).reshape(imgs.shape[1], -1) + 1) / 2).numpy(),
                cmap="gray",
                vmin=0,
                vmax=1,
            )
            ax.set_title(f"{name}: {kind}", fontsize=9, loc="left")
            ax.axis("off")
        print(
            f"{name}: mean intensity real {float((real.images[real.labels == c].mean() + 1) / 2):.3f}, "
            f"synthetic {float((syn[c * n : (c + 1) * n].mean() + 1) / 2):.3f}"
        )
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
