"""Adaptation cost: adapter size on disk and training speed of scratch vs full fine-tune vs LoRA.

Trains a short base (the default 28 px PneumoniaMNIST model, channels 32-64-64), then for the
same number of steps: from scratch, full fine-tuning from the base, and LoRA at a few ranks.
Prints trainable parameters, training images/s (median of the logged intervals, the first one
and the end-of-run preview left out), snapshot size on disk, and the time to load the adapter
snapshot (base + adapter + merge). Content does not change any of these figures, so the images
are seeded noise; adaptation *quality* at equal time is a study (docs/results.md).

    OMP_NUM_THREADS=1 python benchmarks/adapt.py [--steps 40] [--batch 64] [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medsynth.diffusion.unet import UNetConfig  # noqa: E402
from medsynth.training.checkpoint import load_snapshot  # noqa: E402
from medsynth.training.loop import train  # noqa: E402


def _size(snapshot: Path) -> int:
    return sum(p.stat().st_size for p in snapshot.iterdir() if p.suffix == ".safetensors")


def _img_per_s(train_dir: Path) -> float:
    rates = [json.loads(line)["img_per_s"] for line in (train_dir / "log.jsonl").open()]
    return statistics.median([r for r in rates if r])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--ranks", default="4,8,16")
    args = ap.parse_args()

    g = torch.Generator().manual_seed(0)
    images = torch.rand(512, 1, args.size, args.size, generator=g) * 2 - 1
    labels = torch.arange(512) % 2
    kw = dict(
        max_steps=args.steps,
        batch_size=args.batch,
        precision=args.precision,
        checkpoint_every_steps=args.steps,
        log_every_steps=5,
        warmup_steps=5,
        progress=False,
        device="cpu",
    )
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, {args.size} px, batch {args.batch}, "
        f"{args.steps} steps, {args.precision}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = train(
            images, labels, ["x", "y"], tmp / "base", unet=UNetConfig(), unconditional=True, **kw
        )
        arms = [("scratch", {}), ("full", {"init_from": str(base), "adapter": {"kind": "full"}})]
        for r in [int(x) for x in args.ranks.split(",")]:
            lora = {"kind": "lora", "rank": r, "alpha": float(r), "targets": ["attention", "conv"]}
            arms.append((f"lora r{r}", {"init_from": str(base), "adapter": lora}))
        print(
            f"{'arm':<10} {'trainable':>10} {'img/s':>7} {'s/step':>7} {'snapshot':>10} {'load s':>7}"
        )
        for name, extra in arms:
            out = tmp / name.replace(" ", "_")
            snap = train(
                images, labels, ["normal", "pneumonia"], out, unet=UNetConfig(), **kw, **extra
            )
            t0 = time.perf_counter()
            model, _, cfg = load_snapshot(snap)
            load_s = time.perf_counter() - t0
            if name.startswith("lora"):
                unmerged, _, _ = load_snapshot(snap, merge=False)
                n_train = sum(
                    v.numel()
                    for k, v in unmerged.state_dict().items()
                    if "lora_" in k or k.startswith("class_embedding.")
                )
            else:
                n_train = sum(p.numel() for p in model.parameters())
            rate = _img_per_s(out)
            print(
                f"{name:<10} {n_train:>10,} {rate:>7.0f} {args.batch / rate:>7.3f} "
                f"{_size(snap) / 1024:>8.0f} KB {load_s:>7.2f}"
            )


if __name__ == "__main__":
    main()
