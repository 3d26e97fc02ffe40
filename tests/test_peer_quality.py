"""The side-by-side harness: the peer recipe, the time-to-quality curve and the per-class,
three-extractor quality score."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.quality import (  # noqa: E402
    MIN_N,
    _set_metrics,
    class_counts,
    class_guidance_arg,
    class_logit_w1,
    laplacian_energy,
    real_reference,
    score_set,
)
from benchmarks.time_to_quality import verdicts  # noqa: E402


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


def _curve(*points):
    return [{"seconds": t, "FD_x": v} for t, v in points]


class _Projection:
    """A fixed random projection standing in for a trained extractor (8 features)."""

    def __init__(self, d_in: int, seed: int):
        self.w = torch.randn(d_in, 8, generator=torch.Generator().manual_seed(seed))

    def features(self, x: torch.Tensor) -> np.ndarray:
        return (x.flatten(1) @ self.w).numpy()

    def predict_proba(self, x: torch.Tensor) -> np.ndarray:
        return torch.softmax(torch.from_numpy(self.features(x)[:, :2]), 1).numpy()


def test_a_collapsed_class_is_far_above_its_split_floor_and_widens_the_spread():
    """Per class, FD over the FD between halves of the real test class (the evaluation's
    collapse floor): a class drawn like the real one sits near 1, a class of near-copies far
    above, and the spread (worst over best class) separates the two sets."""
    g = torch.Generator().manual_seed(0)

    def draw(n: int, c: int) -> torch.Tensor:
        return (torch.randn(n, 1, 16, 16, generator=g) * 0.3 + (0.3 if c else -0.3)).clamp(-1, 1)

    labels = torch.tensor([0] * 200 + [1] * 200)
    test = SimpleNamespace(
        images=torch.cat([draw(200, 0), draw(200, 1)]), labels=labels, classes=["normal", "finding"]
    )
    extractors = {"cnn0": _Projection(256, 0), "r18": _Projection(256, 1)}
    test_feats = {n: e.features(test.images) for n, e in extractors.items()}
    alike = torch.cat([draw(150, 0), draw(1, 1).repeat(150, 1, 1, 1) + 0.01 * draw(150, 1)])
    faithful = torch.cat([draw(150, 0), draw(150, 1)])
    y = torch.tensor([0] * 150 + [1] * 150)
    bad = score_set(alike.clamp(-1, 1), y, test, extractors, test_feats)
    good = score_set(faithful, y, test, extractors, test_feats)
    for name in extractors:
        assert good["normal"][f"FD_{name}_over_split"] < 2
        assert good["finding"][f"FD_{name}_over_split"] < 2
        assert bad["finding"][f"FD_{name}_over_split"] > 5 * bad["normal"][f"FD_{name}_over_split"]
        assert good["all"][f"FD_{name}_class_spread"] < 2
        assert bad["all"][f"FD_{name}_class_spread"] > 10
        assert good["finding"][f"W1_{name}_logit"] < bad["finding"][f"W1_{name}_logit"]


def test_the_class_evidence_shape_sees_a_bimodal_set_that_two_moments_miss():
    """Real class evidence (logit of P(class)) ~ N(2, 1); a set half weak, half over-typical
    with the same mean and variance reads as real to a Gaussian (two-moment) distance and far
    from it to the Wasserstein-1 distance of :func:`class_logit_w1`."""
    rng = np.random.default_rng(0)

    def proba(logits: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-logits))

    real = rng.normal(2, 1, 4000)
    faithful = rng.normal(2, 1, 4000)
    modes = np.where(rng.random(4000) < 0.5, 2 - 0.95, 2 + 0.95)
    bimodal = modes + rng.normal(0, 0.3, 4000)
    gauss = [
        (x.mean() - real.mean()) ** 2 + (x.std() - real.std()) ** 2 for x in (faithful, bimodal)
    ]
    assert max(gauss) < 0.01  # two moments: both as real
    w_faithful, w_bimodal = (class_logit_w1(proba(real), proba(x)) for x in (faithful, bimodal))
    assert w_faithful < 0.05 and w_bimodal > 4 * w_faithful
    assert class_logit_w1(proba(real), proba(real + 1)) == pytest.approx(1, abs=0.01)


def test_time_to_quality_verdicts():
    peer = _curve((300, 9.0), (600, 6.0), (900, 4.0))
    # Reaches 4.0 by 250 s (<= 900 / 3) and is lower at 300, 600 and 900 s.
    good = verdicts({"peer": peer, "medsynth": _curve((120, 8.0), (250, 3.5), (500, 2.0))}, "FD_x")
    assert good["medsynth_reaches_at"] == 250 and good["reach_target_met"]
    assert good["equal_time"] == [(300, 3.5, 9.0), (600, 2.0, 6.0), (900, 2.0, 4.0)]
    assert good["beats_at_equal_time"]
    # Reaches it only at 400 s (> 300 s) and is worse at the peer's 300 s checkpoint.
    slow = verdicts({"peer": peer, "medsynth": _curve((200, 9.5), (400, 3.9))}, "FD_x")
    assert slow["medsynth_reaches_at"] == 400 and not slow["reach_target_met"]
    assert not slow["beats_at_equal_time"]
    never = verdicts({"peer": peer, "medsynth": _curve((1000, 5.0))}, "FD_x")
    assert never["medsynth_reaches_at"] is None and not never["reach_target_met"]
    assert never["equal_time"] == [] and not never["beats_at_equal_time"]  # no checkpoint yet


def test_time_to_quality_and_quality_score_end_to_end(tmp_path):
    """The peer recipe and medsynth side by side (smoke), then the score's sanity on known sets."""
    out = tmp_path / "ttq"
    _run("benchmarks/time_to_quality.py", "protocols/smoke.yaml", "--out", str(out), "--smoke")
    res = json.loads((out / "curve.json").read_text())
    for system in ("peer", "medsynth"):
        rows = res["curves"][system]
        assert [r["step"] for r in rows] == [10, 20]
        assert 0 < rows[0]["seconds"] <= rows[1]["seconds"]
        assert all(np.isfinite(r[f"FD_{n}"]) for r in rows for n in ("cnn0", "cnn1", "r18"))
    assert set(res["verdicts"]) == {"FD_cnn0", "FD_cnn1", "FD_r18"}
    assert (out / "curve.png").stat().st_size > 1000 and "peer final" in (
        out / "curve.md"
    ).read_text()
    z = np.load(out / "peer" / "samples.npz")
    assert z["images"].shape == (40, 1, 16, 16) and np.isfinite(z["images"]).all()
    assert np.abs(z["images"]).max() <= 1
    stats = json.loads((out / "peer" / "peer.json").read_text())
    assert stats["steps"] == 20 and stats["parameters"] > 0 and stats["sampler"] == "ddim-5"

    # Autoguidance from the command line: a guide equal to the model leaves guidance 1's pixels;
    # another seed base draws another set from the same generator.
    run, draws = out / "medsynth", {}
    runs = {
        "plain": ["--guidance", "1"],
        "auto": ["--autoguide", str(run)],
        "other": ["--guidance", "1", "--seed-base", "7"],
    }
    for name, extra in runs.items():
        draws[name] = tmp_path / f"{name}.npz"
        args = ["sample", str(run), "--ingest", str(run / "ingest"), "--out", str(draws[name])]
        _run("benchmarks/quality.py", *args, "--n", "8", "--steps", "3", *extra)
    plain, auto, other = (np.load(draws[k])["images"] for k in runs)
    assert plain.shape == (8, 1, 16, 16) and np.array_equal(plain, auto)
    assert other.shape == plain.shape and not np.allclose(other, plain)

    def refused(*extra) -> str:
        cmd = [sys.executable, "benchmarks/quality.py", *args, "--n", "2", *extra]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        assert done.returncode != 0
        return done.stderr

    # Below 1 the rows would move towards the guide: refused as the protocol refuses it.
    low = refused("--autoguide", str(run), "--guidance", "0.5")
    assert "guidance_scale 0.5 below 1 would move towards" in low
    some = ["--autoguide", str(run), "--guidance", "2", "--autoguide-classes"]
    assert "--autoguide-classes: unknown classes ['nodule']" in refused(*some, "nodule")

    # A set of real test images scores far closer to the test split than uniform noise does.
    from medsynth.data.datasets import load_split

    ingest, cache = out / "medsynth" / "ingest", out / "extractors"
    test = load_split(ingest, "test")
    np.savez(tmp_path / "real.npz", images=test.images.numpy(), labels=test.labels.numpy())
    noise = np.random.default_rng(0).uniform(-1, 1, test.images.shape).astype(np.float32)
    np.savez(tmp_path / "noise.npz", images=noise, labels=test.labels.numpy())
    ref_x, ref_y = real_reference(ingest, test, 40)
    np.savez(tmp_path / "ref.npz", images=ref_x.numpy(), labels=ref_y.numpy())
    out_json = tmp_path / "q.json"
    _run(
        "benchmarks/quality.py",
        "score",
        str(ingest),
        "--cache",
        str(cache),
        "--real-ref",
        "40",
        "--set",
        f"ref={tmp_path / 'ref.npz'}",
        "--set",
        f"real={tmp_path / 'real.npz'}",
        "--set",
        f"noise={tmp_path / 'noise.npz'}",
        "--set",
        f"peer={out / 'peer' / 'samples.npz'}",
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
    # Floor ratios at the reference's n: the reference itself scores exactly 1 in every part
    # and extractor (so its class spread is 1); noise is far above its floor.
    for part in ("all", *test.classes):
        for name in ("cnn0", "cnn1", "r18"):
            assert res["ref"][part][f"FD_{name}_over_real"] == pytest.approx(1.0)
            assert res["noise"][part][f"FD_{name}_over_real"] > 2

    assert (tmp_path / "grid.png").stat().st_size > 1000

    # Against validation: the validation images themselves score 0, the test images do not.
    val = load_split(ingest, "val")
    np.savez(tmp_path / "val.npz", images=val.images.numpy(), labels=val.labels.numpy())
    args = ["benchmarks/quality.py", "score", str(ingest), "--cache", str(cache), "--json"]
    sets = ["--set", f"val={tmp_path / 'val.npz'}", "--set", f"real={tmp_path / 'real.npz'}"]
    _run(*args, str(out_json), "--against", "val", *sets)
    res = json.loads(out_json.read_text())
    assert res["val"]["all"]["FD_cnn0"] < 1e-6 < res["real"]["all"]["FD_cnn0"]
    with pytest.raises(AssertionError, match="it needs --against test"):
        _run(*args, str(out_json), "--against", "val", "--real-ref", "40", *sets)

    # Against the held-out part of train: extractors fitted on a patient-level half only; the
    # held-out images score 0 against themselves, the fitted half does not, and a cache fitted
    # on all of train is refused (its extractors saw the reference).
    from medsynth.data.datasets import fraction_rows

    train = load_split(ingest, "train")
    seen = {r["row"] for r in fraction_rows(train.rows, 0.5, 0)}
    held = torch.tensor([r["row"] not in seen for r in train.rows])
    assert 0 < held.sum() < len(held)
    for name, m in (("held", held), ("seen", ~held)):
        x, y = train.images[m].numpy(), train.labels[m].numpy()
        np.savez(tmp_path / f"{name}.npz", images=x, labels=y)
    sets = ["--set", f"held={tmp_path / 'held.npz'}", "--set", f"seen={tmp_path / 'seen.npz'}"]
    hargs = ["benchmarks/quality.py", "score", str(ingest), "--json", str(out_json)]
    with pytest.raises(AssertionError, match="needs extractors fitted on a train fraction"):
        _run(*hargs, "--cache", str(cache), "--against", "heldout", *sets)
    frac = tmp_path / "frac"
    fit = ["benchmarks/quality.py", "extractors", str(ingest), "--epochs", "1"]
    _run(*fit, "--cache", str(frac), "--only", "cnn0", "--train-fraction", "0.5")
    with pytest.raises(AssertionError, match="use another --cache"):
        _run(*fit, "--cache", str(frac), "--only", "cnn0")
    grid = ["--grid", str(tmp_path / "held.png")]
    printed = _run(*hargs, "--cache", str(frac), "--against", "heldout", *sets, *grid)
    assert "first rows: real heldout" in printed  # the grid names the reference it shows
    res = json.loads(out_json.read_text())
    assert res["held"]["all"]["n"] == res["held"]["all"]["n_real"] == int(held.sum())
    assert res["held"]["all"]["FD_cnn0"] < 1e-6 < res["seen"]["all"]["FD_cnn0"]


def test_class_guidance_argument_parses_sets_and_names_what_is_wrong():
    classes = ["normal", "pneumonia"]
    got = class_guidance_arg(["normal=3,1.25", "pneumonia=2"], classes)
    assert got == {0: [1.25, 3.0], 1: 2.0}  # a set is sorted, as in a protocol
    for spec, why in (
        ("Normal=2", "unknown class 'Normal'; known"),
        ("normal=1.5,x", "not CLASS=SCALE"),
        ("normal", "not CLASS=SCALE"),
        ("normal=2,2", "twice"),
        ("normal=-1", ">= 0"),
    ):
        with pytest.raises(SystemExit, match=why):
            class_guidance_arg([spec], classes)
