"""Memorization audit: is a synthetic image a copy of a training patient's image?

For every synthetic sample: nearest training image by pixel correlation (Pearson over pixels)
and by feature cosine. The flag threshold is calibrated on real data: the nearest-training
similarity of each *held-out* real image (val/test patients) shows how close an unseen but
genuine image comes by chance; a synthetic sample closer than the ``quantile`` of that
distribution is flagged. Exact copies (correlation >= 0.999) are counted separately.
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
) -> dict:
    """Flag synthetic samples closer to a training image than ``quantile`` of held-out real ones.

    Pixels: ``(N, C, H, W)``; features ``(N, D)``. Returns shares, thresholds, per-sample
    nearest neighbours (for the dashboard) and the ``top`` closest pairs.
    """
    px_sim, px_idx = nearest(synthetic_pixels, train_pixels, center=True)
    ft_sim, ft_idx = nearest(synthetic_feats, train_feats, center=False)
    hold_px, _ = nearest(holdout_pixels, train_pixels, center=True)
    hold_ft, _ = nearest(holdout_feats, train_feats, center=False)
    px_thr, ft_thr = float(np.quantile(hold_px, quantile)), float(np.quantile(hold_ft, quantile))
    flag = (px_sim > px_thr) | (ft_sim > ft_thr)
    copies = px_sim >= copy_threshold
    order = np.argsort(-px_sim)[:top]
    return {
        "n_synthetic": len(px_sim),
        "pixel_threshold": px_thr,
        "feature_threshold": ft_thr,
        "holdout_flag_rate_expected": 1 - quantile,
        "share_flagged": float(flag.mean()) if len(flag) else float("nan"),
        "share_flagged_pixel": float((px_sim > px_thr).mean()) if len(flag) else float("nan"),
        "share_flagged_feature": float((ft_sim > ft_thr).mean()) if len(flag) else float("nan"),
        "exact_copies": int(copies.sum()),
        "per_sample": {
            "pixel_similarity": px_sim.tolist(), "pixel_nn": px_idx.tolist(),
            "feature_similarity": ft_sim.tolist(), "feature_nn": ft_idx.tolist(), "flagged": flag.tolist(),
        },
        "top_pairs": [{"synthetic": int(i), "train": int(px_idx[i]), "pixel_similarity": float(px_sim[i]),
                       "feature_similarity": float(ft_sim[i]), "flagged": bool(flag[i])} for i in order],
    }  # fmt: skip
