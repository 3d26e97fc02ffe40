"""Measure a sweep protocol's ``sweep.seconds_per_*`` constants on this machine, then re-estimate.

    python benchmarks/sweep_constants.py PROTOCOL [--train-steps 6] [--images 32]
                                         [--fit-images 200] [--epochs 2] [--n-val N]

``--dry-run`` multiplies the plan by three constants; a protocol written for another image size,
model or classifier needs its own. This measures, with the protocol's model, image size,
channels, precision and classifier, on random data of that shape (speed does not depend on the
pixels): one diffusion training step at ``training.batch_size``; one network call per image
(``generation.batch_size`` rows, DDIM with guidance 2 = two calls per step); one classifier
epoch per training image, with the per-epoch validation pass over ``--n-val`` images (the
protocol's validation split size; default 0.15 x patients x 1.25 for phantoms) spread over the
training images, as a study runs it. Prints the three figures, the protocol's values and the
sweep estimate under each. Run with ``OMP_NUM_THREADS=1`` on a shared machine; small figures
(a few steps) are noisy: treat them as ±30 %.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medsynth.diffusion.objective import diffusion_loss, draw  # noqa: E402
from medsynth.diffusion.sampler import sample  # noqa: E402
from medsynth.diffusion.schedule import training_scheduler  # noqa: E402
from medsynth.diffusion.unet import build_unet  # noqa: E402
from medsynth.evaluation.classifier import ClassifierConfig  # noqa: E402
from medsynth.evaluation.grouped import fit_seeds  # noqa: E402
from medsynth.experiment.sweep import _dur, estimate, expand  # noqa: E402
from medsynth.protocol import load_protocol  # noqa: E402
from medsynth.training.api import schedule_config, unet_config  # noqa: E402


def _val(v) -> str:
    return str(getattr(v, "value", v))  # enums may be stored as their values


def _shape(proto) -> tuple[int, int, int]:
    ds = proto.dataset
    return (3 if _val(ds.color) == "rgb" else 1, ds.spatial_size, ds.spatial_size)


def _classes(proto) -> int:
    ds = proto.dataset
    if _val(ds.kind) == "phantoms":
        return ds.phantoms.num_classes
    return len(ds.classes or [0, 1])


def train_step_seconds(proto, steps: int) -> float:
    """Seconds per diffusion training step (forward, backward, AdamW) after one warm-up step."""
    c, h, w = _shape(proto)
    k, tr = _classes(proto), proto.training
    model = build_unet(unet_config(proto.model, k, c))
    cfg = schedule_config(proto.schedule)
    sched = training_scheduler(cfg)
    opt = torch.optim.AdamW(model.parameters(), tr.lr)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(tr.batch_size, c, h, w, generator=g) * 2 - 1
    y = torch.randint(0, k, (tr.batch_size,), generator=g)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        d = draw(tuple(x.shape), cfg.num_train_timesteps, 0.15, g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tr.precision == "bf16"):
            loss = diffusion_loss(model, sched, cfg, x, y, d, null_label=k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def image_step_seconds(proto, images: int) -> float:
    """Seconds per network call per image: DDIM-4 with guidance 2 (8 calls per image)."""
    c, h, w = _shape(proto)
    k, gen = _classes(proto), proto.generation
    model = build_unet(unet_config(proto.model, k, c)).eval()
    cfg = schedule_config(proto.schedule)
    kw = dict(image_shape=(c, h, w), null_label=k, sampler="ddim", guidance_scale=2.0)
    kw |= dict(bf16=gen.precision == "bf16", net_batch=gen.batch_size)
    sample(model, cfg, [0] * 2, [0, 1], steps=1, **kw)  # warm-up
    t0 = time.perf_counter()
    sample(model, cfg, [i % k for i in range(images)], list(range(images)), steps=4, **kw)
    return (time.perf_counter() - t0) / (images * 4 * 2)


def fit_image_epoch_seconds(proto, n_train: int, n_val: int, epochs: int) -> float:
    """Seconds per classifier epoch per training image, validation pass included (one seed)."""
    c, h, w = _shape(proto)
    k = _classes(proto)
    g = torch.Generator().manual_seed(0)
    x, xv = (torch.rand(n, c, h, w, generator=g) * 2 - 1 for n in (n_train, n_val))
    y, yv = (torch.arange(n) % k for n in (n_train, n_val))
    cfg = ClassifierConfig(**dict(proto.evaluation.classifier.model_dump(), epochs=epochs))
    fit_seeds(k, c, ClassifierConfig(**dict(cfg.to_dict(), epochs=1)), [0], x, y, xv, yv)
    t0 = time.perf_counter()
    fit_seeds(k, c, cfg, [0], x, y, xv, yv)
    return (time.perf_counter() - t0) / (epochs * n_train)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("protocol")
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--fit-images", type=int, default=200)
    ap.add_argument("--n-val", type=int, default=0, help="0: from the protocol")
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    proto = load_protocol(args.protocol)
    ds = proto.dataset
    n_val = args.n_val or (
        round(ds.phantoms.n_patients * 1.25 * ds.split_fractions["val"])
        if _val(ds.kind) == "phantoms"
        else 524
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {proto.name}: "
        f"{_shape(proto)} px, model {proto.model.channels}, training batch "
        f"{proto.training.batch_size} ({proto.training.precision}), classifier "
        f"{proto.evaluation.classifier.kind} batch {proto.evaluation.classifier.batch_size}, "
        f"{n_val} validation images"
    )
    measured = {
        "seconds_per_train_step": train_step_seconds(proto, args.train_steps),
        "seconds_per_image_step": image_step_seconds(proto, args.images),
        "seconds_per_fit_image_epoch": fit_image_epoch_seconds(
            proto, args.fit_images, n_val, args.epochs
        ),
    }
    sw = proto.sweep
    print(f"{'constant':<30}{'protocol':>12}{'measured':>12}")
    for key, v in measured.items():
        print(f"{key:<30}{getattr(sw, key):>12.5f}{v:>12.5f}")
    plan = expand(proto)
    with tempfile.TemporaryDirectory() as tmp:
        for tag, p in (("protocol", proto), ("measured", proto.model_copy(deep=True))):
            if tag == "measured":
                p.sweep = sw.model_copy(update=measured)
            e = estimate(p, plan, Path(tmp))
            print(
                f"estimate with {tag} constants: train {_dur(e['train'])}, generate "
                f"{_dur(e['generate'])}, evaluate {_dur(e['evaluate'])} ({e['fits']} fits); "
                f"total {_dur(e['total'])}"
            )


if __name__ == "__main__":
    main()
