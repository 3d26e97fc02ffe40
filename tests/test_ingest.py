"""Ingest: label join, patient-level splits, cache contents; shared real datasets when present."""

import csv
from collections import defaultdict

import numpy as np
import pydicom
import pytest

from medsynth.data.index import IngestError, assign_splits, check_patient_splits
from medsynth.data.ingest import ingest, ingest_dataset
from medsynth.protocol import DatasetSection, parse_protocol

from .conftest import shared_dataset


def _rows(path):
    return list(csv.DictReader(open(path)))


def test_phantom_ingest_patient_split_and_cache(phantom_dir, tmp_path):
    ds = DatasetSection(
        root=str(phantom_dir),
        labels_csv=str(phantom_dir / "labels.csv"),
        join_attribute="AccessionNumber",
        join_column="accession",
        label_column="finding",
        classes=["normal", "opacity"],
        spatial_size=32,
        intensity="bits",
        workers=2,
    )
    summary = ingest(ds, tmp_path)
    rows = _rows(tmp_path / "index.csv")
    assert summary.images == len(rows) > 40 and summary.skipped == 0
    splits = defaultdict(set)
    for r in rows:
        splits[r["PatientID"]].add(r["split"])
    assert all(len(s) == 1 for s in splits.values())
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert {r["label"] for r in rows} == {"normal", "opacity"}
    images = np.load(tmp_path / "images.npy")
    assert images.shape == (len(rows), 1, 32, 32) and -1 <= images.min() < images.max() <= 1
    # Same seed, same splits; another seed, other splits.
    again = ingest(ds, tmp_path / "again")
    assert again.counts == summary.counts
    other = ingest(ds.model_copy(update={"split_seed": 5}), tmp_path / "other")
    assert [r["split"] for r in _rows(tmp_path / "other/index.csv")] != [r["split"] for r in rows]
    assert other.images == summary.images


def test_phantom_headers_carry_canaries(phantom_dir):
    f = next(phantom_dir.rglob("IM*"))
    ds = pydicom.dcmread(f)
    assert str(ds.PatientName).startswith("CANARY^")
    assert ds.InstitutionName.startswith("CANARY") and ds.PatientBirthDate
    photometrics = {
        pydicom.dcmread(p, stop_before_pixels=True).PhotometricInterpretation
        for p in phantom_dir.rglob("IM*")
    }
    assert photometrics == {"MONOCHROME1", "MONOCHROME2"}


def test_ingest_dataset_phantoms_kind(tmp_path):
    proto = parse_protocol(
        "dataset:\n  kind: phantoms\n  spatial_size: 16\n  workers: 1\n"
        "  phantoms: {n_patients: 12, size_px: 32, num_classes: 3}\n"
    )
    summary = ingest_dataset(proto.dataset, tmp_path)
    assert summary.classes == ["normal", "opacity", "cardiomegaly"]
    assert (tmp_path / "phantoms/.complete").exists() and summary.images >= 12


def test_missing_key_column_and_empty_class(phantom_dir, tmp_path):
    base = dict(root=str(phantom_dir), labels_csv=str(phantom_dir / "labels.csv"), workers=1)
    with pytest.raises(
        IngestError, match="no column 'SOPInstanceUID'.*accession, patient, finding"
    ):
        ingest(DatasetSection(**base), tmp_path)
    with pytest.raises(IngestError, match=r"class\(es\) \['nodule'\] have no images"):
        ingest(
            DatasetSection(
                **base,
                join_attribute="AccessionNumber",
                join_column="accession",
                label_column="finding",
                classes=["normal", "opacity", "nodule"],
            ),
            tmp_path,
        )
    with pytest.raises(IngestError, match="data folder not found"):
        ingest(DatasetSection(**dict(base, root=str(tmp_path / "nope"))), tmp_path)


def test_split_column_with_patient_leak_is_refused():
    rows = [
        {"path": "a", "PatientID": "p1", "label_index": 0, "label": "x", "table_split": "train"},
        {"path": "b", "PatientID": "p1", "label_index": 0, "label": "x", "table_split": "test"},
    ]
    with pytest.raises(IngestError, match="more than one split"):
        assign_splits(rows)
    rows = [
        {"path": str(i), "PatientID": f"p{i // 2}", "label_index": i % 2, "label": "ab"[i % 2]}
        for i in range(200)
    ]
    assign_splits(rows, fractions={"train": 0.6, "val": 0.2, "test": 0.2}, seed=3)
    check_patient_splits(rows)
    n = defaultdict(int)
    for r in rows:
        n[r["split"]] += 1
    assert 100 <= n["train"] <= 140 and n["val"] > 20 and n["test"] > 20


def test_pneumoniamnist_official_split_and_pixels(tmp_path):
    root = shared_dataset("pneumoniamnist-dicom")
    proto = parse_protocol(_pmnist_yaml(root))
    summary = ingest(proto.dataset, tmp_path)
    assert summary.images == 5856 and summary.skipped == 0
    assert summary.counts["train"] == {"normal": 1214, "pneumonia": 3494}
    assert sum(summary.counts["val"].values()) == 524
    assert sum(summary.counts["test"].values()) == 624
    # Pixel values survive exactly: cached [-1, 1] float16 maps back to the stored uint8.
    rows = _rows(tmp_path / "index.csv")
    images = np.load(tmp_path / "images.npy", mmap_mode="r")
    for r in rows[:: len(rows) // 25]:
        stored = pydicom.dcmread(root / r["path"]).pixel_array
        back = np.round((images[int(r["row"]), 0].astype(np.float32) + 1) * 127.5).astype(np.uint8)
        np.testing.assert_array_equal(back, stored)


def _pmnist_yaml(root):
    return f"""
dataset:
  root: {root}
  labels_csv: {root / "labels.csv"}
  classes: [normal, pneumonia]
  split_column: split
  spatial_size: 28
  intensity: bits
"""


def test_rsna_jpeg_ingest_at_64(tmp_path):
    root = shared_dataset("rsna-pneumonia-dicom")
    ds = DatasetSection(
        root=str(root),
        labels_csv=str(root / "labels.csv"),
        join_attribute="PatientID",
        join_column="patientId",
        label_column="Target",
        spatial_size=64,
    )
    summary = ingest(ds, tmp_path)
    # Only side tables beside the images (boxes.csv) are skipped, as not DICOM.
    skipped = _rows(tmp_path / "skipped.csv")
    assert summary.images == 400 and summary.skipped == len(skipped)
    assert all(r["path"].endswith(".csv") and r["reason"] == "not DICOM" for r in skipped)
    assert sum(summary.counts[s]["1"] for s in summary.counts) == 139
    images = np.load(tmp_path / "images.npy")
    assert images.shape == (400, 1, 64, 64)
    assert images.std(axis=(1, 2, 3)).min() > 0.1  # real decoded content, not blank
    assert {r["ViewPosition"] for r in _rows(tmp_path / "index.csv")} == {"AP", "PA"}
