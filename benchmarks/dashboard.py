"""Dashboard responsiveness with a large pool (default 10,000 samples).

Writes a pool of N synthetic DICOM instances (random pixels; sampling is not the point here)
into a throwaway run folder, then times the Streamlit app under AppTest: first load, a page
flip, a review decision, and reports the process's peak RSS.

    python benchmarks/dashboard.py [--n 10000]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medsynth.dicom.write import pixel_sha256, synthetic_instance, to_bytes  # noqa: E402
from medsynth.generation.pool import MANIFEST_COLUMNS  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "dashboards" / "review.py"


def make_pool(run: Path, n: int) -> None:
    pool = run / "generate" / "big"
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        c = ("normal", "pneumonia")[i % 2]
        ds = synthetic_instance(rng.uniform(-1, 1, (28, 28)), run_id="f" * 64, pool="big", class_name=c,
                                class_index=i % 2, seed=i, index=i // 2, derivation="bench")  # fmt: skip
        data = to_bytes(ds)
        rel = f"dicom/{c}/{i // 2:06d}.dcm"
        (pool / rel).parent.mkdir(parents=True, exist_ok=True)
        (pool / rel).write_bytes(data)
        rows.append({"path": rel, "SOPInstanceUID": ds.SOPInstanceUID, "class_name": c, "class_index": i % 2,
                     "index": i // 2, "seed": i, "guidance_scale": 2.0, "sampler": "dpmpp", "steps": 20,
                     "snapshot_sha256": "f" * 64, "protocol_sha256": "", "pixel_sha256": pixel_sha256(ds),
                     "file_sha256": hashlib.sha256(data).hexdigest(), "medsynth_version": "bench"})  # fmt: skip
    with (pool / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    from streamlit.testing.v1 import AppTest

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        t0 = time.perf_counter()
        make_pool(run, args.n)
        print(f"wrote a pool of {args.n} instances in {time.perf_counter() - t0:.1f} s")
        os.environ["MEDSYNTH_RUN"] = str(run)
        t0 = time.perf_counter()
        at = AppTest.from_file(str(APP), default_timeout=300).run()
        print(f"first load (manifest + 24 thumbnails): {time.perf_counter() - t0:.2f} s")
        t0 = time.perf_counter()
        at.run()
        print(f"rerun (cached): {time.perf_counter() - t0:.2f} s")
        t0 = time.perf_counter()
        at.number_input[0].set_value(200).run()
        print(f"page flip to page 200: {time.perf_counter() - t0:.2f} s")
        t0 = time.perf_counter()
        at.button(key="accept").click().run()
        print(f"accept + rerun: {time.perf_counter() - t0:.2f} s")
        assert not at.exception, at.exception
        print(
            f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
        )


if __name__ == "__main__":
    main()
