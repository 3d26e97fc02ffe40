"""Generation: byte-reproducible pools, resume after SIGKILL, shards, valid synthetic DICOM,
and no identifying value of any training file in any output."""

import csv
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medsynth import runtime
from medsynth.data.ingest import ingest_dataset
from medsynth.generation.dataset import load_pool
from medsynth.generation.pool import generate_pool, plan_counts
from medsynth.protocol import parse_protocol
from medsynth.training.api import train_from_sections

YAML = """\
name: gen
dataset:
  kind: phantoms
  spatial_size: 16
  workers: 1
  phantoms: {n_patients: 20, size_px: 32}
model:
  channels: [16, 32]
  attention_levels: [false, true]
  num_head_channels: 16
training: {max_steps: 20, batch_size: 8, checkpoint_every_steps: 20, warmup_steps: 5}
generation: {per_class: 12, steps: 4, batch_size: 5}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    (run / "p.yaml").write_text(YAML)
    proto = parse_protocol(YAML)
    ingest_dataset(proto.dataset, run)
    train_from_sections(
        run / "ingest", run / "train", proto.model, proto.schedule, proto.training, progress=False
    )
    return run


def _tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "parts" not in p.parts
    }


def _gen(run: Path, out: Path, plan: dict | None = None, **kw):
    return generate_pool(
        run / "train/snapshot-0000020",
        out,
        plan or {"normal": 7, "opacity": 5},
        steps=4,
        progress=False,
        **kw,
    )


def test_same_request_same_bytes_any_batch_size(run, tmp_path):
    a = _gen(run, tmp_path / "a", batch_size=5)
    _gen(run, tmp_path / "b", batch_size=3)
    assert a["generated"] == 12 and a["pool_complete"]
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    rows = list(csv.DictReader(open(tmp_path / "a/manifest.csv")))
    assert [(r["class_name"], r["index"]) for r in rows] == [
        ("normal", str(i)) for i in range(7)
    ] + [("opacity", str(i)) for i in range(5)]
    assert len({r["SOPInstanceUID"] for r in rows}) == 12 and len({r["seed"] for r in rows}) == 12


def test_precision_auto_is_the_precision_it_picks(run, tmp_path, monkeypatch):
    """The pool request records what ``auto`` resolved to: an auto pool and an explicit pool of
    that precision are byte-identical, and one resumes the other."""
    monkeypatch.setattr(runtime, "native_bf16", lambda device="cpu": False)
    _gen(run, tmp_path / "auto", precision="auto", plan={"normal": 3, "opacity": 2})
    _gen(run, tmp_path / "fp32", precision="fp32", plan={"normal": 3, "opacity": 2})
    assert _tree(tmp_path / "auto") == _tree(tmp_path / "fp32")
    again = _gen(run, tmp_path / "auto", precision="fp32", plan={"normal": 3, "opacity": 2})
    assert again["generated"] == 0 and again["pool_complete"]


def test_shards_equal_unsharded_pool(run, tmp_path):
    _gen(run, tmp_path / "whole")
    first = _gen(run, tmp_path / "split", shard=(0, 2))
    assert not first["pool_complete"] and first["pool_missing"] == 6
    second = _gen(run, tmp_path / "split", shard=(1, 2))
    assert second["pool_complete"]
    assert _tree(tmp_path / "whole") == _tree(tmp_path / "split")


def test_resume_skips_verified_and_redoes_damaged(run, tmp_path):
    ref = tmp_path / "ref"
    _gen(run, ref)
    out = tmp_path / "out"
    _gen(run, out)
    # Damage: a corrupted file, a deleted file, a torn manifest line.
    (out / "dicom/normal/000002.dcm").write_bytes(b"garbage")
    (out / "dicom/opacity/000003.dcm").unlink()
    part = next((out / "parts").glob("*.csv"))
    part.write_text(part.read_text()[:-40])
    again = _gen(run, out)
    assert again["generated"] == 3 and again["already_present"] == 9  # torn row's file redone too
    assert _tree(out) == _tree(ref)


def test_sigkill_midway_then_rerun(run, tmp_path):
    proto = run / "p.yaml"
    cmd = [
        sys.executable,
        "-m",
        "medsynth.cli",
        "generate",
        str(proto),
        "--run-dir",
        str(run),
        "--set",
        "generation.pool=killed",
        "--set",
        "generation.per_class=40",
        "--set",
        "generation.batch_size=2",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    out = run / "generate/killed"
    deadline = time.time() + 120
    while len(list(out.glob("dicom/*/*.dcm"))) < 10:
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (out / "manifest.csv").exists()
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    ref = cmd[:]
    ref[ref.index("generation.pool=killed")] = (
        "generation.pool=killed"  # same pool name: same seeds
    )
    whole = tmp_path / "whole"
    shutil.copytree(run / "ingest", whole / "ingest")
    shutil.copytree(run / "train", whole / "train")
    subprocess.run([*cmd[:6], str(whole), *cmd[7:]], env=env, check=True, capture_output=True)
    rows = list(csv.DictReader(open(out / "manifest.csv")))
    assert len(rows) == 80 and len({r["path"] for r in rows}) == 80
    assert _tree(out) == _tree(whole / "generate/killed")


def test_synthetic_dicom_says_so_and_reads_back(run, tmp_path):
    _gen(run, tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "manifest.csv")))
    ds = pydicom.dcmread(tmp_path / rows[0]["path"])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and ds.ConversionType == "SYN"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "SYNTHETIC"]
    assert ds.BurnedInAnnotation == "NO" and ds.PatientIdentityRemoved == "YES"
    assert "seed=" + rows[0]["seed"] in ds.DerivationDescription
    assert ds.SeriesDescription == "SYNTHETIC normal"
    assert ds.private_block(0x0011, "MEDSYNTH 1")[0x01].value == "normal"
    pool = load_pool(tmp_path, classes=["normal", "opacity"])
    assert pool.images.shape == (12, 1, 16, 16) and pool.labels.tolist() == [0] * 7 + [1] * 5
    # Modality values come back on the training scale to within one 12-bit step.
    modality = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(pool.images[0, 0].numpy(), modality, atol=1e-3)


@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmtk's dcmdump not installed")
def test_dcmtk_reads_without_errors(run, tmp_path):
    _gen(run, tmp_path)
    f = next(tmp_path.glob("dicom/normal/*.dcm"))
    res = subprocess.run(["dcmdump", "-E", str(f)], capture_output=True, text=True)
    assert res.returncode == 0 and "E:" not in res.stderr, res.stderr
    assert "SYNTHETIC" in res.stdout


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy not installed")
def test_dciodvfy_secondary_capture_iod_has_no_errors(run, tmp_path):
    _gen(run, tmp_path)
    f = next(tmp_path.glob("dicom/opacity/*.dcm"))
    res = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True)
    text = res.stdout + res.stderr
    assert "SCImage" in text
    assert not [line for line in text.splitlines() if line.startswith("Error")], text


def test_plan_counts_modes():
    real = {"a": 10, "b": 40}
    assert plan_counts("per_class", ["a", "b"], real, per_class=5) == {"a": 5, "b": 5}
    assert plan_counts("ratio", ["a", "b"], real, ratio=0.5) == {"a": 5, "b": 20}
    assert plan_counts("balance", ["a", "b"], real) == {"a": 30, "b": 0}
    assert plan_counts("per_class", ["a", "b"], real, counts={"b": 1}) == {"a": 100, "b": 1}
    with pytest.raises(ValueError, match="unknown classes"):
        plan_counts("per_class", ["a", "b"], real, counts={"c": 1})


def test_tiny_study_end_to_end(run):
    from medsynth.evaluation.study import run_study
    from medsynth.generation.api import generate_from_protocol

    proto = parse_protocol(
        YAML,
        [
            "evaluation.seeds=2",
            "evaluation.classifier.epochs=2",
            "evaluation.bootstrap=100",
            "evaluation.ratios=[0.5,1]",
        ],
    )
    generate_from_protocol(proto, run, progress=False)
    res = run_study(
        run / "ingest", run / "generate", run / "evaluate", proto.evaluation, progress=False
    )
    arms = [u["arm"] for u in res["uplift"]]
    assert arms == [
        "real_only",
        "classical_aug",
        "duplicate_control@0.5",
        "synthetic:main:random@0.5",
        "duplicate_control@1",
        "synthetic:main:random@1",
        "synthetic_only:main",
    ]
    runs = list(csv.DictReader(open(run / "evaluate/runs.csv")))
    assert len(runs) == 7 * 2
    syn = next(u for u in res["uplift"] if u["arm"] == "synthetic:main:random@1")
    assert {"auc_vs_real", "auc_vs_dup", "auc_vs_dup_ci_low"} <= set(syn)
    dup = [r for r in runs if r["arm"] == "duplicate_control@1"][0]
    synr = [r for r in runs if r["arm"] == "synthetic:main:random@1"][0]
    assert dup["n_extra"] == synr["n_extra"]  # count-matched control
    assert "FD_clf" in res["fidelity"]["synthetic:main:random@1"]["all"]
    assert res["memorization"]["main"]["n_synthetic"] == 24
    for f in ("uplift.csv", "fidelity.json", "memorization.json", "summary.json", "features.npz"):
        assert (run / "evaluate" / f).exists()


def _identifying_values(source: Path) -> set[bytes]:
    keywords = (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "InstitutionName",
        "ReferringPhysicianName",
        "AccessionNumber",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "StudyDate",
    )
    values = set()
    for f in source.rglob("*"):
        if f.is_file() and f.name != "labels.csv" and not f.name.startswith("."):
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            values |= {
                str(ds.get(k, "")).encode() for k in keywords if len(str(ds.get(k, ""))) >= 6
            }
            values.add(str(ds.PatientName).split("^")[-1].encode())
    return values


def _scan_outputs(run: Path, values: set[bytes]) -> list[str]:
    outputs = [
        run / "train",
        run / "generate",
        run / "evaluate",
        run / "protocol.yaml",
        run / "environment.json",
    ]
    hits = []
    for root in outputs:
        for f in [root] if root.is_file() else root.rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                hits += [f"{f}: {v!r}" for v in values if v in data]
    return hits


def test_canary_no_source_identifier_in_any_output(run):
    # Runs after the study test in this module, so evaluate/ outputs are scanned too.
    values = _identifying_values(run / "phantoms")
    assert any(b"CANARY" in v for v in values) and len(values) > 50
    generate_pool(
        run / "train/snapshot-0000020",
        run / "generate/canary",
        {"normal": 3, "opacity": 3},
        steps=3,
        progress=False,
        export_png=True,
    )
    assert _scan_outputs(run, values) == []
    # The scan can fail: an identifier planted in an output is found.
    (run / "generate/canary/leak.txt").write_bytes(sorted(values)[0])
    assert len(_scan_outputs(run, values)) == 1
    (run / "generate/canary/leak.txt").unlink()
