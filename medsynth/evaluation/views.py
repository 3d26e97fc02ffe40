"""Within-view metrics: control a shortcut through an acquisition attribute (e.g. ViewPosition).

In the RSNA pneumonia set most positives are AP (bedside) views, so a classifier can score a
high AUC by recognising the view instead of the opacity. Its AUC *within* AP and *within* PA
cannot use that shortcut; the AP - PA gap shows how unequal the two are. Uplift of a synthetic
arm within each view (paired bootstrap, as the study's other CIs) says whether synthetic data
helps the diagnosis rather than the shortcut. Works on any attribute with a few discrete values.
"""

from __future__ import annotations

import numpy as np

from medsynth.evaluation.stats import auc_score, bootstrap_diffs, fast_metric

VIEW_ATTRIBUTE = "ViewPosition"


def usable_views(y: np.ndarray, views: np.ndarray, min_per_class: int = 2) -> list[str]:
    """Views (sorted) holding at least ``min_per_class`` cases of every class in ``y``.

    ``y``: ``(N,)`` int labels; ``views``: ``(N,)`` strings ("" = unknown, never a view).
    Fewer than two usable views -> ``[]`` (nothing to compare within).
    """
    y, views = np.asarray(y), np.asarray(views).astype(str)
    classes = np.unique(y)
    out = [
        v
        for v in sorted(set(views.tolist()) - {""})
        if all(((views == v) & (y == c)).sum() >= min_per_class for c in classes)
    ]
    return out if len(out) >= 2 else []


def view_aucs(y: np.ndarray, probas: np.ndarray, views: np.ndarray, view_list: list[str]) -> dict:
    """Per view: cases, positives, AUC per seed and its mean/sd; plus the gap of the first two
    views (``view_list[0] - view_list[1]``, e.g. AP - PA) per seed, mean and sd.

    ``probas``: ``(S, N, K)`` test probabilities of one arm's ``S`` seeds.
    """
    y, probas, views = np.asarray(y), np.asarray(probas), np.asarray(views).astype(str)
    k = probas.shape[2]
    out: dict = {"views": {}}
    per = {}
    for v in view_list:
        m = views == v
        per[v] = np.array([auc_score(y[m], p[m], k) for p in probas])
        out["views"][v] = {
            "n": int(m.sum()),
            "positives": int((y[m] > 0).sum()),
            "auc_per_seed": per[v].tolist(),
            "auc_mean": float(per[v].mean()),
            "auc_sd": float(per[v].std(ddof=1)) if len(per[v]) > 1 else 0.0,
        }
    if len(view_list) >= 2:
        a, b = view_list[:2]
        gap = per[a] - per[b]
        out["gap"] = {
            "views": f"{a} - {b}",
            "per_seed": gap.tolist(),
            "mean": float(gap.mean()),
            "sd": float(gap.std(ddof=1)) if len(gap) > 1 else 0.0,
        }
    return out


def within_view_uplift(
    y: np.ndarray,
    proba_arm: np.ndarray,
    proba_base: np.ndarray,
    views: np.ndarray,
    view: str,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """AUC difference arm - base among the cases of one view, with a paired bootstrap 95 % CI
    (seeds and that view's cases resampled together for both arms); ``(S, N, K)`` inputs."""
    m = np.asarray(views).astype(str) == view
    pa, pb = np.asarray(proba_arm)[:, m], np.asarray(proba_base)[:, m]
    k = pa.shape[2]
    point, reps = bootstrap_diffs(
        np.asarray(y)[m], pa, pb, "auc", k, n_boot, np.random.default_rng(seed)
    )
    reps = np.asarray(reps)
    if not len(reps):
        nan = float("nan")
        return {"diff": point, "ci_low": nan, "ci_high": nan, "n": int(m.sum())}
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return {"diff": float(point), "ci_low": float(lo), "ci_high": float(hi), "n": int(m.sum())}


def gap_difference(
    y: np.ndarray,
    proba_arm: np.ndarray,
    proba_base: np.ndarray,
    views: np.ndarray,
    pair: tuple[str, str],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Change of the view gap, arm - base: ``(AUC_a - AUC_b)[arm] - (AUC_a - AUC_b)[base]``
    for ``pair = (a, b)``, mean over seeds, with a paired bootstrap 95 % CI.

    Each replicate resamples seeds (pairs kept) and the cases of each view separately (the same
    cases for both arms), so the two views keep their sizes; a replicate in which either view
    holds one class only is skipped. Negative = the arm shrinks the gap (when a > b).
    ``(S, N, K)`` probabilities.
    """
    y, views = np.asarray(y), np.asarray(views).astype(str)
    pa, pb = np.asarray(proba_arm), np.asarray(proba_base)
    k = pa.shape[2]
    ia, ib = (np.flatnonzero(views == v) for v in pair)

    def change(seeds: np.ndarray, ca: np.ndarray, cb: np.ndarray) -> float:
        def gap(p: np.ndarray) -> float:
            return fast_metric("auc", y[ca], p[ca], k) - fast_metric("auc", y[cb], p[cb], k)

        return float(np.mean([gap(pa[j]) - gap(pb[j]) for j in seeds]))

    rng = np.random.default_rng(seed)
    point = change(np.arange(len(pa)), ia, ib)
    reps = []
    for _ in range(n_boot):
        ca, cb = rng.choice(ia, len(ia)), rng.choice(ib, len(ib))
        if len(np.unique(y[ca])) < 2 or len(np.unique(y[cb])) < 2:
            continue
        reps.append(change(rng.integers(0, len(pa), len(pa)), ca, cb))
    lo, hi = np.percentile(reps, [2.5, 97.5]) if reps else (float("nan"),) * 2
    return {"diff": point, "ci_low": float(lo), "ci_high": float(hi)}
