"""Choose a subset of a larger synthetic pool: k-center greedy, random, or fidelity filter."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import pairwise_distances

SELECTORS = ("random", "kcenter", "fidelity")


def kcenter_greedy(feats: np.ndarray, m: int, seed: int = 0) -> np.ndarray:
    """Indices of ``m`` rows chosen by farthest-point (k-center greedy) in feature space.

    Starts from one seeded random row, then repeatedly adds the row farthest from all chosen
    ones (Sener & Savarese 2018): the subset covers the pool's spread, not its density.
    """
    n = len(feats)
    m = min(m, n)
    if m <= 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chosen = [int(rng.integers(n))]
    dist = pairwise_distances(feats, feats[chosen]).ravel()
    for _ in range(m - 1):
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = np.minimum(dist, pairwise_distances(feats, feats[[nxt]]).ravel())
    return np.array(chosen, dtype=np.int64)


def select(
    method: str, m: int, feats: np.ndarray, confidence: np.ndarray | None = None, seed: int = 0
) -> np.ndarray:
    """Indices of ``m`` pool rows. ``confidence``: real-trained classifier's probability of each
    sample's own label (``fidelity`` keeps the most confident)."""
    if method == "random":
        return np.random.default_rng(seed).permutation(len(feats))[:m]
    if method == "kcenter":
        return kcenter_greedy(feats, m, seed)
    if method == "fidelity":
        if confidence is None:
            raise ValueError("the fidelity selector needs per-sample confidence")
        return np.argsort(-confidence, kind="stable")[:m]
    raise ValueError(f"unknown selector {method!r}; valid choices: {', '.join(SELECTORS)}")
