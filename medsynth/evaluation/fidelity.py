"""Fidelity and diversity of a synthetic set against real images.

Features come from a classifier trained on real data inside the run, so every distance is named
after it: ``FD_clf`` (Fréchet distance on those features), ``KID_clf``,
k-NN precision / recall / density / coverage (Kynkäänniemi 2019, Naeem 2020), pairwise MS-SSIM
among synthetic images relative to the same statistic among real ones, and the Vendi score.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import pairwise_distances
from sklearn.neighbors import NearestNeighbors


def fd(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two ``(N, D)`` feature sets.

    ``|mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))``, as MONAI's ``FIDMetric`` computes it
    (tests check agreement), with the trace of the root taken exactly from symmetric
    eigenvalues (:func:`_trace_sqrt_product`) rather than by ``scipy.linalg.sqrtm``, which is
    slower and only approximate for the singular covariances of small sets. NaN below 2 images.
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if min(len(real), len(fake)) < 2:
        return float("nan")
    mu_r, mu_f = real.mean(0), fake.mean(0)
    xr, xf = real - mu_r, fake - mu_f
    spread = (xr**2).sum() / (len(xr) - 1) + (xf**2).sum() / (len(xf) - 1)  # Tr S_r + Tr S_f
    return float(((mu_r - mu_f) ** 2).sum() + spread - 2 * _trace_sqrt_product(xr, xf))


def _trace_sqrt_product(xr: np.ndarray, xf: np.ndarray) -> float:
    """``Tr (S_r S_f)^(1/2)`` of centred ``(n_r, D)`` and ``(n_f, D)`` features, exactly.

    With no more images than dimensions (per-class sets: ~120 images, 128-512 features), the
    nonzero eigenvalues of ``S_r S_f`` are the squared singular values of
    ``xr xf^T / sqrt((n_r - 1)(n_f - 1))``: an ``n x n`` SVD. Otherwise those eigenvalues are
    those of the symmetric ``S_r^(1/2) S_f S_r^(1/2)``: two ``D x D`` eigendecompositions.
    The per-class floor repeats this a hundred times, so both forms matter for speed."""
    (n_r, d), n_f = xr.shape, len(xf)
    if min(n_r, n_f) <= d:
        cross = np.linalg.svd(xr @ xf.T, compute_uv=False).sum()
        return float(cross / np.sqrt((n_r - 1) * (n_f - 1)))
    s_r, s_f = xr.T @ xr / (n_r - 1), xf.T @ xf / (n_f - 1)
    w, v = np.linalg.eigh(s_r)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root @ s_f @ root), 0, None)).sum())


def kid(
    real: np.ndarray, fake: np.ndarray, subset_size: int = 200, n_subsets: int = 20, seed: int = 0
) -> float:
    """Kernel inception-style distance: unbiased MMD² with a cubic polynomial kernel, averaged
    over random subsets (Bińkowski et al. 2018). ~0 for sets from one distribution."""
    rng = np.random.default_rng(seed)
    d = real.shape[1]
    m = min(subset_size, len(real), len(fake))
    if m < 2:
        return float("nan")
    vals = []
    for _ in range(n_subsets):
        x = real[rng.choice(len(real), m, replace=False)]
        y = fake[rng.choice(len(fake), m, replace=False)]
        kxx, kyy, kxy = (((a @ b.T) / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        vals.append(
            (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
            + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
            - 2 * kxy.mean()
        )
    return float(np.mean(vals))


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """k-NN precision, recall, density and coverage of ``fake`` against ``real`` (Naeem 2020)."""
    k = min(k, len(real) - 1, len(fake) - 1)
    if k < 1:
        return dict.fromkeys(("precision", "recall", "density", "coverage"), float("nan"))
    r_radius = NearestNeighbors(n_neighbors=k + 1).fit(real).kneighbors(real)[0][:, -1]
    f_radius = NearestNeighbors(n_neighbors=k + 1).fit(fake).kneighbors(fake)[0][:, -1]
    d_rf = pairwise_distances(real, fake)  # (R, F)
    inside_real = d_rf < r_radius[:, None]
    return {
        "precision": float(inside_real.any(0).mean()),
        "recall": float((d_rf < f_radius[None, :]).any(1).mean()),
        "density": float(inside_real.sum(0).mean() / k),
        "coverage": float((d_rf.min(1) < r_radius).mean()),
    }


def vendi(x: np.ndarray) -> float:
    """Vendi score (Friedman & Dieng 2023) with a cosine kernel: exp of the eigenvalue entropy
    of K/n. 1 for identical items, n for mutually orthogonal ones. ``x``: ``(N, D)``."""
    x = x.reshape(len(x), -1).astype(np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.where(norm > 0, x / np.maximum(norm, 1e-12), 0)
    # Eigenvalues of K/n equal those of X^T X / n (smaller when D < N).
    gram = x.T @ x if x.shape[1] < len(x) else x @ x.T
    w = np.clip(np.linalg.eigvalsh(gram / len(x)), 0, None)
    w = w[w > 1e-12]
    return float(np.exp(-(w * np.log(w)).sum())) if len(w) else 1.0


def _msssim_metric(size: int):
    from monai.metrics import MultiScaleSSIMMetric

    kernel = 7 if size >= 48 else 3
    # MONAI's validity rule for `w` scales: size // max(1, w - 1) ** 2 > kernel - 1.
    scales = max(w for w in range(1, 6) if size // max(1, w - 1) ** 2 > kernel - 1)
    base = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])[:scales]
    return MultiScaleSSIMMetric(
        spatial_dims=2, data_range=2.0, kernel_size=kernel, weights=tuple(base / base.sum())
    )


def mean_pairwise_msssim(images: torch.Tensor, n_pairs: int = 500, seed: int = 0) -> float:
    """Mean MS-SSIM over random distinct pairs of ``(N, C, H, W)`` images in [-1, 1]
    (higher = more alike = less diverse). Scales and kernel adapt to small images."""
    n = len(images)
    if n < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, n_pairs)
    j = (i + rng.integers(1, n, n_pairs)) % n
    metric = _msssim_metric(images.shape[-1])
    return float(metric(images[i].float(), images[j].float()).mean())


def msssim_ratio(
    fake: torch.Tensor, real: torch.Tensor, n_pairs: int = 500, seed: int = 0
) -> float:
    """Mean pairwise MS-SSIM among synthetic images / the same among real ones (1 = as
    diverse as real; > 1 = less diverse; a collapsed pool gives 1 / real)."""
    return mean_pairwise_msssim(fake, n_pairs, seed) / mean_pairwise_msssim(real, n_pairs, seed)


def fidelity_diversity(
    real_feats: np.ndarray,
    fake_feats: np.ndarray,
    real_imgs: torch.Tensor,
    fake_imgs: torch.Tensor,
    k: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """All metrics of one (class or overall) comparison, keys named after the extractor."""
    out = {
        "n_real": len(real_feats),
        "n_synthetic": len(fake_feats),
        "FD_clf": fd(real_feats, fake_feats),
        "KID_clf": kid(real_feats, fake_feats, seed=seed),
    }
    out.update({f"{k_}_clf": v for k_, v in prdc(real_feats, fake_feats, k).items()})
    out["msssim_ratio"] = msssim_ratio(fake_imgs, real_imgs, seed=seed)
    out["vendi_clf"] = vendi(fake_feats)
    out["vendi_clf_real"] = vendi(real_feats)
    out["vendi_pixels"] = vendi(fake_imgs.numpy())
    out["vendi_pixels_real"] = vendi(real_imgs.numpy())
    # Mean pixel value in [0, 1]: a too-dark or washed-out class shows here first.
    out["mean_intensity_synthetic"] = float(((fake_imgs.float() + 1) / 2).mean())
    out["mean_intensity_real"] = float(((real_imgs.float() + 1) / 2).mean())
    return out
