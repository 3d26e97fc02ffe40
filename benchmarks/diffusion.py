"""Diffusion speed and quality, in one run, on whatever device is present (CUDA if available).

Prints: the matmul ceiling (fp32, bf16); training img/s of the default 28 px model against that
ceiling (fwd+bwd FLOPs from torch.utils.flop_counter), fp32 vs bf16; per-image sampling time
for DDPM-1000, DDIM-50/20, DPM-Solver++-20/10 with guidance 2; single-sample latency; and, given
a trained snapshot and its ingest cache, a quality-vs-steps table: FD_clf (Fréchet distance in
the features of a small CNN trained on the real train split) of each sampler's images to the
real test images, overall and per class (synthetic of class c against real test images of
class c, with the collapse flag of medsynth.evaluation.per_class).

    python benchmarks/diffusion.py [--snapshot RUN/train/snapshot-XXXXXXX --ingest RUN/ingest]
                                   [--quality-n 128] [--json out.json]
    # small quality-only mode (a few minutes on 2 CPU cores), e.g. to compare guidance knobs:
    python benchmarks/diffusion.py --only-quality --snapshot S --ingest I --quality-n 64 \
        --samplers dpmpp:10 --clf-epochs 2 --guidance-rescale 0.7 --guidance-interval 0.2 0.8
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medsynth.diffusion.objective import diffusion_loss, draw  # noqa: E402
from medsynth.diffusion.sampler import sample  # noqa: E402
from medsynth.diffusion.schedule import ScheduleConfig, training_scheduler  # noqa: E402
from medsynth.diffusion.unet import UNetConfig, build_unet, count_parameters  # noqa: E402

SAMPLERS = [("ddpm", 1000), ("ddim", 50), ("ddim", 20), ("dpmpp", 20), ("dpmpp", 10)]


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, min_seconds: float = 2.0, warmup: int = 2) -> float:
    """Seconds per call, averaged over at least ``min_seconds``."""
    for _ in range(warmup):
        fn()
    sync(dev)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        sync(dev)
        if time.perf_counter() - t0 >= min_seconds:
            return (time.perf_counter() - t0) / n


def matmul_ceiling(dev: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if dev.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, dev)


def training_throughput(dev, bf16: bool, batch: int, size: int = 28) -> tuple[float, float]:
    """(img/s, fwd+bwd FLOPs per image) of the default model on random data."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    cfg = ScheduleConfig()
    model = build_unet(UNetConfig()).to(dev)
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    sched = training_scheduler(cfg)
    x = torch.randn(batch, 1, size, size, device=dev)
    y = torch.randint(0, 2, (batch,), device=dev)
    g = torch.Generator().manual_seed(0)

    def step():
        d = draw(tuple(x.shape), cfg.num_train_timesteps, 0.15, g)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion_loss(model, sched, cfg, x, y, d, null_label=2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops() / batch
    return batch / timed(step, dev, 4.0), flops


def sampling_times(model, cfg, dev, batch: int, bf16: bool) -> list[dict]:
    out = []
    for name, steps in SAMPLERS:
        labels, seeds = [i % 2 for i in range(batch)], list(range(batch))

        def run(name=name, steps=steps, labels=labels, seeds=seeds):
            sample(
                model,
                cfg,
                labels,
                seeds,
                image_shape=(1, 28, 28),
                null_label=2,
                sampler=name,
                steps=steps,
                guidance_scale=2.0,
                device=dev,
                bf16=bf16,
                net_batch=batch,
            )

        per_batch = timed(run, dev, min_seconds=1.0, warmup=1)
        out.append({"sampler": f"{name}-{steps}", "s_per_image": per_batch / batch})
    return out


def latency(model, cfg, dev, name: str, steps: int, bf16: bool) -> float:
    def run():
        sample(
            model,
            cfg,
            [1],
            [0],
            image_shape=(1, 28, 28),
            null_label=2,
            sampler=name,
            steps=steps,
            guidance_scale=2.0,
            device=dev,
            bf16=bf16,
            net_batch=1,
        )

    return timed(run, dev, min_seconds=2.0)


def quality_table(
    snapshot: Path,
    ingest: Path,
    dev,
    n: int,
    bf16: bool,
    samplers=SAMPLERS,
    clf_epochs: int = 8,
    guidance: dict | None = None,
) -> list[dict]:
    """FD_clf of each sampler's images to the real test split, same seeds for every sampler,
    overall and per class (``per_class``: class -> metrics with ``collapsed``).

    ``guidance``: ``guidance_scale`` (default 2), ``guidance_rescale``, ``guidance_interval``.
    """
    from medsynth.data.datasets import load_split
    from medsynth.evaluation.classifier import Classifier, ClassifierConfig
    from medsynth.evaluation.fidelity import fd
    from medsynth.evaluation.per_class import per_class_lines
    from medsynth.training.checkpoint import load_snapshot

    guidance = {"guidance_scale": 2.0} | (guidance or {})
    model, cfg, conf = load_snapshot(snapshot, dev)
    classes = conf["classes"]
    k = len(classes)
    train, val, test = (load_split(ingest, s) for s in ("train", "val", "test"))
    clf = Classifier(k, 1, ClassifierConfig(epochs=clf_epochs, device=str(dev)), seed=0)
    clf.fit(train.images, train.labels, val.images, val.labels)
    real_feats = clf.features(test.images)
    ref_idx = torch.randperm(len(train.images), generator=torch.Generator().manual_seed(0))[:n]
    ref_train = clf.features(train.images[ref_idx])
    rows = [
        {
            "sampler": "real train (reference)",
            "FD_clf": fd(real_feats, ref_train),
            "s_per_image": None,
            "per_class": _per_class(
                real_feats, ref_train, test, train.images[ref_idx], train.labels[ref_idx], classes
            ),
        }
    ]
    print(f"  quality {_headline(rows[-1])}", flush=True)
    for line in per_class_lines(rows[-1]["per_class"], classes, indent="    "):
        print(line)
    labels = [i % k for i in range(n)]
    for name, steps in samplers:
        t0 = time.perf_counter()
        imgs = sample(
            model,
            cfg,
            labels,
            list(range(n)),
            image_shape=tuple(conf["image_shape"]),
            null_label=k,
            sampler=name,
            steps=steps,
            device=dev,
            bf16=bf16,
            net_batch=min(n, 256),
            **guidance,
        ).cpu()
        sync(dev)
        dt = (time.perf_counter() - t0) / n
        feats = clf.features(imgs)
        rows.append(
            {
                "sampler": f"{name}-{steps}",
                "FD_clf": fd(real_feats, feats),
                "mean_intensity": float((imgs.mean() + 1) / 2),
                "s_per_image": dt,
                "per_class": _per_class(
                    real_feats, feats, test, imgs, torch.tensor(labels), classes
                ),
            }
        )
        print(f"  quality {_headline(rows[-1])}", flush=True)
        for line in per_class_lines(rows[-1]["per_class"], classes, indent="    "):
            print(line)
    rows.append(
        {
            "sampler": "real test mean intensity",
            "mean_intensity": float((test.images.mean() + 1) / 2),
        }
    )
    return rows


def _per_class(real_feats, feats, test, imgs, labels, classes) -> dict:
    """Class -> per-class metrics of ``imgs`` (labels ``labels``) against real test images."""
    from medsynth.evaluation.per_class import class_metrics, flag_collapsed

    per = {}
    for c, name in enumerate(classes):
        r, f = (test.labels == c).numpy(), (labels == c).numpy()
        per[name] = class_metrics(real_feats[r], feats[f], test.images[r], imgs[f])
    return flag_collapsed(per, classes)


def _headline(row: dict) -> str:
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in row.items()
        if k != "per_class" and v is not None
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--snapshot", type=Path)
    ap.add_argument("--ingest", type=Path)
    ap.add_argument(
        "--quality-n", type=int, default=None, help="images per sampler (default 128 CPU, 1000 GPU)"
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only-quality", action="store_true", help="skip the speed sections")
    ap.add_argument(
        "--samplers",
        nargs="+",
        default=None,
        help="quality samplers as name:steps (default: "
        + " ".join(f"{a}:{b}" for a, b in SAMPLERS)
        + ")",
    )
    ap.add_argument("--clf-epochs", type=int, default=8, help="feature classifier epochs")
    ap.add_argument("--guidance-scale", type=float, default=2.0)
    ap.add_argument("--guidance-rescale", type=float, default=0.0)
    ap.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0))
    args = ap.parse_args()
    samplers = (
        [(s.split(":")[0], int(s.split(":")[1])) for s in args.samplers]
        if args.samplers
        else SAMPLERS
    )
    qkw = dict(
        samplers=samplers,
        clf_epochs=args.clf_epochs,
        guidance={
            "guidance_scale": args.guidance_scale,
            "guidance_rescale": args.guidance_rescale,
            "guidance_interval": tuple(args.guidance_interval),
        },
    )
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = dev.type == "cuda"
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    bf16_ok = on_gpu or "avx512_bf16" in cpuinfo or "amx_bf16" in cpuinfo
    res: dict = {
        "device": torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(f"device: {res['device']}  torch {torch.__version__}  threads {res['threads']}")

    if args.only_quality:
        res["quality"] = quality_table(
            args.snapshot,
            args.ingest,
            dev,
            args.quality_n or (1000 if on_gpu else 128),
            False,
            **qkw,
        )
        if args.json:
            args.json.write_text(json.dumps(res, indent=2))
        return
    res["ceiling_fp32_tflops"] = matmul_ceiling(dev, torch.float32) / 1e12
    res["ceiling_bf16_tflops"] = matmul_ceiling(dev, torch.bfloat16) / 1e12
    print(
        f"matmul ceiling: fp32 {res['ceiling_fp32_tflops']:.2f} TFLOP/s, bf16 {res['ceiling_bf16_tflops']:.2f}"
    )

    batch = 256 if on_gpu else 64
    m = build_unet(UNetConfig())
    print(
        f"model: UNet {UNetConfig().channels}, {count_parameters(m) / 1e6:.2f} M parameters, 28 px, batch {batch}"
    )
    for prec in ("fp32", "bf16") if bf16_ok else ("fp32",):
        ips, flops = training_throughput(dev, prec == "bf16", batch)
        ceiling = res[f"ceiling_{prec}_tflops"] * 1e12
        res[f"train_{prec}_img_per_s"], res["train_gflop_per_img"] = ips, flops / 1e9
        res[f"train_{prec}_share_of_ceiling"] = ips * flops / ceiling
        print(
            f"training {prec}: {ips:.0f} img/s, {flops / 1e9:.3f} GFLOP/img fwd+bwd, "
            f"{ips * flops / 1e12:.3f} TFLOP/s = {100 * ips * flops / ceiling:.1f} % of the {prec} ceiling"
        )
    if bf16_ok:
        res["train_bf16_speedup"] = res["train_bf16_img_per_s"] / res["train_fp32_img_per_s"]
        print(f"bf16 / fp32 training speed: {res['train_bf16_speedup']:.2f}x")

    torch.manual_seed(0)
    model = build_unet(UNetConfig()).to(dev).eval()
    with torch.no_grad():  # a fresh UNet outputs zeros; perturb so timing covers real work
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    cfg = ScheduleConfig()
    sbatch = 256 if on_gpu else 32
    res["sampling"] = sampling_times(model, cfg, dev, sbatch, bf16=False)
    base = res["sampling"][0]["s_per_image"]
    print(f"sampling (guidance 2, batch {sbatch}, fp32), per image:")
    for r in res["sampling"]:
        r["speedup_vs_ddpm1000"] = base / r["s_per_image"]
        print(
            f"  {r['sampler']:<12}{1000 * r['s_per_image']:>10.2f} ms   {r['speedup_vs_ddpm1000']:>7.1f}x"
        )
    for name, steps in (("dpmpp", 10), ("dpmpp", 20)):
        lat = latency(model, cfg, dev, name, steps, bf16=False)
        res[f"latency_{name}{steps}_ms"] = 1000 * lat
        print(f"single-sample latency {name}-{steps}, guidance 2, fp32: {1000 * lat:.1f} ms")

    if args.snapshot and args.ingest:
        n = args.quality_n or (1000 if on_gpu else 128)
        print(f"quality vs steps: {n} images per sampler, FD_clf to the real test split")
        res["quality"] = quality_table(args.snapshot, args.ingest, dev, n, bf16=False, **qkw)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
