"""Latent diffusion and diffusion upscaling: recon figures, time and peak memory per image.

    python benchmarks/latent.py            # small mode: <= 3 min on 1 CPU thread
    python benchmarks/latent.py --full     # adds 1024 px decode and the 256 -> 1024 tiled step

Data: smooth random "phantom" images (blobs + texture) in [-1, 1], seeded; no real data needed
(the RSNA figures come from protocols/rsna_256.yaml, see docs/benchmarks.md). Each measurement
runs in a fresh subprocess so its peak RSS (``ru_maxrss``) belongs to that step alone.

Prints, per step: autoencoder training speed and reconstruction PSNR/SSIM on held-out images,
latent sampling (DPM-Solver++) + decode time per image, tiled x4 upscaling time per image and
per tile-step, and the tile counts the 1024 and 2560 px steps would need (marked projected).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def clock() -> tuple[float, float]:
    """(wall, process CPU) seconds: on a shared machine CPU time is the comparable figure."""
    return time.perf_counter(), time.process_time()


def since(t: tuple[float, float]) -> tuple[float, float]:
    now = clock()
    return now[0] - t[0], now[1] - t[1]


def images(n: int, size: int, seed: int = 0):
    """``(n, 1, size, size)`` smooth blobs plus fine texture in [-1, 1]."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 1, 6, 6, generator=g)
    x = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)
    fine = F.interpolate(torch.rand(n, 1, size // 4, size // 4, generator=g), size=size)
    return (0.8 * x + 0.2 * fine).clamp(0, 1) * 2 - 1


def step_autoencoder(size: int, steps: int, out: str) -> dict:
    import torch

    from medsynth.diffusion.autoencoder import AutoencoderConfig
    from medsynth.training.autoencoder import reconstruction_metrics, train_autoencoder

    train, held = images(32, size, 0), images(8, size, 1)
    t0 = clock()
    snap = train_autoencoder(
        train,
        out,
        config=AutoencoderConfig(channels=[16, 32, 32], latent_channels=4),
        max_steps=steps,
        batch_size=4,
        lr=2e-3,
        warmup_steps=5,
        checkpoint_every_steps=steps,
        progress=False,
        device="cpu",
    )
    wall, cpu = since(t0)
    m = reconstruction_metrics(snap, held)
    bic = torch.nn.functional.interpolate(
        torch.nn.functional.avg_pool2d(held, 4), scale_factor=4, mode="bicubic"
    ).clamp(-1, 1)
    from medsynth.diffusion.autoencoder import psnr

    return {
        "what": f"autoencoder {size} px (f=4, 4 latent ch), {steps} steps x 4 img",
        "train_wall_s_per_img": wall / (steps * 4),
        "train_cpu_s_per_img": cpu / (steps * 4),
        "recon_psnr_db": m["psnr_db_mean"],
        "recon_ssim": m["ssim_mean"],
        "ref_bicubic_x4_psnr_db": float(psnr(bic, held).mean()),
        "snapshot": str(snap),
    }


def step_latent_sample(size: int, n: int) -> dict:
    import torch

    from medsynth.diffusion.autoencoder import AutoencoderConfig, build_autoencoder
    from medsynth.diffusion.sampler import sample
    from medsynth.diffusion.schedule import ScheduleConfig
    from medsynth.diffusion.unet import UNetConfig, build_unet

    torch.manual_seed(0)
    ae = build_autoencoder(AutoencoderConfig(channels=[16, 32, 32], latent_channels=4)).eval()
    lat = size // 4
    unet = build_unet(
        UNetConfig(
            num_classes=2,
            in_channels=4,
            channels=[32, 64, 64],
            attention_levels=[False, False, True],
        )
    ).eval()
    t0 = clock()
    z = sample(
        unet,
        ScheduleConfig(),
        [0] * n,
        list(range(n)),
        image_shape=(4, lat, lat),
        null_label=2,
        steps=10,
        guidance_scale=2.0,
        net_batch=n,
        clip=False,
    )
    ts = since(t0)
    t1 = clock()
    with torch.no_grad():
        for k in range(n):
            ae.decode(z[k : k + 1])
    td = since(t1)
    return {
        "what": f"latent sample {lat}x{lat}x4 (UNet 32-64-64, DPM++ 10, CFG 2) + decode to {size} px",
        "sample_wall_s_per_img": ts[0] / n,
        "sample_cpu_s_per_img": ts[1] / n,
        "decode_wall_s_per_img": td[0] / n,
        "decode_cpu_s_per_img": td[1] / n,
    }


def step_upscale(size: int, tile: int, overlap: int, steps: int) -> dict:
    import torch

    from medsynth.diffusion.schedule import ScheduleConfig
    from medsynth.diffusion.upsampler import UpsamplerConfig, build_upsampler, tile_starts, upscale

    torch.manual_seed(0)
    model = build_upsampler(UpsamplerConfig(channels=[32, 64, 64])).eval()
    low = images(1, size // 4, 2)[0]
    n_tiles = len(tile_starts(size, min(tile, size), overlap)) ** 2
    t0 = clock()
    out = upscale(
        model, ScheduleConfig(), low, 0, tile=tile, overlap=overlap, steps=steps, net_batch=4
    )
    wall, cpu = since(t0)
    assert out.shape[-1] == size
    return {
        "what": f"tiled x4 upscale {size // 4} -> {size} px (UNet 32-64-64, DPM++ {steps}, "
        f"tile {tile}, overlap {overlap})",
        "tiles": n_tiles,
        "wall_s_per_img": wall,
        "cpu_s_per_img": cpu,
        "cpu_s_per_tile_step": cpu / (n_tiles * steps),
    }


def _child(fn: str, kwargs: dict) -> dict:
    """Run ``fn(**kwargs)`` in a fresh interpreter; add its own peak RSS (MiB)."""
    code = (
        f"import json, resource, sys; sys.path.insert(0, {str(ROOT)!r}); "
        f"import benchmarks.latent as b; r = b.{fn}(**json.loads(sys.argv[1])); "
        "r['peak_rss_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; "
        "print(json.dumps(r))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, check=True
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="also 1024 px decode and 256->1024")
    ap.add_argument("--ae-steps", type=int, default=30)
    ap.add_argument("--out", default="/tmp/medsynth-bench-latent")
    args = ap.parse_args()
    import torch

    print(f"cpu, {torch.get_num_threads()} thread(s); torch {torch.__version__}")
    t0 = time.perf_counter()
    steps = [("step_autoencoder", {"size": 64, "steps": args.ae_steps, "out": args.out})]
    steps += [
        ("step_latent_sample", {"size": size, "n": 1})
        for size in (64, 256) + ((1024,) if args.full else ())
    ]
    steps.append(("step_upscale", {"size": 256, "tile": 64, "overlap": 16, "steps": 2}))
    if args.full:
        steps.append(("step_upscale", {"size": 1024, "tile": 128, "overlap": 32, "steps": 10}))
    rows = []
    for fn, kwargs in steps:
        # Printed as each step ends: on a shared machine a long run may not reach the end.
        rows.append(_child(fn, kwargs))
        r = rows[-1]
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))
        sys.stdout.flush()
    up = next(r for r in rows if r["what"].startswith("tiled"))
    for size, tile, overlap in ((1024, 64, 16), (2560, 64, 16)):
        from medsynth.diffusion.upsampler import tile_starts

        n = len(tile_starts(size, tile, overlap)) ** 2
        print(
            f"projected (not measured): {size // 4} -> {size} px with tile {tile}/{overlap}: "
            f"{n} tiles, ~{n * 10 * up['cpu_s_per_tile_step']:.0f} CPU s per image at DPM++ 10 "
            "(1 thread); network memory stays that of 4 tiles, the blend buffers are 2 x H x W float32 "
            f"({2 * size * size * 4 / 2**20:.0f} MiB)"
        )
    print(
        f"total {time.perf_counter() - t0:.0f} s; peak RSS of this parent "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
