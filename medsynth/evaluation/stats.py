"""Classification metrics and paired bootstrap confidence intervals (scikit-learn underneath)."""

from __future__ import annotations

import numpy as np
from scipy import stats as sps
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, roc_auc_score


def auc_score(y: np.ndarray, proba: np.ndarray, num_classes: int) -> float:
    """ROC AUC: binary on p(class 1), else one-vs-rest macro. NaN if a class is absent."""
    if len(np.unique(y)) < 2:
        return float("nan")
    if num_classes == 2:
        return float(roc_auc_score(y, proba[:, 1]))
    return float(
        roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=list(range(num_classes)))
    )


def _binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC with ties averaged (equals sklearn's roc_auc_score)."""
    ranks = sps.rankdata(score)
    pos = y == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _ovr_macro_auc(y: np.ndarray, proba: np.ndarray, k: int) -> float:
    """One-vs-rest macro AUC over ``k`` classes (equals sklearn's ``multi_class="ovr"``).

    A bootstrap resample may miss a class: sklearn then raises; here the mean is over the
    classes present (NaN if fewer than two), so a replicate is not thrown away.
    """
    present = [c for c in range(k) if 0 < (y == c).sum() < len(y)]
    if len(present) < 2:
        return float("nan")
    return float(np.mean([_binary_auc((y == c).astype(int), proba[:, c]) for c in present]))


def fast_metric(name: str, y: np.ndarray, proba: np.ndarray, k: int) -> float:
    """``auc``, ``accuracy`` or ``balanced_accuracy`` without sklearn's per-call overhead.

    sklearn's input validation costs ~ms per call, which dominated a 3-class sweep's
    paired bootstrap (1,000 replicates x seeds x arms); these paths are pure NumPy.
    """
    if name == "auc":
        return _binary_auc(y, proba[:, 1]) if k == 2 else _ovr_macro_auc(y, proba, k)
    pred = proba.argmax(1)
    if name == "accuracy":
        return float((pred == y).mean())
    if name == "balanced_accuracy":
        present = np.unique(y)
        return float(np.mean([(pred[y == c] == c).mean() for c in present]))
    raise ValueError(f"no fast path for metric {name!r}; use auc, accuracy or balanced_accuracy")


def metrics(y: np.ndarray, proba: np.ndarray, classes: list[str]) -> dict[str, float]:
    """AUC, accuracy, balanced accuracy and per-class sensitivity / specificity."""
    k = len(classes)
    pred = proba.argmax(1)
    out = {
        "auc": auc_score(y, proba, k),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
    }
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    for i, c in enumerate(classes):
        tp, fn = cm[i, i], cm[i].sum() - cm[i, i]
        fp = cm[:, i].sum() - tp
        tn = cm.sum() - tp - fn - fp
        out[f"sensitivity_{c}"] = float(tp / (tp + fn)) if tp + fn else float("nan")
        out[f"specificity_{c}"] = float(tn / (tn + fp)) if tn + fp else float("nan")
    return out


def bootstrap_diffs(
    y: np.ndarray,
    proba_arm,
    proba_base,
    metric: str,
    k: int,
    n_boot: int,
    rng: np.random.Generator,
) -> tuple[float, list[float]]:
    """Point difference arm - base of ``metric`` (mean over seeds) and its paired replicates.

    ``proba_arm[s]``, ``proba_base[s]``: ``(N, K)`` test probabilities of seed ``s``. Each
    replicate resamples seeds (pairs kept) and test cases (the same for both arms), as
    ``bootstrap_contrast`` does for any weighted sum of arms.
    """
    return bootstrap_contrast(y, [(1.0, proba_arm), (-1.0, proba_base)], metric, k, n_boot, rng)


def bootstrap_contrast(
    y: np.ndarray,
    terms: list[tuple[float, object]],
    metric: str,
    k: int,
    n_boot: int,
    rng: np.random.Generator,
) -> tuple[float, list[float]]:
    """Point value of ``sum_i w_i * metric(arm_i)`` (each metric a mean over seeds) and its
    paired replicates.

    ``terms``: ``(w_i, proba_i)`` with ``proba_i[s]`` the ``(N, K)`` test probabilities of seed
    ``s``, paired by seed across terms. Each replicate resamples seeds and test cases, the same
    for every term; a resample with one class only is skipped (the metric is undefined there).
    """
    n, s = len(y), len(terms[0][1])

    def value(seeds: np.ndarray, idx: np.ndarray) -> float:
        yi = y[idx]
        return float(
            sum(
                w * np.mean([fast_metric(metric, yi, a[j][idx], k) for j in seeds])
                for w, a in terms
            )
        )

    point = value(np.arange(s), np.arange(n))
    reps = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if len(np.unique(y[idx])) < 2:
            continue
        reps.append(value(rng.integers(0, s, s), idx))
    return point, reps


def paired_bootstrap_diff(
    y: np.ndarray,
    proba_arm: list[np.ndarray],
    proba_base: list[np.ndarray],
    metric: str,
    classes: list[str],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean difference arm - base of ``metric`` with a paired 95 % bootstrap CI.

    ``proba_arm[s]`` and ``proba_base[s]`` are ``(N, K)`` test probabilities of classifier
    seed ``s`` (paired by seed). Each replicate resamples seeds (pairs kept) and test cases
    (the same cases for both arms), so the CI covers seed and test-set variability.
    """
    rng = np.random.default_rng(seed)
    s = len(proba_arm)
    if s != len(proba_base) or s == 0:
        raise ValueError("arm and baseline need the same, non-zero number of seeds")

    point, reps = bootstrap_diffs(y, proba_arm, proba_base, metric, len(classes), n_boot, rng)
    lo, hi = np.percentile(reps, [2.5, 97.5]) if reps else (float("nan"), float("nan"))
    return {
        "diff": point,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "n_boot": len(reps),
        "seeds": s,
    }


def spearman_with_ci(
    x: np.ndarray, y: np.ndarray, n_boot: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Spearman rho of paired values with a percentile bootstrap 95 % CI (resampling pairs)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return {"rho": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": len(x)}
    rho = float(sps.spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        if len(np.unique(x[i])) > 1 and len(np.unique(y[i])) > 1:
            reps.append(sps.spearmanr(x[i], y[i]).statistic)
    lo, hi = np.percentile(reps, [2.5, 97.5]) if reps else (float("nan"), float("nan"))
    return {"rho": rho, "ci_low": float(lo), "ci_high": float(hi), "n": len(x)}
