"""The uplift study: does synthetic data help a classifier, by how much, with what confidence?

Every arm is trained with the same classifier settings and ``seeds`` seeds, selected on the real
validation split and tested on the same real test split. Synthetic arms are compared with
real-only *and* with a duplicate-real control holding exactly as many extra images per class.
The real-only classifier of seed 0 doubles as the feature extractor (named ``clf``) for the
fidelity, diversity and memorization metrics. Reads the ingest cache and generated pools only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medsynth.data.datasets import load_split
from medsynth.evaluation.classifier import ClassifierConfig, resolve_precision
from medsynth.evaluation.edit_arms import edit_audit_fields, edit_groups, is_edit_pool
from medsynth.evaluation.fidelity import fidelity_diversity
from medsynth.evaluation.grouped import fit_seeds
from medsynth.evaluation.memorization import audit
from medsynth.evaluation.selection import select
from medsynth.evaluation.stats import metrics, paired_bootstrap_diff, spearman_with_ci
from medsynth.generation.dataset import load_pool
from medsynth.protocol import EvaluationSection
from medsynth.utils.csvsafe import write_rows

UPLIFT_METRICS = ("auc", "balanced_accuracy")
DIVERSITY_KEYS = (
    "FD_clf",
    "KID_clf",
    "precision_clf",
    "recall_clf",
    "density_clf",
    "coverage_clf",
    "msssim_ratio",
    "vendi_clf",
    "vendi_pixels",
)


def class_counts(labels: torch.Tensor, k: int, ratio: float, mix: str) -> list[int]:
    """Extra images per class for ``ratio`` extra per real image, ``round(ratio * N)`` in all.

    ``proportional``: as the real classes; ``balanced``: the same number for every class;
    ``minority_topup``: one at a time to the class with the fewest images so far (water filling),
    so the smaller classes are topped up first and the result is as balanced as ``ratio`` allows.
    """
    n = torch.bincount(labels, minlength=k).tolist()
    if mix == "balanced":
        return [round(ratio * sum(n) / k)] * k
    if mix == "minority_topup":
        extra, have = [0] * k, list(n)
        for _ in range(round(ratio * sum(n))):
            c = int(np.argmin(have))
            extra[c] += 1
            have[c] += 1
        return extra
    return [round(ratio * c) for c in n]


def _pick_per_class(labels: torch.Tensor, counts: list[int], chooser) -> np.ndarray:
    out = []
    for c, m in enumerate(counts):
        idx = np.flatnonzero(labels.numpy() == c)
        if m and len(idx):
            out.append(idx[chooser(idx, m, c)])
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def run_study(
    ingest_dir: str | Path,
    generate_dir: str | Path,
    out_dir: str | Path,
    ev: EvaluationSection,
    *,
    train_fraction: float = 1.0,
    fraction_seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run every arm x seed, the statistics and the audits; write tidy files into ``out_dir``."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    real = load_split(ingest_dir, "train", train_fraction, fraction_seed)
    val, test = load_split(ingest_dir, "val"), load_split(ingest_dir, "test")
    classes, k = real.classes, len(real.classes)
    size, channels = real.images.shape[-1], real.images.shape[1]
    cfg = ClassifierConfig(**ev.classifier.model_dump())
    cfg.precision = resolve_precision(cfg.precision, cfg.device)  # summary names what ran
    pools = {
        p: load_pool(Path(generate_dir) / p, classes, size, channels=channels) for p in ev.pools
    }
    y_test = test.labels.numpy()

    rows, probas = [], {}
    bar = tqdm(desc="classifiers", unit="fit", disable=not progress)

    def fit_arm(
        arm: str, x: torch.Tensor, y: torch.Tensor, n_extra: int = 0, augment=False, **tags
    ):
        """Every seed of one arm, fitted together (grouped where that pays: see fit_seeds)."""
        clfs = fit_seeds(
            k,
            x.shape[1],
            ClassifierConfig(**dict(cfg.to_dict(), augment=augment)),
            list(range(ev.seeds)),
            x,
            y,
            val.images,
            val.labels,
        )
        for seed, clf in enumerate(clfs):
            p = clf.predict_proba(test.images)
            probas.setdefault(arm, []).append(p)
            rows.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "n_train": len(x),
                    "n_extra": n_extra,
                    "best_epoch": clf.best_epoch,
                    **tags,
                    **metrics(y_test, p, classes),
                }
            )
        bar.update(len(clfs))
        return clfs

    # 1. Real-only; seed 0 is the feature extractor.
    extractor = fit_arm("real_only", real.images, real.labels)[0]
    feats = {
        "real_train": extractor.features(real.images),
        "real_holdout": extractor.features(torch.cat([val.images, test.images])),
    }
    conf = {}  # the real-only classifier's probability of each sample's own label
    for name, pool in pools.items():
        feats[f"pool:{name}"] = extractor.features(pool.images)
        idx = np.arange(len(pool.labels))
        conf[name] = extractor.predict_proba(pool.images)[idx, pool.labels.numpy()]
    np.savez_compressed(
        out / "features.npz", **{k_.replace(":", "_"): v for k_, v in feats.items()}
    )

    arms = set(ev.arms)
    if "classical_aug" in arms:
        fit_arm("classical_aug", real.images, real.labels, augment=True)

    variants = []  # (arm key, pool, selector, ratio, selected indices)
    edited = {n for n, p in pools.items() if is_edit_pool(p.rows)}
    edit_variants, dup_of = [], {}  # edit arms; edit arm -> its duplicate control
    for ratio in ev.ratios:
        counts = class_counts(real.labels, k, ratio, ev.class_mix)
        if "duplicate_control" in arms:
            dup_rng = np.random.default_rng(1000 + int(ratio * 1000))
            dup = _pick_per_class(
                real.labels, counts, lambda idx, m, c, r=dup_rng: r.integers(0, len(idx), m)
            )
            fit_arm(
                f"duplicate_control@{ratio:g}",
                torch.cat([real.images, real.images[dup]]),
                torch.cat([real.labels, real.labels[dup]]),
                len(dup),
                ratio=ratio,
            )
        for name in sorted(edited):
            pool = pools[name]
            for kind, label, idx in edit_groups(pool.rows):
                if kind not in arms:
                    continue
                local = _pick_per_class(
                    pool.labels[idx],
                    counts,
                    lambda ii, m, c: np.random.default_rng(c).permutation(len(ii))[:m],
                )
                chosen = idx[local]
                if len(chosen) == 0:
                    continue  # the pool holds none of the classes the ratio asks for
                got = torch.bincount(pool.labels[chosen], minlength=k).tolist()
                key = f"{kind}@{label}:{name}@{ratio:g}"
                dup_key = f"duplicate_control@{ratio:g}"
                if got != counts or "duplicate_control" not in arms:
                    # The pool cannot fill every class: a control with the very same counts.
                    dup_key = f"duplicate_control:{key}"
                    dup_rng = np.random.default_rng(2000 + int(ratio * 1000))
                    dup = _pick_per_class(
                        real.labels, got, lambda ii, m, c, r=dup_rng: r.integers(0, len(ii), m)
                    )
                    fit_arm(
                        dup_key,
                        torch.cat([real.images, real.images[dup]]),
                        torch.cat([real.labels, real.labels[dup]]),
                        len(dup),
                        ratio=ratio,
                    )
                dup_of[key] = dup_key
                edit_variants.append((key, name, "random", ratio, chosen))
                fit_arm(
                    key,
                    torch.cat([real.images, pool.images[chosen]]),
                    torch.cat([real.labels, pool.labels[chosen]]),
                    len(chosen),
                    pool=name,
                    selector="random",
                    ratio=ratio,
                )
        if "synthetic" not in arms:
            continue
        for name, pool in pools.items():
            if name in edited:
                continue  # edited pools are tested by the variations / counterfactual arms
            pf = feats[f"pool:{name}"]
            for sel in ev.selectors:
                chosen = _pick_per_class(
                    pool.labels,
                    counts,
                    lambda idx, m, c, sel=sel, pf=pf, pc=conf[name]: select(
                        sel, m, pf[idx], pc[idx], seed=c
                    ),
                )
                key = f"synthetic:{name}:{sel}@{ratio:g}"
                variants.append((key, name, sel, ratio, chosen))
                fit_arm(
                    key,
                    torch.cat([real.images, pool.images[chosen]]),
                    torch.cat([real.labels, pool.labels[chosen]]),
                    len(chosen),
                    pool=name,
                    selector=sel,
                    ratio=ratio,
                )
    if "synthetic_only" in arms:
        counts = class_counts(real.labels, k, 1.0, ev.class_mix)
        for name, pool in pools.items():
            if name in edited:
                continue
            chosen = _pick_per_class(
                pool.labels,
                counts,
                lambda idx, m, c: np.random.default_rng(c).permutation(len(idx))[:m],
            )
            fit_arm(
                f"synthetic_only:{name}",
                pool.images[chosen],
                pool.labels[chosen],
                len(chosen),
                pool=name,
            )
    bar.close()

    # 2. Uplift against real-only and against the duplicate control of the same ratio.
    uplift = []
    for arm, ps in probas.items():
        rec = {"arm": arm, "seeds": len(ps)}
        for m in UPLIFT_METRICS:
            vals = [r[m] for r in rows if r["arm"] == arm]
            rec[f"{m}_mean"], rec[f"{m}_sd"] = (
                float(np.mean(vals)),
                float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
            )
            if arm != "real_only":
                d = paired_bootstrap_diff(y_test, ps, probas["real_only"], m, classes, ev.bootstrap)
                rec.update(
                    {
                        f"{m}_vs_real": d["diff"],
                        f"{m}_vs_real_ci_low": d["ci_low"],
                        f"{m}_vs_real_ci_high": d["ci_high"],
                    }
                )
            dup = dup_of.get(arm) or (
                f"duplicate_control@{arm.rsplit('@', 1)[1]}"
                if arm.startswith("synthetic:")
                else None
            )
            if dup in probas:
                rec["control"] = dup
                d = paired_bootstrap_diff(y_test, ps, probas[dup], m, classes, ev.bootstrap)
                rec.update(
                    {
                        f"{m}_vs_dup": d["diff"],
                        f"{m}_vs_dup_ci_low": d["ci_low"],
                        f"{m}_vs_dup_ci_high": d["ci_high"],
                    }
                )
        uplift.append(rec)

    # 3. Fidelity / diversity of each selected set (per class and overall), memorization per pool.
    rng = np.random.default_rng(0)
    cap = ev.metric_samples

    def capped(idx: np.ndarray) -> np.ndarray:
        return idx if len(idx) <= cap else rng.choice(idx, cap, replace=False)

    fidelity = {}
    for key, name, _sel, _ratio, chosen in variants + edit_variants:
        pool, pf = pools[name], feats[f"pool:{name}"]
        per = {}
        for c, cname in [(None, "all")] + list(enumerate(classes)):
            ri = capped(
                np.arange(len(real.labels))
                if c is None
                else np.flatnonzero(real.labels.numpy() == c)
            )
            fi = capped(chosen if c is None else chosen[pool.labels.numpy()[chosen] == c])
            if len(fi) >= 2 and len(ri) >= 2:
                per[cname] = fidelity_diversity(
                    feats["real_train"][ri], pf[fi], real.images[ri], pool.images[fi]
                )
        fidelity[key] = per
    memo = {}
    holdout_px = torch.cat([val.images, test.images]).numpy()
    # Held-out near-copies of train images are left out of calibration, at the ingest threshold.
    ingest_summary = json.loads((Path(ingest_dir) / "summary.json").read_text())
    exclude = (ingest_summary.get("duplicates") or {}).get("threshold", 0.99)
    for name, pool in pools.items():
        memo[name] = audit(
            pool.images.numpy(),
            real.images.numpy(),
            holdout_px,
            feats[f"pool:{name}"],
            feats["real_train"],
            feats["real_holdout"],
            quantile=ev.memorization_quantile,
            exclude_threshold=exclude,
        )
        if name in edited:
            memo[name] |= edit_audit_fields(memo[name], pool.rows, real.rows)
        memo[name]["synthetic_paths"] = [r["path"] for r in pool.rows]
        # Cache rows, not file paths: source paths often embed patient identifiers.
        memo[name]["train_cache_rows"] = [int(r["row"]) for r in real.rows]

    # 4. Diversity <-> uplift across variants (pools x selectors x ratios).
    up_by_arm = {u["arm"]: u for u in uplift}
    div_up = {}
    if len(variants) >= 3:
        y_up = [up_by_arm[key].get("auc_vs_real", np.nan) for key, *_ in variants]
        for m in DIVERSITY_KEYS:
            x = [fidelity[key].get("all", {}).get(m, np.nan) for key, *_ in variants]
            div_up[m] = spearman_with_ci(np.array(x), np.array(y_up)) | {"x": x, "uplift_auc": y_up}

    summary = {
        "classes": classes,
        "train_fraction": train_fraction,
        "n_real_train": len(real.labels),
        "n_val": len(val.labels),
        "n_test": len(test.labels),
        "classifier": cfg.to_dict(),
        "seeds": ev.seeds,
        "extractor": f"{cfg.kind} real-only seed 0 (penultimate layer)",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    # Test probabilities per arm (seeds stacked) for statistics across studies (sweeps).
    np.savez_compressed(
        out / "probas.npz",
        y_test=y_test,
        arms=np.array(list(probas)),
        **{f"arm_{i}": np.stack(ps) for i, ps in enumerate(probas.values())},
    )
    _write_csv(out / "runs.csv", rows)
    _write_csv(out / "uplift.csv", uplift)
    for fname, obj in (
        ("fidelity.json", fidelity),
        ("memorization.json", memo),
        ("diversity_uplift.json", div_up),
        ("summary.json", summary),
    ):
        (out / fname).write_text(json.dumps(obj, indent=2, default=float))
    return {
        "summary": summary,
        "uplift": uplift,
        "fidelity": fidelity,
        "diversity_uplift": div_up,
        "memorization": {
            n: {
                k_: v
                for k_, v in m.items()
                if k_ not in ("per_sample", "synthetic_paths", "train_cache_rows")
            }
            for n, m in memo.items()
        },
    }


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    with path.open("w", newline="") as fh:
        write_rows(fh, cols, rows)  # arm and pool names may start like a spreadsheet formula
