"""The side-by-side harness: the peer recipe and the per-class, three-extractor quality score."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.quality import MIN_N, _set_metrics, class_counts, laplacian_energy  # noqa: E402


def _run(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out.stdout


def test_class_counts_follow_the_test_split():
    labels = torch.tensor([0] * 3 + [1] * 5)
    assert class_counts(labels, 8, 2) == [3, 5]
    assert sum(class_counts(labels, 601, 2)) == 601
    assert class_counts(torch.tensor([0, 1, 1]), 5, 3) == [2, 3, 0]


def test_small_classes_get_no_figures_and_texture_is_measured():
    x = torch.zeros(MIN_N - 1, 1, 8, 8)
    row = _set_metrics({}, {}, x, x)
    assert row == {"n": MIN_N - 1, "n_real": MIN_N - 1}
    flat, noisy = (
        torch.zeros(4, 1, 8, 8),
        torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
    )
    assert laplacian_energy(flat) == 0 and laplacian_energy(noisy) > 1


def test_peer_recipe_and_quality_score_end_to_end(tmp_path):
    run = tmp_path / "run"
    # Enough phantom patients that the test split holds >= MIN_N images per class.
    _run(
        "-m",
        "medsynth.cli",
        "ingest",
        "protocols/smoke.yaml",
        "--run-dir",
        str(run),
        "--set",
        "dataset.phantoms.n_patients=160",
    )
    ingest = run / "ingest"
    _run("benchmarks/peer.py", str(ingest), "--out", str(tmp_path / "peer"), "--smoke")
    z = np.load(tmp_path / "peer" / "samples.npz")
    assert z["images"].shape == (8, 1, 16, 16) and np.isfinite(z["images"]).all()
    assert np.abs(z["images"]).max() <= 1
    stats = json.loads((tmp_path / "peer" / "peer.json").read_text())
    assert stats["steps"] == 20 and stats["parameters"] > 0

    cache = tmp_path / "extractors"
    _run("benchmarks/quality.py", "extractors", str(ingest), "--cache", str(cache), "--epochs", "1")
    # A set of real test images scores far closer to the test split than uniform noise does.
    from medsynth.data.datasets import load_split

    test = load_split(ingest, "test")
    np.savez(tmp_path / "real.npz", images=test.images.numpy(), labels=test.labels.numpy())
    noise = np.random.default_rng(0).uniform(-1, 1, test.images.shape).astype(np.float32)
    np.savez(tmp_path / "noise.npz", images=noise, labels=test.labels.numpy())
    out_json = tmp_path / "q.json"
    _run(
        "benchmarks/quality.py",
        "score",
        str(ingest),
        "--cache",
        str(cache),
        "--set",
        f"real={tmp_path / 'real.npz'}",
        "--set",
        f"noise={tmp_path / 'noise.npz'}",
        "--set",
        f"peer={tmp_path / 'peer' / 'samples.npz'}",
        "--json",
        str(out_json),
        "--grid",
        str(tmp_path / "grid.png"),
    )
    res = json.loads(out_json.read_text())
    for name in ("cnn0", "cnn1", "r18"):
        assert res["real"]["all"][f"FD_{name}"] < 1e-6 < res["noise"]["all"][f"FD_{name}"]
    assert res["noise"]["all"]["hf_ratio"] > 2 and abs(res["real"]["all"]["hf_ratio"] - 1) < 1e-6
    assert set(res["peer"]) == {"all", *test.classes}
    assert (tmp_path / "grid.png").stat().st_size > 1000
