"""Statistics across the configurations of a sweep: tests, multiplicity, correlation, power.

A sweep compares many synthetic configurations with the same baselines, so a raw 95 % CI per
configuration finds a "significant" one by chance. This module gives every configuration a
paired bootstrap p-value, adjusts them across configurations (Holm: family-wise error; BH: false
discovery rate), correlates diversity with uplift (Spearman, and partial Spearman holding the
fidelity metrics fixed, since guidance moves diversity and fidelity together), and says how
small an effect the design could have detected (MDE) wherever it reports "no effect".
"""

from __future__ import annotations

import numpy as np
from scipy import stats as sps

from medsynth.evaluation.stats import bootstrap_contrast, bootstrap_diffs


def paired_bootstrap_test(
    y: np.ndarray,
    proba_arm: np.ndarray,
    proba_base: np.ndarray,
    metric: str = "auc",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean difference arm - base with a paired bootstrap 95 % CI, SE and two-sided p-value.

    ``proba_arm``, ``proba_base``: ``(S, N, K)`` test probabilities, paired by classifier seed
    ``s``; ``y``: ``(N,)`` integer labels. Each replicate resamples seeds (pairs kept) and test
    cases (the same for both arms), as ``stats.paired_bootstrap_diff`` does. The p-value is the
    bootstrap share on the far side of zero, doubled, floored at ``1 / (replicates + 1)``.
    """
    proba_arm, proba_base = np.asarray(proba_arm), np.asarray(proba_base)
    if proba_arm.shape != proba_base.shape or proba_arm.ndim != 3:
        raise ValueError(
            f"arm and baseline need the same (seeds, cases, classes) shape; got "
            f"{proba_arm.shape} and {proba_base.shape}"
        )
    k = proba_arm.shape[2]
    rng = np.random.default_rng(seed)
    return _summary(*bootstrap_diffs(y, proba_arm, proba_base, metric, k, n_boot, rng))


def _summary(point: float, reps: list[float]) -> dict[str, float]:
    """Point estimate, percentile 95 % CI, SE and two-sided p (the bootstrap share on the far
    side of zero, doubled, floored at ``1 / (replicates + 1)``); NaN without replicates."""
    reps = np.asarray(reps)
    if not len(reps):
        nan = float("nan")
        return {"diff": point, "ci_low": nan, "ci_high": nan, "se": nan, "p": nan, "n_boot": 0}
    lo, hi = np.percentile(reps, [2.5, 97.5])
    tail = min((reps <= 0).mean(), (reps >= 0).mean())
    return {
        "diff": point,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "se": float(reps.std(ddof=1)),
        "p": float(min(1.0, max(2 * tail, 1 / (len(reps) + 1)))),
        "n_boot": len(reps),
    }


def contrast_test(
    y: np.ndarray,
    terms: list[tuple[float, np.ndarray]],
    metric: str = "auc",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """A weighted sum of arms' metrics, sum_i w_i * metric(arm_i), with a paired bootstrap.

    ``terms``: ``(w_i, proba_i)`` with ``proba_i`` ``(S, N, K)`` test probabilities, paired by
    classifier seed ``s`` across terms; the metric is averaged over seeds. Each replicate
    resamples seeds and test cases, the same for every term. E.g. ``[(1, a), (-1, b)]`` is
    ``paired_bootstrap_test(y, a, b)``. Returns what that returns.
    """
    live = [(w, np.asarray(a)) for w, a in terms if w != 0]
    shapes = {a.shape for _, a in live}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"terms need one (seeds, cases, classes) shape; got {shapes or 'none'}")
    k = live[0][1].shape[2]
    rng = np.random.default_rng(seed)
    return _summary(*bootstrap_contrast(y, live, metric, k, n_boot, rng))


def holm(p: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (family-wise error), same order as ``p``; NaN kept."""
    p = np.asarray(p, float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if not m:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adj, 1.0)
    return out


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (false discovery rate), same order as ``p``."""
    p = np.asarray(p, float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if not m:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = p[order] * m / np.arange(1, m + 1)
    adj = np.minimum.accumulate(adj[::-1])[::-1]
    out[order] = np.minimum(adj, 1.0)
    return out


def minimal_detectable_effect(
    se: float, alpha: float = 0.05, power: float = 0.8, comparisons: int = 1
) -> float:
    """Smallest true difference found with probability ``power`` by a two-sided test at level
    ``alpha / comparisons`` (Bonferroni, the first step of Holm) when the estimate has standard
    error ``se``: ``(z_{1 - alpha / 2m} + z_power) * se``. Same unit as ``se`` (e.g. AUC)."""
    if not np.isfinite(se):
        return float("nan")
    z = sps.norm.ppf(1 - alpha / (2 * max(comparisons, 1))) + sps.norm.ppf(power)
    return float(z * se)


def _residual_ranks(v: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Ranks of ``v`` (``(..., n)``) minus their least-squares fit on an intercept and the ranks
    of ``z`` (``(..., n, q)``); batched over leading axes."""
    rv = sps.rankdata(v, axis=-1)
    rz = sps.rankdata(z, axis=-2) if z.shape[-1] else z
    design = np.concatenate([np.ones((*v.shape, 1)), rz], axis=-1)
    coef = np.linalg.pinv(design) @ rv[..., None]
    return rv - (design @ coef)[..., 0]


def _rowwise_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 1e-12, (a * b).sum(-1) / den, np.nan)


def partial_spearman(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Spearman correlation of ``x`` and ``y`` holding ``z`` fixed: the Pearson correlation of
    the residual ranks after regressing each on the ranks of ``z`` (``(n,)`` or ``(n, q)``)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    z = np.asarray(z, float).reshape(len(x), -1)
    return float(_rowwise_corr(_residual_ranks(x, z), _residual_ranks(y, z)))


def partial_spearman_with_ci(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> dict[str, float]:
    """``partial_spearman`` with a percentile bootstrap 95 % CI (resampling configurations).
    With ``z`` of zero columns this is the plain Spearman rho with its CI."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    z = np.asarray(z, float).reshape(len(x), -1)
    ok = np.isfinite(x) & np.isfinite(y) & np.isfinite(z).all(1)
    x, y, z = x[ok], y[ok], z[ok]
    nan = float("nan")
    if len(x) < z.shape[1] + 3:
        return {"rho": nan, "ci_low": nan, "ci_high": nan, "n": len(x)}
    i = np.random.default_rng(seed).integers(0, len(x), (n_boot, len(x)))
    # All replicates at once: (B, n) ranks, batched least squares, row-wise correlation.
    reps = _rowwise_corr(_residual_ranks(x[i], z[i]), _residual_ranks(y[i], z[i]))
    reps = reps[np.isfinite(reps)]
    lo, hi = np.percentile(reps, [2.5, 97.5]) if len(reps) else (nan, nan)
    return {
        "rho": partial_spearman(x, y, z),
        "ci_low": float(lo),
        "ci_high": float(hi),
        "n": len(x),
    }


def adjust_table(rows: list[dict], prefix: str) -> None:
    """Add ``{prefix}_p_holm`` and ``{prefix}_p_bh`` to each row from ``{prefix}_p``, in place."""
    p = np.array([r.get(f"{prefix}_p", np.nan) for r in rows], float)
    for r, h, b in zip(rows, holm(p), benjamini_hochberg(p), strict=True):
        r[f"{prefix}_p_holm"], r[f"{prefix}_p_bh"] = float(h), float(b)


def diversity_vs_uplift(
    rows: list[dict],
    diversity_keys: tuple[str, ...],
    fidelity_keys: tuple[str, ...] = ("FD_clf", "precision_clf"),
    uplift_key: str = "auc_vs_dup",
    n_boot: int = 2000,
) -> dict[str, dict]:
    """Spearman rho (with CI) of each diversity metric against uplift across configurations, and
    the partial rho holding the fidelity metrics fixed. ``rows``: one dict per configuration."""
    y = np.array([r.get(uplift_key, np.nan) for r in rows], float)
    z = np.array([[r.get(f, np.nan) for f in fidelity_keys] for r in rows], float)
    out = {}
    for m in diversity_keys:
        x = np.array([r.get(m, np.nan) for r in rows], float)
        rec = {"spearman": partial_spearman_with_ci(x, y, np.zeros((len(x), 0)), n_boot)}
        others = [i for i, f in enumerate(fidelity_keys) if f != m]  # never hold x itself fixed
        rec["partial"] = partial_spearman_with_ci(x, y, z[:, others], n_boot=n_boot)
        rec["held_fixed"] = [fidelity_keys[i] for i in others]
        out[m] = rec
    return out


def verdict(diff: float, ci_low: float, ci_high: float, p_adj: float, mde: float) -> str:
    """One phrase: a helped/hurt call survives the adjusted p-value; otherwise the MDE is given."""
    if np.isfinite(p_adj) and p_adj < 0.05:
        return f"{'helps' if diff > 0 else 'hurts'} ({diff:+.3f}, adjusted p={p_adj:.3g})"
    if ci_low > 0 or ci_high < 0:
        # The raw CI excludes 0 but the adjusted p does not: say so rather than hide it.
        return (
            f"not significant after adjustment (raw CI [{ci_low:+.3f}, {ci_high:+.3f}], "
            f"adjusted p={p_adj:.3g}; MDE {mde:.3f})"
        )
    return f"no effect detected (MDE {mde:.3f}; CI [{ci_low:+.3f}, {ci_high:+.3f}])"


def distinguishable(best: dict, second: dict, key: str = "auc_vs_dup") -> bool:
    """Whether the best configuration's uplift is above the runner-up's by more than both CIs'
    overlap allows (a conservative check: the two 95 % CIs do not overlap)."""
    return bool(best[f"{key}_ci_low"] > second[f"{key}_ci_high"])
