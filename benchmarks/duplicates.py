"""Duplicate search time and peak memory at 10 k and 100 k cached images (planted duplicates).

Synthetic "radiograph-like" images: a shared smooth template plus per-image smooth variation
and noise, so unrelated images correlate highly (median 0.87, 95th percentile 0.91, like chest X-rays) — the hard case
for candidate pruning. 1 % of images get an exact copy and 1 % a near copy (noise, corr ~0.995).
Each size runs in a fresh subprocess on a memory-mapped float16 cache in a temp folder; prints
seconds, peak RSS (MiB), candidate pairs checked, and recall of the planted pairs.
Usage: OMP_NUM_THREADS=1 python benchmarks/duplicates.py [N ...] [--size PX] [--dims D]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CASE = r"""
import json, resource, sys, time
import numpy as np
from medsynth.data.duplicates import find_duplicates
cfg = json.loads(sys.argv[1])
images = np.load(cfg["cache"], mmap_mode="r")
t0 = time.perf_counter()
pairs = find_duplicates(images, cfg["threshold"], dims=cfg["dims"])
dt = time.perf_counter() - t0
found = set(zip(pairs.i.tolist(), pairs.j.tolist()))
planted = {tuple(p) for p in json.load(open(cfg["planted"]))}
print(json.dumps({"seconds": dt, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "pairs": len(pairs), "exact": int(pairs.exact.sum()), "candidates": pairs.candidates,
                  "planted_found": len(planted & found), "planted": len(planted)}))
"""


def make_cache(path: Path, n: int, size: int, seed: int = 0, chunk: int = 5000) -> list:
    """Write ``(n, 1, size, size) float16`` images to ``path``; return the planted pairs."""
    rng = np.random.default_rng(seed)
    ax = np.linspace(-1, 1, size)
    x, y = np.meshgrid(ax, ax)
    template = np.exp(-((x / 0.8) ** 2 + (y / 0.95) ** 2) * 2) - 0.5 * np.exp(
        -(((np.abs(x) - 0.4) / 0.25) ** 2 + (y / 0.5) ** 2)
    )

    def smooth(m: int) -> np.ndarray:
        g = rng.standard_normal((m, 6, 6)).astype(np.float32)
        idx = np.linspace(0, 5, size)
        i0 = np.minimum(idx.astype(int), 4)
        f = (idx - i0).astype(np.float32)
        r = g[:, i0] * (1 - f)[None, :, None] + g[:, i0 + 1] * f[None, :, None]
        return r[:, :, i0] * (1 - f) + r[:, :, i0 + 1] * f

    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, 1, size, size))
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        img = template + 0.12 * smooth(m) + 0.03 * rng.standard_normal((m, size, size))
        arr[s : s + m, 0] = np.clip(img, -1, 1)
    n_plant = max(1, n // 100)
    src = rng.choice(n // 2, 2 * n_plant, replace=False)
    dst = rng.choice(np.arange(n // 2, n), 2 * n_plant, replace=False)
    for k, (a, b) in enumerate(zip(src, dst, strict=True)):
        img = arr[a].astype(np.float32)
        if k >= n_plant:  # near copy
            img = img + rng.normal(0, 0.012, img.shape)
        arr[b] = img.astype(np.float16)
    arr.flush()
    return [[int(a), int(b)] for a, b in zip(src, dst, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sizes", nargs="*", type=int, default=[10_000, 100_000])
    ap.add_argument("--size", type=int, default=32, help="cached image side, px")
    ap.add_argument("--dims", type=int, default=48)
    ap.add_argument("--threshold", type=float, default=0.99)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            cache, planted = Path(tmp) / f"c{n}.npy", Path(tmp) / f"p{n}.json"
            planted.write_text(json.dumps(make_cache(cache, n, args.size)))
            cfg = dict(
                cache=str(cache), planted=str(planted), threshold=args.threshold, dims=args.dims
            )
            res = subprocess.run(
                [sys.executable, "-c", CASE, json.dumps(cfg)],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(
                f"N={n:>7,} {args.size} px dims={args.dims}: {r['seconds']:.1f} s, peak RSS "
                f"{r['rss_mib']:.0f} MiB, {r['candidates']:,} candidates checked, {r['pairs']:,} pairs "
                f"({r['exact']:,} exact), planted found {r['planted_found']}/{r['planted']}"
            )
            cache.unlink()


if __name__ == "__main__":
    main()
