"""The steps of an uplift study before the analysis: load the data, plan the arms, fit one arm.

An arm (:class:`Unit`) is an independent work item: given the same data and features it fits
the same classifiers wherever it runs, which is what lets :mod:`medsynth.evaluation.shards`
spread the fits over processes and machines.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medsynth.data.datasets import load_split
from medsynth.evaluation.classifier import ClassifierConfig
from medsynth.evaluation.edit_arms import edit_groups, is_edit_pool
from medsynth.evaluation.grouped import fit_seeds
from medsynth.evaluation.selection import select
from medsynth.evaluation.stats import metrics
from medsynth.generation.dataset import load_pool
from medsynth.protocol import EvaluationSection
from medsynth.runtime import resolve_precision


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


@dataclass
class StudyData:
    """What every step of a study reads: the real splits, the pools, the classifier settings."""

    ev: EvaluationSection
    ingest_dir: Path
    real: object  # SplitData: images (N, C, H, W) in [-1, 1], labels (N,), rows
    val: object
    test: object
    classes: list[str]
    cfg: ClassifierConfig
    pools: dict
    train_fraction: float

    @property
    def k(self) -> int:
        return len(self.classes)


@dataclass
class Unit:
    """One arm: every seed of one classifier fit on one training set (an independent work item).

    ``build()`` returns the training set ``(x (N, C, H, W), y (N,))``; it is made only when the
    unit is fitted.
    """

    arm: str
    build: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    n_extra: int = 0
    augment: bool = False
    tags: dict = field(default_factory=dict)
    control: str | None = None  # the duplicate control it is compared with, if not the ratio's


def load_study(
    ingest_dir: str | Path,
    generate_dir: str | Path,
    ev: EvaluationSection,
    *,
    train_fraction: float = 1.0,
    fraction_seed: int = 0,
) -> StudyData:
    """Step 1: the real train (fraction) / val / test splits and the pools named in ``ev``."""
    real = load_split(ingest_dir, "train", train_fraction, fraction_seed)
    classes = real.classes
    size, channels = real.images.shape[-1], real.images.shape[1]
    cfg = ClassifierConfig(**ev.classifier.model_dump())
    cfg.precision = resolve_precision(cfg.precision, cfg.device)  # summary names what ran
    pools = {
        p: load_pool(Path(generate_dir) / p, classes, size, channels=channels) for p in ev.pools
    }
    return StudyData(
        ev,
        Path(ingest_dir),
        real,
        load_split(ingest_dir, "val"),
        load_split(ingest_dir, "test"),
        classes,
        cfg,
        pools,
        train_fraction,
    )


def fit_unit(d: StudyData, unit: Unit) -> tuple[list[dict], list[np.ndarray], list, list]:
    """Step 3 (one work item): fit every seed of ``unit``; (result rows, test probabilities
    ``(N_test, K)`` per seed, the classifiers, validation probabilities ``(N_val, K)`` per seed:
    sweeps choose on these, never on test). Rows hold plain JSON values only, so a row read
    back from a shard file equals the one computed in process."""
    x, y = unit.build()
    clfs = fit_seeds(
        d.k,
        x.shape[1],
        ClassifierConfig(**dict(d.cfg.to_dict(), augment=unit.augment)),
        list(range(d.ev.seeds)),
        x,
        y,
        d.val.images,
        d.val.labels,
    )
    rows, probas, val_probas = [], [], []
    for seed, clf in enumerate(clfs):
        p = clf.predict_proba(d.test.images)
        probas.append(p)
        val_probas.append(clf.predict_proba(d.val.images))
        rows.append(
            {
                "arm": unit.arm,
                "seed": seed,
                "n_train": len(x),
                "n_extra": unit.n_extra,
                "best_epoch": clf.best_epoch,
                **unit.tags,
                **metrics(d.test.labels.numpy(), p, d.classes),
            }
        )
    return json.loads(json.dumps(rows, default=float)), probas, clfs, val_probas


def real_only_unit(d: StudyData) -> Unit:
    return Unit("real_only", lambda: (d.real.images, d.real.labels))


def extract_features(d: StudyData, extractor) -> tuple[dict, dict]:
    """Step 2: penultimate-layer features (``{name: (N, F) float32}``) of the real train,
    real held-out and every pool, and the extractor's confidence in each pool sample's label."""
    feats = {
        "real_train": extractor.features(d.real.images),
        "real_holdout": extractor.features(torch.cat([d.val.images, d.test.images])),
    }
    conf = {}  # the real-only classifier's probability of each sample's own label
    for name, pool in d.pools.items():
        feats[f"pool:{name}"] = extractor.features(pool.images)
        idx = np.arange(len(pool.labels))
        conf[name] = extractor.predict_proba(pool.images)[idx, pool.labels.numpy()]
    return feats, conf


def plan_units(d: StudyData, feats: dict, conf: dict) -> tuple[list[Unit], list[tuple]]:
    """Every arm of the study in a fixed order (``real_only`` first), and the synthetic
    variants ``(arm key, pool, selector, ratio, selected indices)`` for the fidelity step."""
    ev, real, k = d.ev, d.real, d.k
    units, variants = [real_only_unit(d)], []
    arms = set(ev.arms)
    edited = {n for n, p in d.pools.items() if is_edit_pool(p.rows)}
    if "classical_aug" in arms:
        units.append(Unit("classical_aug", lambda: (real.images, real.labels), augment=True))
    for ratio in ev.ratios:
        counts = class_counts(real.labels, k, ratio, ev.class_mix)
        if "duplicate_control" in arms:
            dup_rng = np.random.default_rng(1000 + int(ratio * 1000))
            dup = _pick_per_class(
                real.labels, counts, lambda idx, m, c, r=dup_rng: r.integers(0, len(idx), m)
            )
            units.append(
                Unit(
                    f"duplicate_control@{ratio:g}",
                    lambda dup=dup: (
                        torch.cat([real.images, real.images[dup]]),
                        torch.cat([real.labels, real.labels[dup]]),
                    ),
                    len(dup),
                    tags={"ratio": ratio},
                )
            )
        for name in sorted(edited):
            units += _edit_units(d, name, counts, ratio, arms, variants)
        if "synthetic" not in arms:
            continue
        for name, pool in d.pools.items():
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
                units.append(
                    Unit(
                        key,
                        lambda pool=pool, chosen=chosen: (
                            torch.cat([real.images, pool.images[chosen]]),
                            torch.cat([real.labels, pool.labels[chosen]]),
                        ),
                        len(chosen),
                        tags={"pool": name, "selector": sel, "ratio": ratio},
                    )
                )
    if "synthetic_only" in arms:
        counts = class_counts(real.labels, k, 1.0, ev.class_mix)
        for name, pool in d.pools.items():
            if name in edited:
                continue
            chosen = _pick_per_class(
                pool.labels,
                counts,
                lambda idx, m, c: np.random.default_rng(c).permutation(len(idx))[:m],
            )
            units.append(
                Unit(
                    f"synthetic_only:{name}",
                    lambda pool=pool, chosen=chosen: (pool.images[chosen], pool.labels[chosen]),
                    len(chosen),
                    tags={"pool": name},
                )
            )
    return units, variants


def _edit_units(
    d: StudyData, name: str, counts: list[int], ratio: float, arms: set, variants: list
) -> list[Unit]:
    """The ``variations`` / ``counterfactual`` arms of one edited pool at one ratio, each with
    the count-matched duplicate control it is compared with (its own when the pool cannot fill
    the ratio's per-class counts). Appends their variants (random selection) to ``variants``."""
    real, pool, k, units = d.real, d.pools[name], d.k, []
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
        control = f"duplicate_control@{ratio:g}"
        if got != counts or "duplicate_control" not in arms:
            # The pool cannot fill every class: a control with the very same counts.
            control = f"duplicate_control:{key}"
            dup_rng = np.random.default_rng(2000 + int(ratio * 1000))
            dup = _pick_per_class(
                real.labels, got, lambda ii, m, c, r=dup_rng: r.integers(0, len(ii), m)
            )
            units.append(
                Unit(
                    control,
                    lambda dup=dup: (
                        torch.cat([real.images, real.images[dup]]),
                        torch.cat([real.labels, real.labels[dup]]),
                    ),
                    len(dup),
                    tags={"ratio": ratio},
                )
            )
        variants.append((key, name, "random", ratio, chosen))
        units.append(
            Unit(
                key,
                lambda chosen=chosen: (
                    torch.cat([real.images, pool.images[chosen]]),
                    torch.cat([real.labels, pool.labels[chosen]]),
                ),
                len(chosen),
                tags={"pool": name, "selector": "random", "ratio": ratio},
                control=control,
            )
        )
    return units
