"""Memorization audit: is a synthetic image a copy of a training patient's image?

For every synthetic sample: nearest training image by pixel correlation (Pearson over pixels)
and by feature cosine. The flag threshold is calibrated on real data: the nearest-training
similarity of each *held-out* real image (val/test patients) shows how close an unseen but
genuine image comes by chance; a synthetic sample closer than the ``quantile`` of that
distribution is flagged. Exact copies (correlation >= 0.999) are counted separately.

Held-out images that are near-duplicates of a training image (pixel correlation >=
``exclude_threshold``: crops or repeat acquisitions that landed in another split) say nothing
about chance closeness; left in, they push the threshold to ~1 and blind the audit. They are left
out of the calibration set. Two criteria OR-ed flag more than ``1 - quantile`` of held-out
images, so the empirical held-out flag rate under the same rule is reported, and the audit calls
itself not informative when the threshold is degenerate or the calibration set too small.
"""

from __future__ import annotations

import numpy as np


def _unit_rows(x: np.ndarray, center: bool) -> np.ndarray:
    x = x.reshape(len(x), -1).astype(np.float32)
    if center:
        x = x - x.mean(1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)


def nearest(
    query: np.ndarray, train: np.ndarray, center: bool, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """(similarity, index) of each query row's most similar train row.

    ``center=True`` gives Pearson correlation (pixels), ``False`` cosine similarity (features).
    """
    q, t = _unit_rows(query, center), _unit_rows(train, center)
    sims, idx = np.empty(len(q), np.float32), np.empty(len(q), np.int64)
    for i in range(0, len(q), chunk):
        s = q[i : i + chunk] @ t.T
        idx[i : i + chunk] = s.argmax(1)
        sims[i : i + chunk] = s[np.arange(len(s)), idx[i : i + chunk]]
    return sims, idx


def audit(
    synthetic_pixels: np.ndarray,
    train_pixels: np.ndarray,
    holdout_pixels: np.ndarray,
    synthetic_feats: np.ndarray,
    train_feats: np.ndarray,
    holdout_feats: np.ndarray,
    quantile: float = 0.99,
    copy_threshold: float = 0.999,
    top: int = 16,
    exclude_threshold: float | None = 0.99,
    min_calibration: int | None = None,
) -> dict:
    """Flag synthetic samples closer to a training image than ``quantile`` of held-out real ones.

    Pixels: ``(N, C, H, W)``; features ``(N, D)``. ``exclude_threshold``: held-out images whose
    nearest training pixel correlation reaches it are not used for calibration (``None`` keeps
    all). ``min_calibration``: fewest calibration images for an informative audit (default
    ``max(20, ceil(1 / (1 - quantile)))``, so the quantile is not just the maximum). Returns
    shares, thresholds, calibration size, the empirical held-out flag rate, ``informative`` and
    its reason, per-sample nearest neighbours (for the dashboard) and the ``top`` closest pairs.
    """
    px_sim, px_idx = nearest(synthetic_pixels, train_pixels, center=True)
    ft_sim, ft_idx = nearest(synthetic_feats, train_feats, center=False)
    hold_px, _ = nearest(holdout_pixels, train_pixels, center=True)
    hold_ft, _ = nearest(holdout_feats, train_feats, center=False)
    # Calibrate on held-out images that are not near-copies of training images.
    calib = (
        hold_px < exclude_threshold
        if exclude_threshold is not None
        else np.ones(len(hold_px), bool)
    )
    n_cal = int(calib.sum())
    need = min_calibration or max(20, int(np.ceil(1 / (1 - quantile))))
    cal_px, cal_ft = (hold_px[calib], hold_ft[calib]) if n_cal else (hold_px, hold_ft)
    px_thr = float(np.quantile(cal_px, quantile)) if len(cal_px) else float("nan")
    ft_thr = float(np.quantile(cal_ft, quantile)) if len(cal_ft) else float("nan")
    flag = (px_sim > px_thr) | (ft_sim > ft_thr)
    copies = px_sim >= copy_threshold
    hold_flag = (cal_px > px_thr) | (cal_ft > ft_thr)
    reasons = []
    if n_cal < need:
        reasons.append(f"calibration set too small ({n_cal} held-out images, need {need})")
    if not px_thr < copy_threshold:
        reasons.append(
            f"degenerate pixel threshold {px_thr:.4f} >= {copy_threshold:g}: held-out images are "
            "near-copies of training images, so nothing short of a copy can be flagged"
        )
    order = np.argsort(-px_sim)[:top]
    nan = float("nan")
    return {
        "n_synthetic": len(px_sim),
        "pixel_threshold": px_thr,
        "feature_threshold": ft_thr,
        "n_holdout": len(hold_px),
        "n_calibration": n_cal,
        "n_holdout_near_duplicates": int(len(hold_px) - calib.sum()),
        "exclude_threshold": exclude_threshold,
        "holdout_flag_rate_nominal": 1 - quantile,
        "holdout_flag_rate": float(hold_flag.mean()) if len(hold_flag) else nan,
        "informative": not reasons,
        "not_informative_reason": "; ".join(reasons) or None,
        "share_flagged": float(flag.mean()) if len(flag) else nan,
        "share_flagged_pixel": float((px_sim > px_thr).mean()) if len(flag) else nan,
        "share_flagged_feature": float((ft_sim > ft_thr).mean()) if len(flag) else nan,
        "exact_copies": int(copies.sum()),
        "per_sample": {
            "pixel_similarity": px_sim.tolist(),
            "pixel_nn": px_idx.tolist(),
            "feature_similarity": ft_sim.tolist(),
            "feature_nn": ft_idx.tolist(),
            "flagged": flag.tolist(),
        },
        "top_pairs": [
            {
                "synthetic": int(i),
                "train": int(px_idx[i]),
                "pixel_similarity": float(px_sim[i]),
                "feature_similarity": float(ft_sim[i]),
                "flagged": bool(flag[i]),
            }
            for i in order
        ],
    }


def audit_line(m: dict) -> str:
    """One sentence on an audit result; never a bare "0 % flagged" when the audit is blind."""
    if m.get("derived_from_patient"):
        # Edits of training images resemble their source by design: say so before the share.
        return (
            "EDITED pool, derived from training patients' images (resemblance is by design, "
            f"reported apart from generated pools): {100 * m['share_flagged_edits']:.1f} % of "
            f"edits flagged, {100 * m['share_nearest_is_source']:.1f} % nearest to their own "
            f"source; " + audit_line({k: v for k, v in m.items() if k != "derived_from_patient"})
        )
    copies = f"{m['exact_copies']} exact copies"
    if "n_calibration" not in m:  # written before calibration excluded held-out near-copies
        return (
            f"{100 * m['share_flagged']:.1f} % of {m['n_synthetic']} samples flagged "
            f"(calibration not checked for held-out near-copies of training images; re-run "
            f"evaluate), {copies}"
        )
    if not m.get("informative", True):
        return (
            f"audit not informative ({m['not_informative_reason']}); {copies} among "
            f"{m['n_synthetic']} samples"
        )
    return (
        f"{100 * m['share_flagged']:.1f} % of {m['n_synthetic']} samples flagged (held-out real "
        f"images flagged by the same rule: {100 * m['holdout_flag_rate']:.1f} %, calibrated on "
        f"{m['n_calibration']} held-out images, {m['n_holdout_near_duplicates']} near-copies of "
        f"training images left out), {copies}"
    )
