"""Duplicate search and split hygiene: planted exact/near duplicates are all found, no false pairs."""

import csv

import numpy as np
import pydicom
import pytest

from medsynth.data.datasets import split_rows
from medsynth.data.duplicates import find_duplicates
from medsynth.data.index import IngestError
from medsynth.data.ingest import ingest
from medsynth.data.phantoms import draw_anatomy, render, write_phantoms
from medsynth.protocol import DatasetSection


def _phantoms(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """``(n, 1, size, size) float16 in [-1, 1]``, every image a different patient."""
    rng = np.random.default_rng(seed)
    x = [render(draw_anatomy(rng), ("normal", "opacity")[k % 2], 0.3, size, rng) for k in range(n)]
    return (np.stack(x)[:, None] * 2 - 1).astype(np.float16)


def _brute(images: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    u = images.reshape(len(images), -1).astype(np.float32)
    u = u - u.mean(1, keepdims=True)
    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-6)
    i, j = np.nonzero(np.triu(u @ u.T, 1) >= threshold)
    return set(zip(i.tolist(), j.tolist(), strict=True))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(np.float64).ravel(), b.astype(np.float64).ravel())[0, 1])


def _plant(base: np.ndarray, rng) -> tuple[np.ndarray, set, set]:
    """Append exact copies (one of them twice) and near copies; return images, exact, near pairs."""
    n = len(base)
    extra, exact, near = [], set(), set()
    for src in (3, 10, 10):  # 10 appears twice: a group of three identical images
        extra.append(base[src])
    exact |= {(3, n), (10, n + 1), (10, n + 2), (n + 1, n + 2)}
    for k, src in enumerate((20, 21, 22)):
        img = base[src].astype(np.float32)
        if k == 0:  # another window: an affine intensity change keeps correlation at 1
            img = 0.8 * img + 0.1
        else:  # re-acquisition noise: correlation between 0.99 and 0.999
            img = img + rng.normal(0, 0.03, img.shape)
        extra.append(np.clip(img, -1, 1).astype(np.float16))
        near.add((src, n + 3 + k))
    return np.concatenate([base, np.stack(extra)]), exact, near


def test_planted_exact_and_near_duplicates_found_without_false_pairs():
    rng = np.random.default_rng(1)
    base = _phantoms(120)
    assert not _brute(base, 0.99), "distinct phantoms must not be near-duplicates themselves"
    images, exact, near = _plant(base, rng)
    for a, b in near:
        assert 0.99 <= _corr(images[a], images[b]) < 1 or a == 20
    pairs = find_duplicates(images, 0.99, block=32)  # small tiles: exercise the block loop
    found = set(zip(pairs.i.tolist(), pairs.j.tolist(), strict=True))
    assert found == exact | near
    flagged = zip(pairs.i.tolist(), pairs.j.tolist(), pairs.exact.tolist(), strict=True)
    assert {(a, b) for a, b, e in flagged if e} == exact
    assert found == _brute(images, 0.99) | exact


def test_recall_is_exact_even_with_few_projection_axes():
    images = _phantoms(90, seed=3)
    truth = _brute(images, 0.93)
    assert 5 < len(truth) < 2000
    for dims in (2, 8):
        pairs = find_duplicates(images, 0.93, dims=dims, block=16)
        assert set(zip(pairs.i.tolist(), pairs.j.tolist(), strict=True)) == truth


def test_constant_images_match_by_hash_only():
    images = _phantoms(20)
    images[[4, 9]] = 0.25  # two blank frames
    pairs = find_duplicates(images, 0.99)
    assert list(zip(pairs.i.tolist(), pairs.j.tolist(), strict=True)) == [(4, 9)]
    assert pairs.exact.tolist() == [True]


def test_large_exact_group_is_reported_as_a_star():
    images = _phantoms(10)
    images[2:10] = images[1]
    pairs = find_duplicates(images, 0.99, max_group_pairs=4)
    assert len(pairs) == 8 and set(pairs.i.tolist()) == {1}


# --- ingest: planted leaks across splits ------------------------------------------------------


@pytest.fixture(scope="module")
def leaky_dir(tmp_path_factory):
    """Phantom export plus copies of train images filed under new patients in val/test.

    Returns (root, labels with a split column, accessions of the planted copies).
    """
    root = tmp_path_factory.mktemp("leaky")
    write_phantoms(root, n_patients=30, num_classes=2, size_px=32, difficulty=0.3, seed=2)
    rows = list(csv.DictReader(open(root / "labels.csv")))
    patients = sorted({r["patient"] for r in rows})
    split_of = {
        p: ("train", "train", "train", "val", "test")[k % 5] for k, p in enumerate(patients)
    }
    train_files = [f for f in sorted(root.rglob("IM*")) if split_of[f.parts[-3]] == "train"]
    rng = np.random.default_rng(0)
    planted = {}
    for k, src in enumerate(train_files[:6]):
        ds = pydicom.dcmread(src)
        if k >= 3:  # near copies: re-acquisition noise on the stored pixels
            px = ds.pixel_array.astype(np.float32) + rng.normal(0, 25, ds.pixel_array.shape)
            ds.PixelData = np.clip(px, 0, 4095).astype(np.uint16).tobytes()
        pid, acc = f"LEAK{k:03d}", f"LEAKACC{k:03d}"
        ds.PatientID, ds.AccessionNumber = pid, acc
        ds.SOPInstanceUID = ds.SOPInstanceUID + f".9{k}"
        out = root / pid / "ST1" / "IM00001.dcm"
        out.parent.mkdir(parents=True)
        ds.save_as(out)
        label = next(r["finding"] for r in rows if r["accession"] == ds_acc(src))
        rows.append({"accession": acc, "patient": pid, "finding": label})
        split_of[pid] = ("val", "test")[k % 2]
        planted[acc] = k >= 3
    with (root / "labels_split.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["accession", "patient", "finding", "split"])
        w.writeheader()
        w.writerows(dict(r, split=split_of[r["patient"]]) for r in rows)
    return root, planted


def ds_acc(path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).AccessionNumber)


def _section(root, **kw) -> DatasetSection:
    return DatasetSection(
        root=str(root),
        labels_csv=str(root / "labels_split.csv"),
        join_attribute="AccessionNumber",
        join_column="accession",
        label_column="finding",
        classes=["normal", "opacity"],
        spatial_size=32,
        intensity="bits",
        workers=1,
        **kw,
    )


def test_ingest_reports_leaking_heldout_images(leaky_dir, tmp_path):
    root, planted = leaky_dir
    summary = ingest(_section(root, split_column="split"), tmp_path)
    d = summary.duplicates
    assert sum(d["heldout_with_train_duplicate"].values()) == 6
    assert sum(d["heldout_with_train_exact_duplicate"].values()) == 3
    assert "WARNING: 6 of" in summary.line() and "near-duplicate in train" in summary.line()
    dup = list(csv.DictReader(open(tmp_path / "duplicates.csv")))
    index = {r["row"]: r for r in csv.DictReader(open(tmp_path / "index.csv"))}
    cross = [r for r in dup if r["cross_split"] == "1"]
    assert len(cross) == 6
    assert all(
        r["PatientID_a"].startswith("LEAK") != r["PatientID_b"].startswith("LEAK") for r in cross
    )
    assert all(index[r["row_b"]]["PatientID"] == r["PatientID_b"] for r in cross)
    assert {r["exact"] for r in cross} == {"0", "1"}
    # keep: held-out near-copies stay in evaluation.
    assert any(r["PatientID"].startswith("LEAK") for r in split_rows(tmp_path, "test"))


def test_policy_drop_leaves_leaking_images_out_of_evaluation(leaky_dir, tmp_path):
    root, _ = leaky_dir
    summary = ingest(_section(root, split_column="split", duplicate_policy="drop"), tmp_path)
    assert summary.duplicates["excluded"] == 6 and "dropped from evaluation" in summary.line()
    held = split_rows(tmp_path, "val") + split_rows(tmp_path, "test")
    assert held and not any(r["PatientID"].startswith("LEAK") for r in held)
    assert len(split_rows(tmp_path, "all")) == summary.images


def test_policy_fail_stops_with_the_pairs_written(leaky_dir, tmp_path):
    root, _ = leaky_dir
    with pytest.raises(IngestError, match="6 validation/test images have a near-duplicate"):
        ingest(_section(root, split_column="split", duplicate_policy="fail"), tmp_path)
    assert (tmp_path / "duplicates.csv").is_file()


def test_computed_splits_keep_duplicate_groups_together(leaky_dir, tmp_path):
    root, _ = leaky_dir
    for seed in range(3):
        summary = ingest(_section(root, split_seed=seed), tmp_path / str(seed))
        assert sum(summary.duplicates["heldout_with_train_duplicate"].values()) == 0
        dup = list(csv.DictReader(open(tmp_path / str(seed) / "duplicates.csv")))
        assert len(dup) >= 6 and not any(r["cross_split"] == "1" for r in dup)


def test_pneumoniamnist_duplicate_counts(tmp_path):
    """The known state of the official split: 27 exact groups, 8 val images copied in train."""
    from .conftest import shared_dataset

    root = shared_dataset("pneumoniamnist-dicom")
    ds = DatasetSection(
        root=str(root),
        labels_csv=str(root / "labels.csv"),
        classes=["normal", "pneumonia"],
        split_column="split",
        spatial_size=28,
        intensity="bits",
    )
    d = ingest(ds, tmp_path).duplicates
    assert d["heldout_with_train_duplicate"] == {"val": 8, "test": 0}
    assert d["exact_pairs"] == 31 and d["by_splits"]["train-val"] == {"pairs": 10, "exact": 10}


def test_constant_images_have_no_near_duplicates_and_do_not_crash():
    blank = np.zeros((4, 1, 8, 8), np.float16)  # correlation is undefined for constant images
    pairs = find_duplicates(blank)
    assert len(pairs) == 6 and pairs.exact.all()  # 4 identical blank frames: 6 exact pairs


def test_grouping_that_empties_a_computed_split_is_a_clear_error(leaky_dir, tmp_path):
    root, _ = leaky_dir
    # Every chest phantom correlates with some other above 0.3: one group swallows all patients.
    with pytest.raises(IngestError, match=r"computed test/val split is empty.*duplicate_threshold"):
        ingest(_section(root, duplicate_threshold=0.3), tmp_path)
    assert (tmp_path / "duplicates.csv").is_file()  # the pairs are there to inspect
