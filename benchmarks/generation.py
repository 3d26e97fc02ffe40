"""Synthetic DICOM throughput: writing alone (sampling excluded) and a whole pool end to end.

    python benchmarks/generation.py --snapshot RUN/train/snapshot-XXXXXXX [--n 1000]

Prints instances written per second by the DICOM writer + manifest path alone (pre-sampled
images), and the end-to-end rate of a pool of ``n`` images with DPM-Solver++-20, guidance 2.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medsynth.dicom.write import atomic_write_bytes, synthetic_instance, to_bytes  # noqa: E402
from medsynth.generation.pool import generate_pool  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--snapshot", type=Path, required=True)
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args()
    import json

    cfg = json.loads((args.snapshot / "config.json").read_text())
    classes, shape = cfg["classes"], cfg["image_shape"]
    print(
        f"device cpu, {torch.get_num_threads()} threads; {shape[-1]} px, {shape[0]} channel(s), "
        f"classes {classes}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        # (n, C, H, W): grey snapshots write 12-bit MONOCHROME2, RGB ones 8-bit RGB.
        imgs = rng.uniform(-1, 1, (args.n, *shape)).astype(np.float32)
        t0 = time.perf_counter()
        for i, img in enumerate(imgs):
            ds = synthetic_instance(
                img,
                run_id="0" * 64,
                pool="bench",
                class_name=classes[i % 2],
                class_index=i % 2,
                seed=i,
                index=i,
                derivation="benchmark",
            )
            data = to_bytes(ds)
            atomic_write_bytes(tmp / "w" / f"{i:06d}.dcm", data)
            hashlib.sha256(data).hexdigest()
        dt = time.perf_counter() - t0
        print(f"DICOM writing alone (atomic write + fsync + sha256): {args.n / dt:.0f} instances/s")
        plan = {c: args.n // len(classes) for c in classes}
        t0 = time.perf_counter()
        res = generate_pool(
            args.snapshot,
            tmp / "pool",
            plan,
            sampler="dpmpp",
            steps=20,
            guidance_scale=2.0,
            batch_size=64,
            net_batch=64,
            progress=False,
        )
        dt = time.perf_counter() - t0
        print(
            f"pool of {res['pool_images']} with DPM-Solver++-20, guidance 2, fp32: {dt:.1f} s end to end = "
            f"{res['pool_images'] / dt:.1f} images/s; writer share {res['pool_images'] / res['dicom_written_per_s'] / dt:.1%}"
        )
        t0 = time.perf_counter()
        res2 = generate_pool(
            args.snapshot,
            tmp / "pool",
            plan,
            sampler="dpmpp",
            steps=20,
            guidance_scale=2.0,
            batch_size=64,
            net_batch=64,
            progress=False,
        )
        print(
            f"rerun of the complete pool (verify checksums, generate nothing): {time.perf_counter() - t0:.2f} s, "
            f"generated {res2['generated']}"
        )
        shutil.rmtree(tmp / "pool")


if __name__ == "__main__":
    main()
