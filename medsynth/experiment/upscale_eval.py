"""Does the diffusion upsampler beat bicubic? Measured on held-out real images of the run.

Test-split images at the ingest size are area-downsampled by the upsampler's factor, then
brought back by bicubic interpolation and by the upsampler (tiled, as generation uses it), and
compared with the originals: PSNR and SSIM per image, and ``FD_clf`` of each upscaled set
against the originals, in the feature space of a classifier trained on the real train split
(the same kind of extractor the study uses; never called FID). Written to
``RUN/upscaler/compare.json``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from medsynth.data.datasets import load_split
from medsynth.diffusion.autoencoder import psnr, ssim
from medsynth.diffusion.upsampler import downsample, upsample_bicubic, upscale
from medsynth.evaluation.classifier import Classifier, ClassifierConfig
from medsynth.evaluation.fidelity import fd
from medsynth.training.checkpoint import latest_snapshot
from medsynth.training.upscaler import load_upsampler


def compare_upscaler(run: str | Path, protocol, *, max_images: int = 32) -> dict:
    """PSNR/SSIM/FD_clf of upsampler vs bicubic on up to ``max_images`` test images."""
    run = Path(run)
    up = protocol.upscaler
    snap = latest_snapshot(run / "upscaler")
    model, sched, cfg = load_upsampler(snap)
    f = int(cfg["upsampler"]["factor"])
    test = load_split(run / "ingest", "test")
    real = test.images[:max_images]
    if len(real) == 0:
        return {"images": 0, "reason": "the test split is empty"}
    low = downsample(real, f)
    bicubic = upsample_bicubic(low, f)
    t0 = time.perf_counter()
    sr = torch.stack(
        [
            upscale(
                model,
                sched,
                x,
                seed=k,
                factor=f,
                tile=up.tile_px,
                overlap=up.overlap_px,
                sampler=up.sampler,
                steps=up.steps,
            )
            for k, x in enumerate(low)
        ]
    )
    seconds = (time.perf_counter() - t0) / len(real)
    ev = protocol.evaluation.classifier
    train = load_split(
        run / "ingest", "train", protocol.dataset.train_fraction, protocol.dataset.fraction_seed
    )
    val = load_split(run / "ingest", "val")
    clf = Classifier(
        len(train.classes),
        int(train.images.shape[1]),
        ClassifierConfig(kind=ev.kind, width=ev.width, epochs=ev.epochs, batch_size=ev.batch_size),
    ).fit(train.images, train.labels, val.images, val.labels)
    ref = clf.features(real)
    out = {
        "images": len(real),
        "split": "test",
        "factor": f,
        "low_px": int(low.shape[-1]),
        "high_px": int(real.shape[-1]),
        "upsampler_snapshot": snap.name,
        "sampler": up.sampler,
        "steps": up.steps,
        "tile_px": up.tile_px,
        "overlap_px": up.overlap_px,
        "upsampler_seconds_per_image": seconds,
        "feature_extractor": f"FD_clf: {ev.kind} trained on the real train split",
    }
    for name, imgs in (("bicubic", bicubic), ("upsampler", sr)):
        out[name] = {
            "psnr_db": float(psnr(imgs, real).mean()),
            "ssim": float(ssim(imgs, real).mean()),
            "fd_clf": fd(ref, clf.features(imgs)),
        }
    (run / "upscaler" / "compare.json").write_text(json.dumps(out, indent=2))
    return out


def compare_line(c: dict) -> str:
    """One sentence for the log and the report."""
    if not c.get("images"):
        return f"upsampler vs bicubic: not measured ({c.get('reason', 'no images')})"
    b, s = c["bicubic"], c["upsampler"]
    return (
        f"x{c['factor']} ({c['low_px']} -> {c['high_px']} px) on {c['images']} test images: "
        f"upsampler PSNR {s['psnr_db']:.2f} dB / SSIM {s['ssim']:.3f} / FD_clf {s['fd_clf']:.3g} "
        f"vs bicubic {b['psnr_db']:.2f} dB / {b['ssim']:.3f} / {b['fd_clf']:.3g}"
    )
