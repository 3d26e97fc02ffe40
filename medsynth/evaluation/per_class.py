"""Per-class quality: each class's synthetic images against the real images of that class.

An average over classes hides a collapsed class (issue 18: the pneumonia samples of a model
whose overall figures looked fine were smooth, alike grey fields). So every place that reports
quality also reports, per class: FD_clf, precision, recall, coverage, MS-SSIM ratio and mean
intensity, plus a ``collapsed`` flag when a class's FD_clf *over its real floor* is more than
``COLLAPSE_FD_FACTOR`` times the best class's (taken as no lower than 1, what real images
score), or its MS-SSIM ratio exceeds ``COLLAPSE_MSSSIM`` (less diverse than real). Fewer than
``MIN_IMAGES`` synthetic or real images give "n too small", not a number.

Raw FD_clf cannot be compared across classes: it grows as n shrinks and with the spread of a
class in the extractor's feature space. On PneumoniaMNIST, *real* train images against real test
images give FD_clf 10.7 for normal and 0.08 for pneumonia. So each class's FD is divided by the
FD between two disjoint halves of its own real images at the same n (``FD_clf_over_real``,
about 1 for real data whatever the class), and classes are compared on that.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from medsynth.evaluation.fidelity import fd, fidelity_diversity

MIN_IMAGES = 10  # below this many images on either side, a per-class figure is noise
COLLAPSE_FD_FACTOR = 1.5  # FD_clf above this multiple of the best class's = collapsed
# MS-SSIM ratio above this = synthetic images more alike than real ones. The target is <= 1.0;
# the flag allows 0.1 because 500 pairs of a few dozen real images already vary that much
# (real train normals against themselves: 1.19 at n = 37).
COLLAPSE_MSSSIM = 1.1
# Random half-splits summed into the floor (and the synthetic draws against them). With 3, one
# pool's reading of PneumoniaMNIST normals (121 per half) moved 1.1-2.8x with the rng seed alone;
# with 100, 1.5-1.8x (docs/results.md, fourteenth session).
FLOOR_REPEATS = 100
TOO_SMALL = "n too small"

# (key in the metrics dict, column title): what tables and CSVs show, in order.
COLUMNS = (
    ("FD_clf", "FD_clf"),
    ("precision_clf", "precision"),
    ("recall_clf", "recall"),
    ("coverage_clf", "coverage"),
    ("msssim_ratio", "MS-SSIM ratio"),
    ("mean_intensity_synthetic", "mean int. syn"),
    ("mean_intensity_real", "mean int. real"),
)


def class_metrics(
    real_feats: np.ndarray,
    fake_feats: np.ndarray,
    real_imgs: torch.Tensor,
    fake_imgs: torch.Tensor,
    seed: int = 0,
) -> dict:
    """:func:`fidelity_diversity` of one class, or only the counts and ``too_small`` when either
    side has fewer than ``MIN_IMAGES`` images. Features ``(N, D)``; images ``(N, C, H, W)``
    in [-1, 1]; intensities are reported in [0, 1]."""
    n_real, n_syn = len(real_feats), len(fake_feats)
    if min(n_real, n_syn) < MIN_IMAGES:
        return {"n_real": n_real, "n_synthetic": n_syn, "too_small": True}
    out = fidelity_diversity(real_feats, fake_feats, real_imgs, fake_imgs, seed=seed)
    out["FD_clf_over_real"] = fd_over_real(real_feats, fake_feats, seed)
    return out


def fd_over_real(real_feats: np.ndarray, fake_feats: np.ndarray, seed: int = 0) -> float:
    """FD_clf of synthetic vs real over FD_clf of real vs real, all at the same n.

    ``n = min(n_synthetic, n_real // 2)``; real images are split into two disjoint halves A and
    B, and ``FD(A, synthetic) / FD(A, B)`` is averaged (sums of ``FLOOR_REPEATS`` draws). About 1
    when the synthetic class is as close to the real one as other real images are; NaN when a
    half would hold fewer than ``MIN_IMAGES`` images.
    """
    m = min(len(fake_feats), len(real_feats) // 2)
    if m < MIN_IMAGES:
        return float("nan")
    rng = np.random.default_rng(seed)
    num = den = 0.0
    for _ in range(FLOOR_REPEATS):
        perm = rng.permutation(len(real_feats))
        a, b = real_feats[perm[:m]], real_feats[perm[m : 2 * m]]
        f = fake_feats[rng.permutation(len(fake_feats))[:m]]
        num, den = num + fd(a, f), den + fd(a, b)
    return num / max(den, 1e-12)


def _finite(v) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def flag_collapsed(per: dict[str, dict], classes: list[str]) -> dict[str, dict]:
    """Mark each class entry of ``per`` (class name -> metrics; ``all`` is left alone) in place.

    Adds ``FD_clf_vs_best`` (the class's FD_clf over its real floor, divided by the lowest such
    ratio among measured classes but never by less than 1, what real images score; raw FD_clf
    where no floor could be measured), ``collapsed`` (bool) and ``collapse_reasons`` (list of
    str). A ``too_small`` class is neither flagged nor counted as the best. Returns ``per``.
    """
    measured = [c for c in classes if c in per and not per[c].get("too_small")]
    key = (
        "FD_clf_over_real"
        if measured and all(_finite(per[c].get("FD_clf_over_real")) for c in measured)
        else "FD_clf"
    )
    vals = [per[c][key] for c in measured if _finite(per[c].get(key))]
    # FD can be ~0 for a perfect class; a floor keeps the ratio finite without hiding collapse.
    best = max(min(vals), 1e-6) if vals else None
    # Over its real floor no class beats real images (1.0); a lower reading is FD's noise at
    # small n, and dividing by it would flag a class that is as close as real images.
    floored = key == "FD_clf_over_real" and best is not None and best < 1.0
    if floored:
        best = 1.0
    for c in measured:
        m, reasons = per[c], []
        v, ms = m.get(key), m.get("msssim_ratio")
        if best is not None and _finite(v):
            m["FD_clf_vs_best"] = v / best
            if len(vals) > 1 and v > COLLAPSE_FD_FACTOR * best:
                what = "FD_clf over its real floor" if key == "FD_clf_over_real" else "FD_clf"
                than = "real images' 1.0" if floored else "the best class's"
                reasons.append(f"{what} {v:.2f}, {v / best:.1f}x {than}")
        if _finite(ms) and ms > COLLAPSE_MSSSIM:
            reasons.append(f"MS-SSIM ratio {ms:.2f} > {COLLAPSE_MSSSIM:g} (less diverse than real)")
        m["collapsed"], m["collapse_reasons"] = bool(reasons), reasons
    return per


def cell(m: dict, key: str, digits: int = 3) -> str:
    """One table cell: the number, "n too small", or "—" when not measured."""
    if m.get("too_small"):
        return TOO_SMALL
    v = m.get(key)
    return f"{v:.{digits}f}" if _finite(v) else "—"


def flag_text(m: dict) -> str:
    if m.get("too_small"):
        return f"{TOO_SMALL} ({m.get('n_synthetic', 0)} synthetic, {m.get('n_real', 0)} real)"
    return "COLLAPSED: " + "; ".join(m["collapse_reasons"]) if m.get("collapsed") else "ok"


def per_class_rows(fidelity: dict[str, dict], classes: list[str]) -> list[dict]:
    """Flat rows for ``per_class_quality.csv``: one per (synthetic set, class)."""
    rows = []
    for key, per in fidelity.items():
        for c in classes:
            if c not in per:
                continue
            m = per[c]
            row = {"set": key, "class": c, "n_real": m["n_real"], "n_synthetic": m["n_synthetic"]}
            row.update({k: TOO_SMALL if m.get("too_small") else m.get(k) for k, _ in COLUMNS})
            row["collapsed"] = bool(m.get("collapsed"))
            row["flag"] = flag_text(m)
            rows.append(row)
    return rows


def per_class_lines(per: dict[str, dict], classes: list[str], indent: str = "  ") -> list[str]:
    """A fixed-width text table of one synthetic set (for ``medsynth show`` and benchmarks)."""
    head = f"{indent}{'class':<14}{'n syn/real':>11}" + "".join(f"{t:>15}" for _, t in COLUMNS)
    lines = [head + "  flag"]
    for c in classes:
        if c not in per:
            continue
        m = per[c]
        n = f"{m['n_synthetic']}/{m['n_real']}"
        # A too-small class gets one "n too small" in the flag column, not one per metric.
        vals = "".join(f"{'' if m.get('too_small') else cell(m, k):>15}" for k, _ in COLUMNS)
        lines.append(f"{indent}{c[:13]:<14}{n:>11}{vals}  {flag_text(m)}")
    return lines


def collapsed_classes(fidelity: dict[str, dict], classes: list[str]) -> dict[str, list[str]]:
    """Synthetic set -> the classes flagged collapsed in it (sets without any left out)."""
    out = {}
    for key, per in fidelity.items():
        bad = [c for c in classes if per.get(c, {}).get("collapsed")]
        if bad:
            out[key] = bad
    return out
