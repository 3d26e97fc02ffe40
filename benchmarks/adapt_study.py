"""A small adaptation study: scratch vs full fine-tune vs LoRA at (about) equal training time.

Trains three generators on the same low-data target (an ingest cache, e.g. PneumoniaMNIST at a
5 % patient-level train fraction): from scratch, full fine-tuning of a base snapshot, and LoRA on
that base. Step counts are set from the per-step speeds of benchmarks/adapt.py so that the arms
get about the same wall time; the measured seconds are printed. Then, for each arm, ``--n``
samples (DPM-Solver++-20, guidance 2, balanced classes) are compared with the real test split in
the features of a small CNN trained on the real train split (FD_clf, precision/recall), with the
MS-SSIM ratio to real train images, and audited for memorization against the target's training
images (threshold from real val <-> train nearest neighbours, quantile 0.99).

    OMP_NUM_THREADS=1 python benchmarks/adapt_study.py --base RUN/train/snapshot-XXXXXXX \\
        --ingest RUN/ingest --fraction 0.05 [--steps 150,150,200] [--n 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medsynth.data.datasets import load_split  # noqa: E402
from medsynth.diffusion.sampler import sample  # noqa: E402
from medsynth.diffusion.unet import UNetConfig  # noqa: E402
from medsynth.evaluation.classifier import Classifier, ClassifierConfig  # noqa: E402
from medsynth.evaluation.fidelity import fd, msssim_ratio, prdc  # noqa: E402
from medsynth.evaluation.memorization import audit  # noqa: E402
from medsynth.training.checkpoint import load_snapshot  # noqa: E402
from medsynth.training.loop import train  # noqa: E402
from medsynth.training.provenance import check_no_leak  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, type=Path)
    ap.add_argument("--ingest", required=True, type=Path)
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--steps", default="150,150,200", help="scratch,full,lora optimizer steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    base_cfg = json.loads((args.base / "config.json").read_text())
    print(
        f"leak check: {check_no_leak(base_cfg, args.base, args.ingest)} held-out images, none seen"
    )
    tr = load_split(args.ingest, "train", args.fraction)
    full_train, val, test = (load_split(args.ingest, s) for s in ("train", "val", "test"))
    unet = UNetConfig(**{k: v for k, v in base_cfg["unet"].items() if k != "num_classes"})
    s_scratch, s_full, s_lora = (int(x) for x in args.steps.split(","))
    lora = {
        "kind": "lora",
        "rank": args.rank,
        "alpha": float(args.rank),
        "targets": ["attention", "conv"],
    }
    arms = [
        ("scratch", s_scratch, {}),
        ("full fine-tune", s_full, {"init_from": str(args.base), "adapter": {"kind": "full"}}),
        (f"LoRA r{args.rank}", s_lora, {"init_from": str(args.base), "adapter": lora}),
    ]
    kw = dict(
        batch_size=args.batch,
        lr=1e-3,
        warmup_steps=20,
        ema_halflife_steps=30,
        precision="bf16",
        augment_shift_px=1,
        progress=False,
        device="cpu",
    )

    t0 = time.perf_counter()
    clf = Classifier(len(tr.classes), 1, ClassifierConfig(epochs=5), seed=0)
    clf.fit(full_train.images, full_train.labels, val.images, val.labels)
    real_test, real_train = clf.features(test.images), clf.features(tr.images)
    real_val = clf.features(val.images)
    print(
        f"feature CNN on {len(full_train.images)} real train images: {time.perf_counter() - t0:.0f} s"
    )
    print(f"target: {len(tr.images)} train images ({args.fraction:g}), classes {tr.classes}")
    k = len(tr.classes)
    labels = [i % k for i in range(args.n)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, steps, extra in arms:
            t0 = time.perf_counter()
            snap = train(
                tr.images,
                tr.labels,
                tr.classes,
                Path(tmp) / name.replace(" ", "_"),
                unet=UNetConfig(**unet.to_dict()),
                max_steps=steps,
                checkpoint_every_steps=steps,
                **kw,
                **extra,
            )
            seconds = time.perf_counter() - t0
            model, sched, _ = load_snapshot(snap)
            imgs = sample(
                model,
                sched,
                labels,
                list(range(args.n)),
                image_shape=tuple(tr.images.shape[1:]),
                null_label=k,
                sampler="dpmpp",
                steps=20,
                guidance_scale=2.0,
            )
            feats = clf.features(imgs)
            pr = prdc(real_test, feats)
            memo = audit(
                imgs.numpy(), tr.images.numpy(), val.images.numpy(), feats, real_train, real_val
            )
            row = {
                "arm": name,
                "steps": steps,
                "train_s": round(seconds, 1),
                "FD_clf": fd(real_test, feats),
                "precision": pr["precision"],
                "recall": pr["recall"],
                "msssim_ratio": msssim_ratio(imgs, tr.images),
                "memorized": memo["share_flagged"],
                "mean_intensity": float((imgs.mean() + 1) / 2),
            }
            rows.append(row)
            print(
                {k_: round(v, 3) if isinstance(v, float) else v for k_, v in row.items()},
                flush=True,
            )
    ref = {
        "FD_clf real train->test": fd(real_test, real_train),
        "real mean intensity": float((tr.images.mean() + 1) / 2),
    }
    print(ref)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "reference": ref}, indent=2))


if __name__ == "__main__":
    main()
