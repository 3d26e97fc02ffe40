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

from medsynth.evaluation.edit_arms import edit_audit_fields, is_edit_pool
from medsynth.evaluation.fidelity import fidelity_diversity
from medsynth.evaluation.health import classifier_health
from medsynth.evaluation.memorization import audit
from medsynth.evaluation.per_class import class_metrics, flag_collapsed, per_class_rows
from medsynth.evaluation.stats import paired_bootstrap_diff, spearman_with_ci
from medsynth.evaluation.units import (
    StudyData,
    Unit,
    class_counts,
    extract_features,
    fit_unit,
    load_study,
    plan_units,
    real_only_unit,
)
from medsynth.evaluation.views import (
    VIEW_ATTRIBUTE,
    gap_difference,
    usable_views,
    view_aucs,
    within_view_uplift,
)
from medsynth.protocol import EvaluationSection
from medsynth.utils.csvsafe import write_rows

UPLIFT_METRICS = ("auc", "balanced_accuracy")
__all__ = ["DIVERSITY_KEYS", "UPLIFT_METRICS", "analyse", "class_counts", "run_study"]
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
    """Run every arm x seed, the statistics and the audits; write tidy files into ``out_dir``.

    A pipeline: load -> fit real-only (seed 0 is the extractor) -> features -> plan the arms ->
    fit each arm -> analyse. :mod:`medsynth.evaluation.shards` runs the fits as shards.
    """
    t0 = time.perf_counter()
    d = load_study(
        ingest_dir, generate_dir, ev, train_fraction=train_fraction, fraction_seed=fraction_seed
    )
    bar = tqdm(desc="classifiers", unit="fit", disable=not progress)
    first = fit_unit(d, real_only_unit(d))
    bar.update(ev.seeds)
    feats, conf = extract_features(d, first[2][0])
    units, variants = plan_units(d, feats, conf)
    results = {"real_only": (first[0], first[1], first[3])}
    for unit in units[1:]:
        rows, probas, _, val_probas = fit_unit(d, unit)
        results[unit.arm] = (rows, probas, val_probas)
        bar.update(ev.seeds)
    bar.close()
    return analyse(d, out_dir, feats, units, results, variants, t0)


def analyse(
    data: StudyData,
    out_dir: str | Path,
    feats: dict,
    units: list[Unit],
    results: dict[str, tuple[list[dict], list[np.ndarray], list[np.ndarray]]],
    variants: list[tuple],
    t0: float,
) -> dict:
    """Last step: uplift statistics, fidelity/diversity, memorization; write ``out_dir``.

    ``results``: arm -> (rows, test probabilities per seed, validation probabilities per seed),
    taken in ``units`` order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev, real, val, test, classes = data.ev, data.real, data.val, data.test, data.classes
    cfg, pools = data.cfg, data.pools
    y_test = test.labels.numpy()
    np.savez_compressed(
        out / "features.npz", **{k_.replace(":", "_"): v for k_, v in feats.items()}
    )
    edited = {n for n, p in pools.items() if is_edit_pool(p.rows)}
    dup_of = {u.arm: u.control for u in units if u.control}  # edit arms' own controls
    rows, probas, val_probas = [], {}, {}
    for unit in units:
        r, ps, vps = results[unit.arm]
        rows.extend(r)
        probas[unit.arm], val_probas[unit.arm] = list(ps), list(vps)

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
            dup = control_of(arm, dup_of)
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

    # 2b. Within-view AUC (e.g. AP vs PA) where the test split records a view: a shortcut
    # through the view cannot raise an AUC computed among cases of one view.
    test_views = np.array([str(r.get(VIEW_ATTRIBUTE) or "") for r in test.rows])
    views = within_view_report(y_test, probas, test_views, ev.bootstrap, dup_of)

    # 3. Fidelity / diversity of each selected set (per class and overall), memorization per pool.
    rng = np.random.default_rng(0)
    cap = ev.metric_samples

    def capped(idx: np.ndarray) -> np.ndarray:
        return idx if len(idx) <= cap else rng.choice(idx, cap, replace=False)

    fidelity = {}
    for key, name, _sel, _ratio, chosen in variants:
        pool, pf = pools[name], feats[f"pool:{name}"]
        per = {}
        for c, cname in [(None, "all")] + list(enumerate(classes)):
            ri = capped(
                np.arange(len(real.labels))
                if c is None
                else np.flatnonzero(real.labels.numpy() == c)
            )
            fi = capped(chosen if c is None else chosen[pool.labels.numpy()[chosen] == c])
            if c is not None:
                # Per class: "n too small" below MIN_IMAGES instead of a noisy number.
                per[cname] = class_metrics(
                    feats["real_train"][ri], pf[fi], real.images[ri], pool.images[fi]
                )
            elif len(fi) >= 2 and len(ri) >= 2:
                per[cname] = fidelity_diversity(
                    feats["real_train"][ri], pf[fi], real.images[ri], pool.images[fi]
                )
        fidelity[key] = flag_collapsed(per, classes)
    memo = {}
    holdout_px = torch.cat([val.images, test.images]).numpy()
    # Held-out near-copies of train images are left out of calibration, at the ingest threshold.
    ingest_summary = json.loads((data.ingest_dir / "summary.json").read_text())
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
        "train_fraction": data.train_fraction,
        "n_real_train": len(real.labels),
        "n_val": len(val.labels),
        "n_test": len(test.labels),
        "classifier": cfg.to_dict(),
        "seeds": ev.seeds,
        "extractor": f"{cfg.kind} real-only seed 0 (penultimate layer)",
        "warnings": classifier_health(rows, cfg.epochs, feats["real_train"]),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    # Test and validation probabilities per arm (seeds stacked) for statistics across studies:
    # a sweep chooses configurations on validation and reports them on test.
    np.savez_compressed(
        out / "probas.npz",
        y_test=y_test,
        y_val=val.labels.numpy(),
        test_views=test_views,
        arms=np.array(list(probas)),
        **{f"arm_{i}": np.stack(ps) for i, ps in enumerate(probas.values())},
        **{f"val_arm_{i}": np.stack(val_probas[a]) for i, a in enumerate(probas)},
    )
    _write_csv(out / "runs.csv", rows)
    _write_csv(out / "uplift.csv", uplift)
    _write_csv(out / "per_class_quality.csv", per_class_rows(fidelity, classes))
    for fname, obj in (
        ("fidelity.json", fidelity),
        ("memorization.json", memo),
        ("diversity_uplift.json", div_up),
        ("views.json", views),
        ("summary.json", summary),
    ):
        (out / fname).write_text(json.dumps(obj, indent=2, default=float))
    return {
        "summary": summary,
        "uplift": uplift,
        "fidelity": fidelity,
        "diversity_uplift": div_up,
        "views": views,
        "memorization": {
            n: {
                k_: v
                for k_, v in m.items()
                if k_ not in ("per_sample", "synthetic_paths", "train_cache_rows")
            }
            for n, m in memo.items()
        },
    }


def control_of(arm: str, dup_of: dict[str, str]) -> str | None:
    """The duplicate control an arm is compared with: an edit arm's own (``dup_of``), the
    ratio's ``duplicate_control@r`` for a synthetic arm, else None."""
    if arm in dup_of:
        return dup_of[arm]
    return f"duplicate_control@{arm.rsplit('@', 1)[1]}" if arm.startswith("synthetic:") else None


def within_view_report(
    y: np.ndarray,
    probas: dict[str, list],
    views: np.ndarray,
    n_boot: int,
    dup_of: dict[str, str] | None = None,
) -> dict:
    """Per arm: AUC within each view and the gap of the first two views (e.g. AP - PA); per
    synthetic, edit or control arm: AUC uplift within each view and the change of the gap, vs
    real-only and vs its duplicate control (``dup_of``: an edit arm's own control; paired
    bootstrap CIs). ``{}`` when fewer than two views hold both classes."""
    vl = usable_views(y, views)
    if not vl:
        return {}
    out: dict = {"attribute": VIEW_ATTRIBUTE, "views": vl, "arms": {}}
    for arm, ps in probas.items():
        rec = view_aucs(y, np.stack(ps), views, vl)
        bases = [("real", "real_only")]
        dup = control_of(arm, dup_of or {})
        if dup:
            bases.append(("dup", dup))
        for tag, base in bases:
            if arm != base and base in probas:
                pa, pb = np.stack(ps), np.stack(probas[base])
                for v in vl:
                    rec["views"][v][f"auc_vs_{tag}"] = within_view_uplift(
                        y, pa, pb, views, v, n_boot
                    )
                rec["gap"][f"vs_{tag}"] = gap_difference(y, pa, pb, views, vl[:2], n_boot)
        out["arms"][arm] = rec
    return out


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    with path.open("w", newline="") as fh:
        write_rows(fh, cols, rows)  # arm and pool names may start like a spreadsheet formula
