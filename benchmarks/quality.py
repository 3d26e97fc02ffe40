"""Generator quality per class, in three feature spaces, for side-by-side recipe comparisons.

The question this answers (issue #18): does a generator's *finding* class keep the texture and
variety of the real class, or has it collapsed into smooth, alike images that an average hides?

Extractors are classifiers trained on the real train split inside this script (never on
synthetic data, never on val/test): a small CNN with two seeds and a ResNet-18, so a verdict that
holds in all three does not hang on one network. Every figure is against the real **test** split
by default, or the validation split with ``score --against val`` (the split to choose settings
on; see below), and named after its extractor:

- ``FD_cnn0`` / ``FD_cnn1`` / ``FD_r18``: Fréchet distance overall and per class;
- per class ``FD_<x>_over_split``: that FD over the FD between two disjoint halves of the real
  test class at the same n (the evaluation's collapse-flag floor; 1 = as close as real images),
  and overall ``FD_<x>_class_spread``: the worst class's ratio over the best's, the best taken
  as no lower than 1 (real images'; a reading below it is FD's noise at small n) as the
  evaluation's collapse flag does (issue 18's target: every class within 1.5× of the best);
  with ``--real-ref``, ``FD_<x>_over_real``: FD over real validation images' at the
  reference's n;
- precision / recall / coverage (k = 5, small CNN seed 0 features), overall and per class;
- MS-SSIM ratio per class (pairwise MS-SSIM of synthetic / of real; ≤ 1 = as diverse as real);
- per class ``W1_<x>_logit``: Wasserstein-1 distance between the logit of the extractor's
  probability for that class, synthetic against real images of the class (the shape of the
  class evidence, which a two-moment FD cannot see; 0 = as real);
- mean intensity in [0, 1] and high-frequency energy (mean squared Laplacian) relative to real.

``score --against val`` takes the validation split as the reference instead (and its halves as
the floor): on PneumoniaMNIST the test split is shifted from train/val (a separate source test
set), so a generator that follows its training distribution more closely can score *worse*
against test; validation is the split to choose settings on. ``score --against heldout`` takes
the train images outside a patient-level fraction (extractors fitted with ``--train-fraction``
on the rest, the generator trained with ``dataset.train_fraction`` on the same rest): an unseen,
in-distribution reference larger than validation.

Subcommands::

    python benchmarks/quality.py extractors INGEST --cache DIR [--train-fraction 0.8]
    python benchmarks/quality.py sample RUN_OR_SNAPSHOT --out x.npz [--sampler dpmpp --steps 20
        --guidance 2 --n 600 --eta 1 --device cuda --net-batch 1000 --like test|val|train
        --class-guidance normal=2 (or normal=1.5,2.5) --autoguide WEAKER_RUN_OR_SNAPSHOT
        --autoguide-classes pneumonia --seed-base 2000000]
    python benchmarks/quality.py sample RUN/distill --sampler distilled --steps 2 --guidance 1 ...
    python benchmarks/quality.py score INGEST --cache DIR --set name=x.npz ... [--real-ref 500]
        [--against test|val|heldout]
        [--json out.json] [--grid grid.png]

A sample set is an ``.npz`` with ``images`` ``(N, C, H, W)`` float in [-1, 1] and ``labels``
``(N,)`` class indices; ``sample`` draws classes in the test split's proportions so the overall FD
compares like with like.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medsynth.data.datasets import CachedSplit, load_split  # noqa: E402
from medsynth.evaluation.classifier import Classifier, ClassifierConfig  # noqa: E402
from medsynth.evaluation.fidelity import fd, mean_pairwise_msssim, prdc  # noqa: E402
from medsynth.evaluation.per_class import fd_over_real  # noqa: E402

EXTRACTORS = {  # name -> (classifier kind, seed, epochs)
    "cnn0": ("small_cnn", 0, 20),
    "cnn1": ("small_cnn", 1, 20),
    "r18": ("resnet18", 0, 10),
}
MIN_N = 10  # fewer images than this in a class: no per-class figure


def _extractor_path(cache: Path, name: str) -> Path:
    return cache / f"extractor_{name}.pt"


def train_extractors(
    ingest: Path,
    cache: Path,
    epochs: int | None = None,
    only: list[str] | None = None,
    fraction: float = 1.0,
    fraction_seed: int = 0,
) -> None:
    """Fit each extractor (``only``: these names; cnn0 is always needed) on the real train
    split (best validation-AUC epoch) and save it.

    ``epochs`` overrides every extractor's epoch count (a smoke run uses 1); ``fraction`` < 1
    fits them on that patient-level part of train only, so the rest can serve as an unseen
    in-distribution reference (``score --against heldout``)."""
    cache.mkdir(parents=True, exist_ok=True)
    meta = {"train_fraction": fraction, "fraction_seed": fraction_seed}
    old = _cache_meta(cache)
    if any(_extractor_path(cache, n).exists() for n in EXTRACTORS) and old != meta:
        sys.exit(f"{cache} holds extractors fitted on {old}, not {meta}: use another --cache")
    (cache / "meta.json").write_text(json.dumps(meta))
    train = load_split(ingest, "train", fraction, fraction_seed)
    val = load_split(ingest, "val")
    names = set(only or EXTRACTORS) | {"cnn0"}
    for name, (kind, seed, n_epochs) in EXTRACTORS.items():
        if name not in names:
            continue
        path = _extractor_path(cache, name)
        if path.exists():
            continue
        t0 = time.perf_counter()
        cfg = ClassifierConfig(kind=kind, epochs=epochs or n_epochs, batch_size=128)
        clf = Classifier(len(train.classes), train.images.shape[1], cfg, seed=seed)
        clf.fit(train.images, train.labels, val.images, val.labels)
        torch.save(clf, path)
        print(
            f"extractor {name}: {kind} seed {seed}, best epoch {clf.best_epoch}, "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )


def _cache_meta(cache: Path) -> dict:
    """The train part an extractor cache was fitted on (caches from before it: all of train)."""
    path = cache / "meta.json"
    if path.exists():
        return json.loads(path.read_text())
    return {"train_fraction": 1.0, "fraction_seed": 0}


def reference_split(ingest: Path, against: str, cache: Path):
    """The split every figure is measured against: ``test``, ``val``, or ``heldout`` — the
    train images outside the patient-level fraction the extractors (and, by the caller's
    protocol, the generator) were fitted on: unseen, and from the training distribution."""
    if against != "heldout":
        return load_split(ingest, against)
    meta = _cache_meta(cache)
    if meta["train_fraction"] >= 1.0:
        sys.exit(f"--against heldout needs extractors fitted on a train fraction; {cache} has all")
    train = load_split(ingest, "train")
    seen = load_split(ingest, "train", meta["train_fraction"], meta["fraction_seed"])
    kept = {r["row"] for r in seen.rows}
    m = torch.tensor([r["row"] not in kept for r in train.rows])
    rows = [r for r, k in zip(train.rows, m.tolist(), strict=True) if k]
    return CachedSplit(train.images[m], train.labels[m], train.classes, rows)


def load_extractors(cache: Path) -> dict[str, Classifier]:
    """The extractors trained into ``cache`` (cnn0 at least), in ``EXTRACTORS`` order."""
    paths = {n: _extractor_path(cache, n) for n in EXTRACTORS}
    return {n: torch.load(p, weights_only=False) for n, p in paths.items() if p.exists()}


def laplacian_energy(images: torch.Tensor) -> float:
    """Mean squared 3x3 Laplacian response of ``(N, C, H, W)`` images in [-1, 1]."""
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    k = k.view(1, 1, 3, 3).repeat(images.shape[1], 1, 1, 1)
    lap = F.conv2d(images.float(), k, groups=images.shape[1])
    return float((lap**2).mean())


def _set_metrics(
    feats: dict[str, np.ndarray],
    real_feats: dict[str, np.ndarray],
    images: torch.Tensor,
    real_images: torch.Tensor,
) -> dict[str, float]:
    """Every figure of one (set, class-or-overall) comparison."""
    out: dict[str, float] = {"n": len(images), "n_real": len(real_images)}
    if len(images) < MIN_N or len(real_images) < MIN_N:
        return out
    for name in feats:
        out[f"FD_{name}"] = fd(real_feats[name], feats[name])
    out.update(prdc(real_feats["cnn0"], feats["cnn0"], k=5))
    out["msssim_ratio"] = mean_pairwise_msssim(images) / mean_pairwise_msssim(real_images)
    out["mean_intensity"] = float((images.float().mean() + 1) / 2)
    out["hf_ratio"] = laplacian_energy(images) / laplacian_energy(real_images)
    return out


def score_set(
    images: torch.Tensor,
    labels: torch.Tensor,
    test,
    extractors: dict[str, Classifier],
    test_feats: dict[str, np.ndarray],
    feats: dict[str, np.ndarray] | None = None,
    test_proba: dict[str, np.ndarray] | None = None,
) -> dict:
    """``{"all": {...}, "<class>": {...}}`` for one synthetic (or reference) set; ``feats``:
    its features per extractor when already computed; ``test_proba``: the reference split's
    class probabilities per extractor, likewise (computed once for many sets)."""
    if feats is None:
        feats = {n: e.features(images) for n, e in extractors.items()}
    if test_proba is None:
        test_proba = {n: e.predict_proba(test.images) for n, e in extractors.items()}
    proba = {n: e.predict_proba(images) for n, e in extractors.items()}
    pred = proba["cnn0"].argmax(1)
    result = {"all": _set_metrics(feats, test_feats, images, test.images)}
    result["all"]["class_validity"] = float((pred == labels.numpy()).mean())
    for c, cls in enumerate(test.classes):
        m, mr = (labels == c).numpy(), (test.labels == c).numpy()
        result[cls] = _set_metrics(
            {n: f[m] for n, f in feats.items()},
            {n: f[mr] for n, f in test_feats.items()},
            images[torch.from_numpy(m)],
            test.images[torch.from_numpy(mr)],
        )
        if m.any():
            result[cls]["class_validity"] = float((pred[m] == c).mean())
        if "FD_cnn0" in result[cls]:
            for n, f in feats.items():  # the evaluation's collapse-flag floor: test halves
                result[cls][f"FD_{n}_over_split"] = fd_over_real(test_feats[n][mr], f[m])
                result[cls][f"W1_{n}_logit"] = class_logit_w1(test_proba[n][mr, c], proba[n][m, c])
    for n in feats:
        ratios = [result[cls].get(f"FD_{n}_over_split") for cls in test.classes]
        if all(r is not None and np.isfinite(r) for r in ratios):
            result["all"][f"FD_{n}_class_spread"] = max(ratios) / max(min(ratios), 1.0)
    return result


def class_logit_w1(real_p: np.ndarray, synth_p: np.ndarray) -> float:
    """Wasserstein-1 distance between the logits of an extractor's class probability for real
    and synthetic images of that class (``(N,)`` probabilities in [0, 1]).

    The shape along the class axis, which FD's two moments cannot see: a set half blends, half
    over-typical can match real images' mean and variance there and still sit far from their
    distribution. 0 = the same distribution of class evidence as real images.
    """
    from scipy.stats import wasserstein_distance

    def logit(p: np.ndarray) -> np.ndarray:
        p = np.clip(p.astype(np.float64), 1e-6, 1 - 1e-6)
        return np.log(p) - np.log1p(-p)

    return float(wasserstein_distance(logit(real_p), logit(synth_p)))


def class_counts(test_labels: torch.Tensor, n: int, num_classes: int) -> list[int]:
    """``n`` images split over classes in the test split's proportions (largest remainder)."""
    share = np.bincount(test_labels.numpy(), minlength=num_classes) / len(test_labels)
    counts = np.floor(share * n).astype(int)
    for i in np.argsort(-(share * n - counts))[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def _snapshot_of(src: Path) -> Path:
    """The latest snapshot of a run or train folder; a snapshot folder as given."""
    from medsynth.training.checkpoint import latest_snapshot

    for cand in (src / "train", src):
        if cand.is_dir() and any(cand.glob("snapshot*")):
            return latest_snapshot(cand)
    return src


def _guide_of(src: Path) -> Path:
    """The finished guide a run folder trained beside its model (``training.guide_fraction``),
    else the latest snapshot of ``src`` as :func:`_snapshot_of` finds it (a weaker run)."""
    from medsynth.training.api import guide_snapshot, run_guide_steps

    steps = run_guide_steps(src)
    if not steps:
        return _snapshot_of(src)
    guide = guide_snapshot(src / "train", steps)
    if guide is None:
        sys.exit(
            f"--autoguide {src}: its {steps}-step guide is not finished (run `medsynth train`)"
        )
    return guide


def class_guidance_arg(specs: list[str], classes: list[str]) -> dict[int, float | list[float]]:
    """``--class-guidance`` as the sampler takes it: ``normal=2`` -> {0: 2.0}; ``normal=1.5,2.5``
    -> a set of scales, each image taking one by its seed. Exits with the reason on a bad spec."""
    from pydantic import TypeAdapter, ValidationError

    from medsynth.protocol import CheckedClassScale

    out = {}
    for spec in specs:
        name, _, text = spec.partition("=")
        if name not in classes:
            sys.exit(f"--class-guidance {spec}: unknown class {name!r}; known {classes}")
        try:
            values = [float(v) for v in text.split(",")]
            scale = values if len(values) > 1 else values[0]
            out[classes.index(name)] = TypeAdapter(CheckedClassScale).validate_python(scale)
        except ValueError as err:  # pydantic's ValidationError is one
            why = err.errors()[0]["msg"] if isinstance(err, ValidationError) else "not CLASS=SCALE"
            sys.exit(f"--class-guidance {spec}: {why}")
    return out


def sample_medsynth(args) -> None:
    """Draw ``--n`` samples from a medsynth snapshot (run folder, train folder or snapshot)."""
    from medsynth.diffusion.sampler import sample
    from medsynth.protocol import autoguidance_below_one, guide_called
    from medsynth.training.checkpoint import load_guide, load_snapshot
    from medsynth.training.loop import pick_device

    src = _snapshot_of(Path(args.source))
    device = pick_device(args.device)
    unet, sched, config = load_snapshot(src, device)
    like = load_split(args.ingest, args.like)
    counts = class_counts(like.labels, args.n, len(like.classes))
    labels = torch.cat([torch.full((k,), c) for c, k in enumerate(counts)])
    seeds = list(range(args.seed_base, args.seed_base + args.n))
    u = config["unet"]
    shape = (u["in_channels"], like.images.shape[-2], like.images.shape[-1])
    extra = {}
    if args.guidance_rescale:
        extra["guidance_rescale"] = args.guidance_rescale
    if args.guidance_interval:
        extra["guidance_interval"] = tuple(args.guidance_interval)
    if args.eta:
        extra["ddim_eta"] = args.eta
    if args.spacing != "trailing":
        extra["timestep_spacing"] = args.spacing
    if args.class_guidance:  # name=scale or name=s1,s2: that class's own scale (set)
        extra["class_guidance"] = class_guidance_arg(args.class_guidance, like.classes)
    if args.autoguide_classes and not args.autoguide:
        sys.exit("--autoguide-classes names the classes that use --autoguide's guide: pass both")
    if args.autoguide:  # autoguidance: a weaker model of the same task replaces the null pass
        scales = {like.classes[c]: v for c, v in extra.get("class_guidance", {}).items()}
        some = args.autoguide_classes  # None: every class
        if unknown := sorted(set(some or []) - set(like.classes)):
            sys.exit(f"--autoguide-classes: unknown classes {unknown}; known {like.classes}")
        if not guide_called(some or True, args.guidance, scales):
            sys.exit(
                "--autoguide needs --guidance (or --class-guidance) other than 1 for an "
                "autoguided class: at 1 the guide is never called"
            )
        if low := autoguidance_below_one(args.guidance, scales, some):
            sys.exit(f"--autoguide: {low}")
        if some is not None:
            extra["guide_classes"] = [like.classes.index(c) for c in some]
        try:
            extra["guide"] = load_guide(_guide_of(Path(args.autoguide)), config, device)
        except ValueError as err:
            sys.exit(f"--autoguide: {err}")
    if args.sampler == "distilled":  # a student of `medsynth distill` (pass RUN/distill)
        extra["distilled"] = config.get("distill")
    t0 = time.perf_counter()
    x = sample(
        unet,
        sched,
        labels,
        seeds,
        image_shape=shape,
        null_label=u["num_classes"],
        sampler=args.sampler,
        steps=args.steps,
        guidance_scale=args.guidance,
        device=device,
        net_batch=args.net_batch,
        **extra,
    )
    seconds = time.perf_counter() - t0
    print(
        f"sampled {args.n} ({counts}) from {src} in {seconds:.0f} s ({seconds / args.n:.3f} s/image)"
    )
    np.savez_compressed(args.out, images=x.cpu().numpy(), labels=labels.numpy())


def real_reference(ingest: Path, test, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``n`` real *validation* images in the test split's class proportions (seeded).

    Validation, not train: the extractors were fitted on the train split, so train images sit
    in an over-fitted region of their feature space (FD_r18 of 600 real train images against test:
    130, of samples never seen: 3.5). Validation images only chose the extractors' epoch. Classes
    with fewer validation images than asked give all they have.
    """
    val = load_split(ingest, "val")
    rng = np.random.default_rng(0)
    counts = class_counts(test.labels, n, len(test.classes))
    idx = []
    for c, k in enumerate(counts):
        pool = np.flatnonzero(val.labels.numpy() == c)
        idx.append(rng.choice(pool, min(k, len(pool)), replace=False))
    idx = torch.from_numpy(np.concatenate(idx))
    return val.images[idx], val.labels[idx]


def score(args) -> None:
    if args.against == "val" and args.real_ref:
        sys.exit("--real-ref draws validation images: it needs --against test or heldout")
    # ``test`` below is the reference split: test by default, validation or held-out train.
    test = reference_split(args.ingest, args.against, args.cache)
    extractors = load_extractors(args.cache)
    test_feats = {n: e.features(test.images) for n, e in extractors.items()}
    sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    ref = f"real val ({args.real_ref})"
    if args.real_ref:
        sets[ref] = real_reference(args.ingest, test, args.real_ref)
    for spec in args.sets:
        name, path = spec.split("=", 1)
        z = np.load(path)
        sets[name] = (torch.from_numpy(z["images"]).float(), torch.from_numpy(z["labels"]).long())
    feats = {s: {n: e.features(x) for n, e in extractors.items()} for s, (x, _) in sets.items()}
    test_proba = {n: e.predict_proba(test.images) for n, e in extractors.items()}
    results = {
        s: score_set(x, y, test, extractors, test_feats, feats[s], test_proba)
        for s, (x, y) in sets.items()
    }
    if args.real_ref:
        add_floor_ratios(results, sets, feats, ref, test, test_feats)
    print_table(results, test.classes, args.against)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if args.grid:
        write_grid(args.grid, sets, test, f"real {args.against}")


def matched_subset(
    labels: torch.Tensor, ref_labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Indices of the first ``k_c`` images of each class c, ``k_c`` = the reference's count of c
    (fewer if the set has fewer): the set at the reference's n, class by class."""
    idx = [
        torch.nonzero(labels == c).flatten()[: int((ref_labels == c).sum())]
        for c in range(num_classes)
    ]
    return torch.cat(idx)


def fd_parts(
    feats: dict[str, np.ndarray], labels: torch.Tensor, test, test_feats: dict
) -> dict[str, dict[str, float]]:
    """``{part: {"FD_<x>": ...}}`` of a set's features against the test split's, overall and
    per class (parts under ``MIN_N`` left out)."""
    masks = {"all": (np.ones(len(labels), bool), np.ones(len(test.labels), bool))}
    for c, cls in enumerate(test.classes):
        masks[cls] = ((labels == c).numpy(), (test.labels == c).numpy())
    out: dict[str, dict[str, float]] = {}
    for part, (m, mr) in masks.items():
        if min(m.sum(), mr.sum()) >= MIN_N:
            out[part] = {f"FD_{n}": fd(test_feats[n][mr], f[m]) for n, f in feats.items()}
    return out


def add_floor_ratios(
    results: dict, sets: dict, feats: dict, ref: str, test, test_feats: dict
) -> None:
    """Each set's FD over the real validation reference's, per part, **at the reference's n**.

    ``FD_<x>_over_real``: the set is cut to the reference's per-class counts first (Fréchet
    distance grows as n shrinks, and the validation split may hold fewer images of a class than
    a synthetic set), so 1.0 = as close to the test split as real images at the same n, and
    classes can be compared (raw FD differs between classes even for real images). On
    PneumoniaMNIST the validation normals sit far from the test normals (an acquisition shift:
    FD_r18 273 against 4.4 for pneumonia), so per class :func:`score_set`'s ``_over_split``
    floor, which never leaves the test split, is the one to compare classes by.
    """
    ref_y = sets[ref][1]
    floor = fd_parts(feats[ref], ref_y, test, test_feats)
    for name, (_, y) in sets.items():
        idx = matched_subset(y, ref_y, len(test.classes)).numpy()
        cut = {n: f[idx] for n, f in feats[name].items()}
        matched = fd_parts(cut, y[idx], test, test_feats)
        for part, row in matched.items():
            for k, v in row.items():
                if floor.get(part, {}).get(k):
                    results[name][part][f"{k}_over_real"] = v / floor[part][k]


def _fmt(v) -> str:
    return "  n<10" if v is None else f"{v:6.2f}"


def print_table(results: dict, classes: list[str], against: str = "test") -> None:
    names = [n for n in EXTRACTORS if any(f"FD_{n}" in r["all"] for r in results.values())]
    keys = [f"FD_{n}" for n in names] + ["precision", "recall", "coverage"]
    keys += ["msssim_ratio", "mean_intensity", "hf_ratio", "class_validity"]
    if any("FD_cnn0_over_real" in r["all"] for r in results.values()):
        keys += [f"FD_{n}_over_real" for n in names]
    for part in ["all", *classes]:
        print(f"\n[{part}] vs real {against}{'' if part == 'all' else ' ' + part}")
        extra = "class_spread" if part == "all" else "over_split"
        part_keys = keys + [f"FD_{n}_{extra}" for n in names]
        if part != "all":
            part_keys += [f"W1_{n}_logit" for n in names]
        heads = (
            k.replace("_over_real", "/real")
            .replace("_class_spread", "/spr")
            .replace("_over_split", "/spl")
            .replace("_logit", "lgt")
            for k in part_keys
        )
        print(f"{'set':32s}" + "".join(f"{h[:9]:>10s}" for h in heads))
        for name, res in results.items():
            row = res[part]
            print(f"{name[:32]:32s}" + "".join(f"{_fmt(row.get(k)):>10s}" for k in part_keys))


def write_grid(path: str, sets: dict, test, ref_name: str, per_class: int = 8) -> None:
    """One row per (set, class): ``per_class`` images; the first rows are the reference split's
    real images (``test``: the split scored against, named ``ref_name``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(ref_name, test.images, test.labels), *((n, x, y) for n, (x, y) in sets.items())]
    nrows = len(rows) * len(test.classes)
    fig, axes = plt.subplots(nrows, per_class, figsize=(per_class * 0.9, nrows * 0.95))
    pairs = [(row, c) for row in rows for c in range(len(test.classes))]
    for r, ((name, x, y), c) in enumerate(pairs):
        imgs = x[y == c][:per_class]
        for j in range(per_class):
            ax = axes[r, j]
            ax.axis("off")
            if j < len(imgs):
                ax.imshow((imgs[j, 0].numpy() + 1) / 2, cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_title(f"{name} · {test.classes[c]}", fontsize=6, loc="left")
    fig.tight_layout(pad=0.1)
    fig.savefig(path, dpi=110)
    print(f"grid: {path} (first rows: {ref_name})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extractors")
    e.add_argument("ingest", type=Path)
    e.add_argument("--cache", type=Path, required=True)
    e.add_argument("--epochs", type=int, help="override every extractor's epochs (smoke: 1)")
    e.add_argument("--only", nargs="+", choices=list(EXTRACTORS), help="train only these")
    e.add_argument(
        "--train-fraction", type=float, default=1.0, help="fit on this patient-level part of train"
    )
    e.add_argument("--fraction-seed", type=int, default=0)
    s = sub.add_parser("sample")
    s.add_argument("source")
    s.add_argument("--ingest", type=Path, required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=600)
    s.add_argument("--sampler", default="dpmpp")
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--guidance", type=float, default=2.0)
    s.add_argument("--guidance-rescale", type=float, default=0.0)
    s.add_argument("--guidance-interval", type=float, nargs=2)
    s.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (sampler ddim)")
    s.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    s.add_argument(
        "--class-guidance",
        nargs="+",
        metavar="CLASS=SCALE",
        help="a class's own guidance scale, or a set (CLASS=1.5,2.5: each image takes one, by "
        "its seed)",
    )
    s.add_argument(
        "--autoguide",
        metavar="RUN_OR_SNAPSHOT",
        help="autoguidance: guide with this weaker model (e.g. the recipe at 1,000 steps) under "
        "each row's own class instead of the null class",
    )
    s.add_argument(
        "--autoguide-classes",
        nargs="+",
        metavar="CLASS",
        help="with --autoguide: only these classes use the guide; the other guided classes "
        "extrapolate from the null class",
    )
    s.add_argument(
        "--like", default="test", choices=["test", "val", "train"], help="class proportions of"
    )
    s.add_argument(
        "--net-batch", type=int, default=64, help="rows per network call (part of sample identity)"
    )
    s.add_argument(
        "--spacing", default="trailing", choices=["trailing", "karras"], help="timestep grid"
    )
    s.add_argument(
        "--seed-base",
        type=int,
        default=1_000_000,
        help="row i draws seed SEED_BASE + i; another base gives an independent set from the same "
        "generator (FD over floor at ~120 images per half moved by 0.3-0.5 between such sets)",
    )
    c = sub.add_parser("score")
    c.add_argument("ingest", type=Path)
    c.add_argument(
        "--set", dest="sets", action="append", default=[], help="name=path.npz (repeatable)"
    )
    c.add_argument("--cache", type=Path, required=True)
    c.add_argument("--real-ref", type=int, default=0, help="n real val images")
    c.add_argument(
        "--against",
        default="test",
        choices=["test", "val", "heldout"],
        help="reference split (val: the train split's own distribution, for choosing settings; "
        "heldout: the train images outside the extractors' --train-fraction)",
    )
    c.add_argument("--json")
    c.add_argument("--grid")
    args = ap.parse_args()
    if args.cmd == "extractors":
        train_extractors(
            args.ingest, args.cache, args.epochs, args.only, args.train_fraction, args.fraction_seed
        )
    elif args.cmd == "sample":
        sample_medsynth(args)
    else:
        score(args)


if __name__ == "__main__":
    main()
