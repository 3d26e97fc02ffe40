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
        ds = synthetic_instance(
            rng.uniform(-1, 1, (28, 28)),
            run_id="f" * 64,
            pool="big",
            class_name=c,
            class_index=i % 2,
            seed=i,
            index=i // 2,
            derivation="bench",
        )
        data = to_bytes(ds)
        rel = f"dicom/{c}/{i // 2:06d}.dcm"
        (pool / rel).parent.mkdir(parents=True, exist_ok=True)
        (pool / rel).write_bytes(data)
        rows.append(
            {
                "path": rel,
                "SOPInstanceUID": ds.SOPInstanceUID,
                "class_name": c,
                "class_index": i % 2,
                "index": i // 2,
                "seed": i,
                "guidance_scale": 2.0,
                "sampler": "dpmpp",
                "steps": 20,
                "snapshot_sha256": "f" * 64,
                "protocol_sha256": "",
                "pixel_sha256": pixel_sha256(ds),
                "file_sha256": hashlib.sha256(data).hexdigest(),
                "medsynth_version": "bench",
            }
        )
    with (pool / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def make_big(run: Path, n: int, size: int) -> None:
    """A pool ``xray`` of ``n`` phantom radiographs of ``size`` px (full-resolution viewing)."""
    from medsynth.data.phantoms import draw_anatomy, render

    pool = run / "generate" / "xray"
    rows = []
    for i in range(n):
        rng = np.random.default_rng(i)
        img = render(draw_anatomy(rng), "normal", 0.3, size, rng) * 2 - 1
        ds = synthetic_instance(
            img,
            run_id="e" * 64,
            pool="xray",
            class_name="normal",
            class_index=0,
            seed=i,
            index=i,
            derivation="bench",
        )
        data = to_bytes(ds)
        rel = f"dicom/normal/{i:06d}.dcm"
        (pool / rel).parent.mkdir(parents=True, exist_ok=True)
        (pool / rel).write_bytes(data)
        rows.append(
            {
                "path": rel,
                "SOPInstanceUID": ds.SOPInstanceUID,
                "class_name": "normal",
                "class_index": 0,
                "index": i,
                "seed": i,
                "guidance_scale": 1.0,
                "sampler": "bench",
                "steps": 1,
                "snapshot_sha256": "e" * 64,
                "protocol_sha256": "",
                "pixel_sha256": pixel_sha256(ds),
                "file_sha256": hashlib.sha256(data).hexdigest(),
                "medsynth_version": "bench",
            }
        )
    with (pool / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)


def seed_decisions(run: Path, n: int) -> None:
    """Two reviewers decide the first ``n`` samples of pool ``big`` (they disagree on a third)."""
    from medsynth.review.db import decide

    rows = list(csv.DictReader((run / "generate/big/manifest.csv").open()))[:n]
    for i, r in enumerate(rows):
        decide(run / "review.sqlite", f"big/{r['path']}", "ann", "accept", r["pixel_sha256"])
        other = "reject" if i % 3 == 0 else "accept"
        decide(run / "review.sqlite", f"big/{r['path']}", "ben", other, r["pixel_sha256"])


def timed(label: str, fn) -> None:
    t0 = time.perf_counter()
    at = fn()
    assert not at.exception, at.exception
    print(f"{label}: {time.perf_counter() - t0:.2f} s")


def main() -> None:
    from streamlit.testing.v1 import AppTest

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--decided", type=int, default=1000, help="samples decided by two reviewers")
    ap.add_argument("--size", type=int, default=1024, help="side of the full-resolution images")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        t0 = time.perf_counter()
        make_pool(run, args.n)
        make_big(run, 3, args.size)
        print(
            f"wrote a pool of {args.n} instances (+3 of {args.size} px) in {time.perf_counter() - t0:.1f} s"
        )
        t0 = time.perf_counter()
        seed_decisions(run, args.decided)
        print(f"{2 * args.decided} decisions by two reviewers in {time.perf_counter() - t0:.1f} s")
        os.environ["MEDSYNTH_RUN"] = str(run)
        at = AppTest.from_file(str(APP), default_timeout=300)
        at.query_params["reviewer"] = "ann"
        timed("first load (manifest + 24 tiles)", at.run)
        timed("rerun (cached)", at.run)
        page = next(w for w in at.number_input if w.label.startswith("Page"))
        timed("page flip to page 200", lambda: page.set_value(200).run())
        timed("Review view", lambda: at.radio(key="view").set_value("Review").run())
        timed("accept + rerun", lambda: at.button(key="accept").click().run())
        timed("Disagreements view", lambda: at.radio(key="view").set_value("Disagreements").run())
        timed("Metrics view (kappas)", lambda: at.radio(key="view").set_value("Metrics").run())
        timed("Export preview", lambda: at.radio(key="view").set_value("Export").run())
        at.radio(key="view").set_value("Samples").run()
        pool = next(w for w in at.selectbox if w.label == "Pool")
        timed(f"switch to the {args.size}-px pool (3 tiles)", lambda: pool.set_value("xray").run())
        timed(
            f"Review view, full resolution {args.size} px",
            lambda: at.radio(key="view").set_value("Review").run(),
        )
        timed("next image (full resolution)", lambda: at.button(key="next").click().run())
        timed("window preset (re-render)", lambda: at.button(key="wl_Narrow").click().run())
        print(
            f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
        )


if __name__ == "__main__":
    main()
