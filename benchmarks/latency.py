"""Single-sample latency and network seconds per image, per sampler, model loaded once.

    python benchmarks/latency.py                       # small mode, <= 3 min on 2 cores
    python benchmarks/latency.py --full                # >= 100 requests for every sampler
    python benchmarks/latency.py --snapshot RUN/train/snapshot-X --student RUN/distill/snapshot-Y

Latency: one request = one image of one class (``sample`` with ``net_batch=1``), guidance 2,
timed from call to returned tensor; p50 and p99 over ``--requests`` requests after 3 warm-up
requests. Network seconds per image: one batch of ``--batch``
images (8 small, 32 full; ``net_batch`` = min(16, batch)) divided by its size, and the ratio
of DDPM-1000's figure to each sampler's. Small mode leaves out DPM-Solver++-20 and *estimates* DDPM-1000 as
100x DPM-Solver++-10 (the same guided network calls, 100x as many; scheduler arithmetic aside);
``--full`` measures it (about 10 s per request on an idle 2-core CPU). Without snapshots the default 28 px architecture
(channels 32-64-64, 1.11 M parameters) runs with random weights: latency does not depend on
the weights, and a distilled student has its teacher's architecture. Quality (FD_clf) is not
measured here (see docs/benchmarks.md for what is and is not measured).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medsynth.diffusion.consistency import ConsistencyConfig  # noqa: E402
from medsynth.diffusion.sampler import sample  # noqa: E402
from medsynth.diffusion.schedule import ScheduleConfig  # noqa: E402
from medsynth.diffusion.unet import UNetConfig, build_unet, count_parameters  # noqa: E402
from medsynth.training.checkpoint import load_snapshot  # noqa: E402

# (name, sampler, steps): the distilled student at 1/2/4 steps, the default and the baseline.
SAMPLERS = [
    ("distilled-1", "distilled", 1),
    ("distilled-2", "distilled", 2),
    ("distilled-4", "distilled", 4),
    ("dpmpp-10", "dpmpp", 10),
    ("dpmpp-20", "dpmpp", 20),
    ("ddpm-1000", "ddpm", 1000),
]


def _models(args):
    if args.snapshot:
        teacher, sched, cfg = load_snapshot(args.snapshot)
    else:
        torch.manual_seed(0)
        teacher, sched = build_unet(UNetConfig(num_classes=2)), ScheduleConfig()
        with torch.no_grad():  # a fresh MONAI UNet outputs exactly zero; perturb it
            for p in teacher.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        cfg = {"classes": ["a", "b"], "image_shape": [1, 28, 28]}
    if args.student:
        student, _, scfg = load_snapshot(args.student)
        distilled = scfg["distill"]
    else:
        student, distilled = teacher, ConsistencyConfig().to_dict()
    return teacher.eval(), student.eval(), sched, cfg, distilled


def _call(models, name, sampler, steps, labels, seeds, net_batch):
    teacher, student, sched, cfg, distilled = models
    is_d = sampler == "distilled"
    return sample(
        student if is_d else teacher,
        sched,
        labels,
        seeds,
        image_shape=tuple(cfg["image_shape"]),
        null_label=len(cfg["classes"]),
        sampler=sampler,
        steps=steps,
        guidance_scale=distilled["guidance_scale"] if is_d else 2.0,
        distilled=distilled if is_d else None,
        net_batch=net_batch,
    )


def latency(models, name, sampler, steps, requests: int) -> dict:
    for s in range(3):  # warm-up: allocator, kernels, schedulers
        _call(models, name, sampler, steps, [s % 2], [10_000 + s], 1)
    times = []
    for r in range(requests):
        t0 = time.perf_counter()
        _call(models, name, sampler, steps, [r % 2], [r], 1)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return {"n": requests, "p50": np.percentile(ms, 50), "p99": np.percentile(ms, 99)}


def per_image(models, name, sampler, steps, batch: int) -> float:
    labels, seeds = [i % 2 for i in range(batch)], list(range(batch))
    t0 = time.perf_counter()
    _call(models, name, sampler, steps, labels, seeds, min(16, batch))
    return (time.perf_counter() - t0) / batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help=">= 100 requests for every sampler")
    ap.add_argument("--requests", type=int, default=100, help="latency requests per sampler")
    ap.add_argument("--ddpm-requests", type=int, default=None, help="full mode; default requests")
    ap.add_argument("--batch", type=int, default=None, help="images per batch (8 small, 32 full)")
    ap.add_argument("--snapshot", type=Path, help="teacher snapshot (default: random weights)")
    ap.add_argument("--student", type=Path, help="distilled snapshot (default: the teacher)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ddpm_req = args.ddpm_requests or args.requests
    batch = args.batch or (32 if args.full else 8)
    models = _models(args)
    shape = models[3]["image_shape"]
    print(
        f"cpu, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"{shape[-1]} px, {count_parameters(models[0]) / 1e6:.2f} M parameters; "
        f"{'full' if args.full else 'small'} mode; guidance {models[4]['guidance_scale']:g} "
        f"(distilled: in the weights, one pass per step; others: two passes per step)"
    )
    t_start = time.perf_counter()
    rows = []
    for name, sampler, steps in SAMPLERS:
        if name in ("dpmpp-20", "ddpm-1000") and not args.full:
            continue  # small mode: the 3-minute budget (DDPM-1000 is estimated below)
        n_req = ddpm_req if sampler == "ddpm" else args.requests
        lat = latency(models, name, sampler, steps, n_req)
        rows.append((name, lat, per_image(models, name, sampler, steps, batch), batch))
        print(
            f"  {name}: p50 {lat['p50']:.1f} / p99 {lat['p99']:.1f} ms over {n_req} requests; "
            f"{rows[-1][2] * 1e3:.2f} ms per image in a batch of {batch}",
            flush=True,
        )
    if not args.full:
        # Same network calls of the same batch as DPM-Solver++-10, 100x as many: an estimate.
        name, lat, s_img, b = next(r for r in rows if r[0] == "dpmpp-10")
        est = {"n": "est.", "p50": 100 * lat["p50"], "p99": 100 * lat["p99"]}
        rows.append(("ddpm-1000 (estimated: 100× dpmpp-10)", est, 100 * s_img, b))
    ddpm = rows[-1][2]
    print(
        "\n| sampler | latency p50 / p99 (ms) | requests | network s / image | DDPM-1000 ÷ this |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, lat, s_img, b in rows:
        print(
            f"| {name} | {lat['p50']:.1f} / {lat['p99']:.1f} | {lat['n']} | "
            f"{s_img * 1e3:.2f} ms (batch {b}) | {ddpm / s_img:.0f}× |"
        )
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
