"""Latent diffusion and diffusion upscaling: recon figures, time and peak memory per image.

    python benchmarks/latent.py            # small mode: <= 3 min on 1 CPU thread
    python benchmarks/latent.py --full     # adds 1024 px decode and the 256 -> 1024 tiled step
    python benchmarks/latent.py --run RUN  # a protocols/rsna_256.yaml run: its own trained
                                           # networks, per-image time and peak memory at 256,
                                           # 1024 and 2560 px, and the real-vs-synthetic grids

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
    from medsynth.diffusion.upsampler import UpsamplerConfig, build_upsampler

    torch.manual_seed(0)
    model = build_upsampler(UpsamplerConfig(channels=[32, 64, 64])).eval()
    low = images(1, size // 4, 2)[0]
    timed = timed_upscale(
        model, ScheduleConfig(), low, steps, tile=tile, overlap=overlap, net_batch=4
    )
    return {
        "what": f"tiled x4 upscale {size // 4} -> {size} px (UNet 32-64-64, DPM++ {steps}, "
        f"tile {tile}, overlap {overlap})",
        **timed,
    }


def timed_upscale(model, sched, low, steps: int, *, factor: int = 4, **kw) -> dict:
    """One tiled x``factor`` upscale of ``low`` ``(C, h, w)``: tile count, wall and process-CPU
    seconds per image and per tile-step (``kw``: tile, overlap, sampler, net_batch)."""
    import torch

    from medsynth.diffusion.upsampler import tile_starts, upscale

    size = low.shape[-1] * factor
    tile = min(kw.get("tile", 64), size)
    n_tiles = len(tile_starts(size, tile, kw.get("overlap", 16))) ** 2
    t0 = clock()
    with torch.no_grad():
        out = upscale(model, sched, low, 0, factor=factor, steps=steps, **kw)
    wall, cpu = since(t0)
    assert out.shape[-1] == size
    return {
        "tiles": n_tiles,
        "wall_s_per_img": wall,
        "cpu_s_per_img": cpu,
        "wall_s_per_tile_step": wall / (n_tiles * steps),
        "cpu_s_per_tile_step": cpu / (n_tiles * steps),
    }


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_run_generate(run: str, n: int, out: str) -> dict:
    """``n`` images from the run's latent model with its generation settings, into ``out``."""
    from medsynth.generation.pool import generate_pool
    from medsynth.protocol import load_protocol
    from medsynth.training.checkpoint import latest_snapshot

    g = load_protocol(Path(run) / "protocol.yaml").generation
    snap = latest_snapshot(Path(run) / "train")
    rss_loaded = _rss_mib()
    t0 = clock()
    generate_pool(
        snap,
        out,
        {"0": n - n // 2, "1": n // 2},
        pool="bench",
        sampler=g.sampler,
        steps=g.steps,
        guidance_scale=g.guidance_scale,
        batch_size=g.batch_size,
        net_batch=g.net_batch,
        precision=g.precision,
        progress=False,
    )
    wall, cpu = since(t0)
    return {
        "what": f"generate 256 px DICOM ({g.sampler} {g.steps}, CFG {g.guidance_scale}, latent "
        f"UNet + decode, batch {g.batch_size}, {n} images)",
        "wall_s_per_img": wall / n,
        "cpu_s_per_img": cpu / n,
        "rss_before_mib": rss_loaded,
    }


def step_run_upscale(run: str, low_px: int, steps: int) -> dict:
    """One x4 upscale of a real test image resized to ``low_px`` with the run's upsampler.

    Content does not change the cost: the test image is resized (bicubic) to the input side.
    """
    import torch
    import torch.nn.functional as F

    from medsynth.data.datasets import load_split
    from medsynth.diffusion.upsampler import upscale
    from medsynth.protocol import load_protocol
    from medsynth.training.checkpoint import latest_snapshot
    from medsynth.training.upscaler import load_upsampler

    up = load_protocol(Path(run) / "protocol.yaml").upscaler
    model, sched, cfg = load_upsampler(latest_snapshot(Path(run) / "upscaler"))
    f = int(cfg["upsampler"]["factor"])
    x = load_split(Path(run) / "ingest", "test").images[:1].float()
    low = F.interpolate(x, size=low_px, mode="bicubic", align_corners=False).clamp(-1, 1)[0]
    kw = dict(factor=f, tile=up.tile_px, overlap=up.overlap_px, sampler=up.sampler)
    with torch.no_grad():  # warm-up (scheduler import, oneDNN kernels): one tile, one step
        side = up.tile_px // f
        upscale(model, sched, low[:, :side, :side], 0, steps=1, **kw)
    rss_loaded = _rss_mib()
    return {
        "what": f"x{f} upscale {low_px} -> {low_px * f} px (trained upsampler, {up.sampler} "
        f"{steps}, tile {up.tile_px}, overlap {up.overlap_px})",
        **timed_upscale(model, sched, low, steps, **kw),
        "rss_before_mib": rss_loaded,
    }


def _real_at(run: Path, rows: list[dict], size: int):
    """Real images of ``rows`` (index.csv rows) decoded again from their DICOMs at ``size``."""
    import numpy as np

    from medsynth.data.ingest import decode_options
    from medsynth.data.transforms import fit_to_square
    from medsynth.dicom.read import load_unit_image
    from medsynth.protocol import load_protocol

    ds = load_protocol(run / "protocol.yaml").dataset
    root = Path(ds.root)
    if not root.is_absolute():
        root = (run / root).resolve()
        if not root.exists():
            root = (ROOT / "protocols" / ds.root).resolve()
    opts = decode_options(ds)
    return [
        fit_to_square(load_unit_image(root / r["path"], opts, reduce_to=size), size)[0]
        for r in rows
    ] or [np.zeros((size, size))]


def write_grids(run: str, docs: str, per_class: int = 2) -> list[str]:
    """Real (train split) vs synthetic grids at 256 px and 1024 px, one row per class.

    The 1024 px grid shows each image shrunk to 512 px and, beside it, its central 256 px at
    native resolution (the upsampler's detail is invisible once shrunk).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from medsynth.dicom.read import load_unit_image
    from medsynth.utils.csvsafe import read_rows

    run_p = Path(run)
    rows = [r for r in read_rows(run_p / "ingest" / "index.csv") if r["split"] == "train"]
    cache = np.load(run_p / "ingest" / "images.npy", mmap_mode="r")
    classes = sorted({r["label"] for r in rows})
    written = []
    for pool, size in (("main", 256), ("main_x4", 1024)):
        man = read_rows(run_p / "generate" / pool / "manifest.csv")
        fig, axes = plt.subplots(
            len(classes),
            2 * per_class * (1 if size == 256 else 2),
            squeeze=False,
            figsize=(2.2 * 2 * per_class * (1 if size == 256 else 2), 2.4 * len(classes)),
        )
        for ax in axes.flat:
            ax.axis("off")  # a pool with fewer images than per_class leaves blanks
        for i, c in enumerate(classes):
            real_rows = [r for r in rows if r["label"] == c][:per_class]
            if size == 256:
                real = [cache[int(r["row"]), 0].astype(np.float32) for r in real_rows]
            else:
                real = _real_at(run_p, real_rows, size)
            syn = [
                load_unit_image(run_p / "generate" / pool / r["path"])[0] * 2 - 1
                for r in man
                if r["class_name"] == c
            ][:per_class]
            panels = [(x, f"real, class {c}") for x in real]
            panels += [(x, f"synthetic, class {c}") for x in syn]
            if size > 256:
                m = (size - 256) // 2
                panels = [
                    q
                    for x, t in panels
                    for q in (
                        (x[::2, ::2], f"{t}, {size} px (shown /2)"),
                        (x[m : m + 256, m : m + 256], "centre 256 px, 1:1"),
                    )
                ]
            for j, (img, title) in enumerate(panels):
                ax = axes[i, j]
                ax.imshow(img, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
                ax.set_title(title, fontsize=7)
        fig.suptitle(
            f"RSNA, real train images vs synthetic at {size} px (class 1 = lung opacity"
            + ("; synthetic = the 256 px samples upscaled x4)" if size > 256 else ")"),
            fontsize=8,
        )
        fig.tight_layout()
        path = Path(docs) / f"latent_grid_{size}.png"
        fig.savefig(path, dpi=100 if size == 256 else 110)
        plt.close(fig)
        written.append(str(path))
    return written


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
    ap.add_argument("--run", help="a protocols/rsna_256.yaml run folder (trained networks)")
    ap.add_argument("--docs", default=str(ROOT / "docs"), help="where --run writes its grids")
    args = ap.parse_args()
    import torch

    print(f"cpu, {torch.get_num_threads()} thread(s); torch {torch.__version__}")
    t0 = time.perf_counter()
    if args.run:
        run_mode(args.run, args.out, args.docs)
        print(f"total {time.perf_counter() - t0:.0f} s")
        return
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


def run_mode(run: str, out: str, docs: str) -> None:
    """Per-image time and peak RSS with the run's own networks, then the grids."""
    import shutil

    shutil.rmtree(Path(out) / "gen", ignore_errors=True)
    steps = [
        ("step_run_generate", {"run": run, "n": 10, "out": str(Path(out) / "gen")}),
        ("step_run_upscale", {"run": run, "low_px": 64, "steps": 10}),
        ("step_run_upscale", {"run": run, "low_px": 256, "steps": 10}),
        # 2560 px at 2 steps: memory does not depend on the step count, time is linear in it.
        ("step_run_upscale", {"run": run, "low_px": 640, "steps": 2}),
    ]
    for fn, kwargs in steps:
        r = _child(fn, kwargs)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))
        sys.stdout.flush()
    for path in write_grids(run, docs):
        print(f"grid {path}")


if __name__ == "__main__":
    main()
