"""Exact and near-duplicate search over the ingest cache, memory-bounded and sub-quadratic in I/O.

Two images are *exact* duplicates when their cached pixels are byte-identical (a hash per row),
and *near* duplicates when the Pearson correlation of their cached pixels (all channels, at cache
resolution) is at least ``threshold``.

Method, for ``N`` images of ``D = C * S * S`` pixels:

1. Stream the cache in chunks; centre and L2-normalise each row, so ``u . v`` is the Pearson
   correlation and ``|u - v|^2 = 2 (1 - corr)``.
2. Project onto the top ``dims`` principal axes (fitted on a seeded sample). An orthogonal
   projection never lengthens a vector, so ``|P u - P v|^2 <= |u - v|^2``: every pair with
   ``corr >= threshold`` has projected squared distance ``<= 2 (1 - threshold)``. Candidates found
   this way are a *superset* of the true pairs — no duplicate is missed, whatever ``dims`` is.
3. Blocked ``(block, dims) @ (dims, block)`` products over the upper triangle give the candidate
   pairs; memory is ``O(N * dims + block^2)``.
4. The exact correlation of each candidate is computed from the cache at full resolution.

Constant images (zero variance) have no correlation; they are matched by hash only.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np


@dataclass
class DuplicatePairs:
    """Pairs ``i < j`` of cache rows with their correlation; ``exact`` when byte-identical."""

    i: np.ndarray  # (P,) int64
    j: np.ndarray  # (P,) int64
    similarity: np.ndarray  # (P,) float32 Pearson correlation in [-1, 1] (1.0 for exact)
    exact: np.ndarray  # (P,) bool
    candidates: int  # pairs whose exact correlation was computed (cost indicator)

    def __len__(self) -> int:
        return len(self.i)


def _unit_chunk(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centred, L2-normalised rows ``(n, D) float32`` and a mask of non-constant rows.

    ``x``: ``(n, C, S, S)``. Each channel is centred on its own mean: colour images share channel
    offsets (a fundus photograph is red) that would otherwise make any two correlate near 1.
    """
    n = len(x)
    x = x.reshape(n, x.shape[1] if x.ndim > 2 else 1, -1).astype(np.float32)
    x -= x.mean(2, keepdims=True)
    x = x.reshape(n, -1)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    ok = norm[:, 0] > 1e-6
    return x / np.maximum(norm, 1e-6), ok


def _hash_groups(images: np.ndarray, chunk: int) -> list[np.ndarray]:
    """Groups (of size >= 2) of rows with byte-identical pixels."""
    by_hash: dict[bytes, list[int]] = defaultdict(list)
    for s in range(0, len(images), chunk):
        block = np.ascontiguousarray(images[s : s + chunk])
        for k, row in enumerate(block):
            by_hash[hashlib.blake2b(row.tobytes(), digest_size=16).digest()].append(s + k)
    return [np.array(g, np.int64) for g in by_hash.values() if len(g) > 1]


def _pca_basis(images: np.ndarray, dims: int, fit_rows: int, seed: int) -> np.ndarray:
    """``(D, k)`` orthonormal principal axes of the unit rows of a seeded sample, ``k <= dims``."""
    n = len(images)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, min(n, fit_rows), replace=False))
    x, ok = _unit_chunk(np.asarray(images[idx]))
    x = x[ok]
    if len(x) == 0:  # every sampled image is constant (blank frames): no axes to fit
        return np.zeros((x.shape[1], 0), np.float32)
    # Axes of the second moment (not mean-centred; any orthonormal basis keeps the distance
    # bound). Eigen-decompose the smaller of the (D, D) and (n, n) Gram matrices: far cheaper
    # than an SVD of the sample.
    if x.shape[1] <= x.shape[0]:
        w, v = np.linalg.eigh(x.T @ x)
        w, axes = w[::-1], v[:, ::-1]
    else:
        w, u = np.linalg.eigh(x @ x.T)
        w, u = w[::-1], u[:, ::-1][:, :dims]
        axes = x.T @ (u / np.sqrt(np.maximum(w[: u.shape[1]], 1e-12)))
    k = int(min(dims, (w > 1e-10 * max(w[0], 1e-12)).sum()))
    q, _ = np.linalg.qr(axes[:, :k].astype(np.float64))  # re-orthonormalise float32 round-off
    return np.ascontiguousarray(q.astype(np.float32))


def find_duplicates(
    images: np.ndarray,
    threshold: float = 0.99,
    *,
    dims: int = 48,
    block: int = 2048,
    chunk: int = 4096,
    fit_rows: int = 2048,
    max_group_pairs: int = 64,
    seed: int = 0,
) -> DuplicatePairs:
    """All pairs of rows with Pearson correlation ``>= threshold``, and all byte-identical pairs.

    ``images``: ``(N, C, S, S)`` array (a memory map is fine; it is read in ``chunk`` rows).
    ``dims``: principal axes used for candidate search (fewer = cheaper products, more
    candidates; recall is exact either way). ``block``: rows per side of one product tile.
    An exact group of ``g > max_group_pairs`` images is reported as ``g - 1`` pairs to its first
    member instead of ``g (g - 1) / 2`` (e.g. thousands of blank frames).
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"duplicate threshold must be in (0, 1]; got {threshold}")
    n = len(images)
    # Bound float32 chunk copies to ~256 MB each, whatever the cache resolution.
    chunk = max(64, min(chunk, 2**26 // max(1, int(np.prod(images.shape[1:])))))
    fit_rows = max(256, min(fit_rows, 2**27 // max(1, int(np.prod(images.shape[1:])))))
    out_i, out_j, out_s, out_e = [], [], [], []

    # 1. Exact duplicates by pixel hash.
    groups = _hash_groups(images, chunk)
    for g in groups:
        if len(g) <= max_group_pairs:
            a, b = np.triu_indices(len(g), 1)
            gi, gj = g[a], g[b]
        else:
            gi, gj = np.full(len(g) - 1, g[0]), g[1:]
        out_i.append(gi)
        out_j.append(gj)
        out_s.append(np.ones(len(gi), np.float32))
        out_e.append(np.ones(len(gi), bool))
    # Only one representative per exact group takes part in the near search; its partners are
    # expanded afterwards, so a group of g identical images costs one row, not g^2 candidates.
    rep = np.arange(n)
    for g in groups:
        rep[g] = g[0]

    # 2. Projected unit rows of non-constant representatives.
    basis = _pca_basis(images, dims, fit_rows, seed) if n > 1 else np.zeros((1, 0), np.float32)
    proj = np.zeros((n, basis.shape[1]), np.float32)
    active = np.zeros(n, bool)
    for s in range(0, n, chunk):
        u, ok = _unit_chunk(np.asarray(images[s : s + chunk]))
        proj[s : s + len(u)] = u @ basis
        active[s : s + len(u)] = ok & (rep[s : s + len(u)] == np.arange(s, s + len(u)))
    ids = np.flatnonzero(active)
    p = proj[ids]
    sq = (p * p).sum(1)
    radius = 2.0 * (1.0 - threshold) + 1e-4  # float32 slack; exact check follows

    # 3. Candidate pairs from blocked products over the upper triangle.
    cand_i, cand_j = [], []
    for a in range(0, len(ids), block):
        pa, sa = p[a : a + block], sq[a : a + block]
        for b in range(a, len(ids), block):
            # |Pu - Pv|^2 = |Pu|^2 + |Pv|^2 - 2 Pu.Pv, in place on one (block, block) tile.
            d2 = pa @ p[b : b + block].T
            d2 *= -2.0
            d2 += sa[:, None]
            d2 += sq[None, b : b + block]
            ii, jj = np.nonzero(d2 <= radius)
            keep = (ii + a) < (jj + b)
            cand_i.append(ids[ii[keep] + a])
            cand_j.append(ids[jj[keep] + b])
    ci = np.concatenate(cand_i) if cand_i else np.zeros(0, np.int64)
    cj = np.concatenate(cand_j) if cand_j else np.zeros(0, np.int64)

    # 4. Exact correlation of candidates at cache resolution.
    sims = np.empty(len(ci), np.float32)
    for s in range(0, len(ci), chunk):
        ui, _ = _unit_chunk(np.asarray(images[np.sort(ci[s : s + chunk])]))
        order_i = np.argsort(np.argsort(ci[s : s + chunk], kind="stable"), kind="stable")
        uj, _ = _unit_chunk(np.asarray(images[np.sort(cj[s : s + chunk])]))
        order_j = np.argsort(np.argsort(cj[s : s + chunk], kind="stable"), kind="stable")
        sims[s : s + chunk] = (ui[order_i] * uj[order_j]).sum(1)
    hit = sims >= threshold
    ci, cj, sims = ci[hit], cj[hit], sims[hit]

    # 5. Expand representatives to their exact-group members.
    members = {int(g[0]): g for g in groups}
    ei, ej, es = [ci], [cj], [sims]
    for x, y, s_ in zip(ci.tolist(), cj.tolist(), sims.tolist(), strict=True):
        gx, gy = members.get(x), members.get(y)
        if gx is None and gy is None:
            continue
        gx = gx if gx is not None else np.array([x])
        gy = gy if gy is not None else np.array([y])
        xx, yy = np.meshgrid(gx, gy, indexing="ij")
        xx, yy = xx.ravel(), yy.ravel()
        extra = ~((xx == x) & (yy == y))
        ei.append(xx[extra])
        ej.append(yy[extra])
        es.append(np.full(int(extra.sum()), s_, np.float32))
    near_i, near_j = np.concatenate(ei), np.concatenate(ej)
    lo, hi = np.minimum(near_i, near_j), np.maximum(near_i, near_j)
    out_i.append(lo)
    out_j.append(hi)
    out_s.append(np.concatenate(es))
    out_e.append(np.zeros(len(lo), bool))
    return DuplicatePairs(
        i=np.concatenate(out_i).astype(np.int64),
        j=np.concatenate(out_j).astype(np.int64),
        similarity=np.concatenate(out_s).astype(np.float32),
        exact=np.concatenate(out_e),
        candidates=len(hit),
    )
