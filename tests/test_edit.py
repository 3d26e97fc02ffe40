"""Edited pools end to end on a tiny phantom run: inpainting and SDEdit from protocol and CLI,
byte-identical whatever the batch, resumable, DERIVED/EDITED DICOM, no source identifier."""

import csv
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from medsynth.cli import app
from medsynth.data.datasets import split_rows
from medsynth.data.ingest import ingest_dataset
from medsynth.dicom.read import load_unit_image
from medsynth.dicom.write import synthetic_decode_options
from medsynth.generation.api import edit_from_protocol
from medsynth.generation.edit import edit_pool, plan_sources
from medsynth.generation.masks import MaskSource
from medsynth.protocol import load_protocol, parse_protocol
from medsynth.training.api import train_from_sections
from tests.test_generation import _identifying_values, _scan_outputs

YAML = """\
name: edit
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
edit:
  max_sources: 5
  steps: 6
  batch_size: 3
  inpaint: {mask: "rect:4,3,12,10", jump_length: 2, resamplings: 2}
  vary: {strength: 0.4}
"""
SNAP = "train/snapshot-0000020"


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


def _manifest(folder: Path) -> list[dict]:
    return list(csv.DictReader(open(folder / "manifest.csv")))


def test_inpaint_from_protocol_keeps_outside_and_says_derived(run):
    proto = load_protocol(run / "p.yaml")
    res = edit_from_protocol(proto, run, "inpaint", progress=False)
    assert res["edited"] == 5 and res["pool_complete"]
    pool = run / "generate/inpaint"
    rows = _manifest(pool)
    cache = np.load(run / "ingest/images.npy")
    mask = np.zeros((16, 16), bool)
    mask[3:10, 4:12] = True
    for r in rows:
        assert r["edit"] == "inpaint" and r["mask"] == "rect:4,3,12,10"
        assert r["counterfactual"] == "1" and r["class_name"] != r["source_class"]
        assert (pool / r["mask_path"]).is_file()
        ds = pydicom.dcmread(pool / r["path"])
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "SYNTHETIC", "EDITED"]
        assert "patient image" in ds.DeidentificationMethod
        assert "EDIT inpaint" in ds.DerivationDescription and ds.PatientID.startswith("EDIT-")
        img = load_unit_image(pool / r["path"], synthetic_decode_options(1))[0] * 2 - 1
        src = cache[int(r["source_row"]), 0]
        assert np.abs(img - src)[~mask].max() < 1e-3  # 12-bit storage rounding only
        assert np.abs(img - src)[mask].mean() > 0.02
    # The source's identifiers appear nowhere: only its cache row is recorded.
    train_uids = {r["SOPInstanceUID"] for r in split_rows(run / "ingest", "train")}
    assert not train_uids & {r["SOPInstanceUID"] for r in rows}


def test_same_edits_any_batch_size_and_resume(run, tmp_path):
    proto = load_protocol(run / "p.yaml")
    rows = split_rows(run / "ingest", "train")
    sources = plan_sources(rows, ["normal", "opacity"], proto.edit)
    cache = np.load(run / "ingest/images.npy", mmap_mode="r")
    masks = MaskSource("rect:2,2,9,9", 16)

    def go(out, batch):
        sec = proto.edit.model_copy(update={"batch_size": batch})
        return edit_pool(
            run / SNAP, cache, sources, out, sec, kind="inpaint", masks=masks, progress=False
        )

    go(tmp_path / "a", 5)
    go(tmp_path / "b", 2)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    # Remove one edit and damage another: a rerun redoes exactly those two, same bytes.
    before = _tree(tmp_path / "a")
    rows_a = _manifest(tmp_path / "a")
    (tmp_path / "a" / rows_a[0]["path"]).unlink()
    (tmp_path / "a" / rows_a[1]["path"]).write_bytes(b"torn")
    res = go(tmp_path / "a", 5)
    assert res["edited"] == 2 and res["already_present"] == 3
    assert _tree(tmp_path / "a") == before
    # The vary settings do not shape inpainting: changing them keeps the pool resumable.
    other = proto.edit.model_copy(
        update={"vary": proto.edit.vary.model_copy(update={"strength": 0.9})}
    )
    res = edit_pool(
        run / SNAP,
        cache,
        sources,
        tmp_path / "a",
        other,
        kind="inpaint",
        masks=masks,
        progress=False,
    )
    assert res["edited"] == 0 and res["pool_complete"]
    # Another request into the same folder is refused rather than mixed.
    with pytest.raises(ValueError, match="another request"):
        edit_pool(
            run / SNAP,
            cache,
            sources[:2],
            tmp_path / "a",
            proto.edit,
            kind="inpaint",
            masks=masks,
            progress=False,
        )


def test_vary_cli_same_class_and_counterfactual(run):
    cli = CliRunner()
    args = ["edit", "vary", str(run / "p.yaml"), "--run-dir", str(run)]
    res = cli.invoke(app, [*args, "--strength", "0.3", "--pool", "var"])
    assert res.exit_code == 0, res.output
    assert "edit vary -> pool var: edited 5" in res.output
    rows = _manifest(run / "generate/var")
    assert len(rows) == 5 and all(r["class_name"] == r["source_class"] for r in rows)
    assert {r["strength"] for r in rows} == {"0.3"} and {r["counterfactual"] for r in rows} == {"0"}
    res = cli.invoke(app, [*args, "--strength", "0.6", "--to-class", "opacity", "--pool", "cf"])
    assert res.exit_code == 0, res.output
    rows = _manifest(run / "generate/cf")
    assert {r["class_name"] for r in rows} == {"opacity"}
    assert any(r["counterfactual"] == "1" for r in rows)
    res = cli.invoke(app, [*args, "--to-class", "effusion", "--pool", "bad"])
    assert res.exit_code == 2 and "to_class 'effusion' is not a class" in res.output


def test_inpaint_cli_mask_errors_name_the_file(run, tmp_path):
    from PIL import Image

    Image.fromarray(np.full((20, 20), 255, np.uint8)).save(tmp_path / "wrong.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "blank.png")
    cli = CliRunner()
    args = ["edit", "inpaint", str(run / "p.yaml"), "--run-dir", str(run), "--pool", "x"]
    res = cli.invoke(app, [*args, "--mask", f"png:{tmp_path / 'wrong.png'}"])
    assert res.exit_code == 2
    assert "wrong.png is 20x20 pixels but the model works at 16x16" in res.output
    res = cli.invoke(app, [*args, "--mask", f"png:{tmp_path / 'blank.png'}"])
    assert res.exit_code == 2 and "blank.png is empty" in res.output
    res = cli.invoke(app, [*args, "--mask", "ellipse:1,2"])
    assert res.exit_code == 2 and "boxes:PATH, png:PATH or rect" in res.output
    assert not (run / "generate/x/manifest.csv").exists()


def test_study_arms_variations_and_counterfactual_count_matched(run):
    from medsynth.evaluation.study import run_study

    proto = parse_protocol(
        YAML,
        [
            "evaluation.seeds=2",
            "evaluation.classifier.epochs=2",
            "evaluation.bootstrap=100",
            "evaluation.ratios=[0.5]",
            "evaluation.arms=[real_only,duplicate_control,variations,counterfactual]",
            "evaluation.pools=[var,cf]",
        ],
    )
    res = run_study(
        run / "ingest", run / "generate", run / "evaluate", proto.evaluation, progress=False
    )
    arms = [u["arm"] for u in res["uplift"]]
    # var (s=0.3, same class) fills both classes: compared with the ratio's duplicate control.
    # cf (s=0.6, all -> opacity) has counterfactuals of one class only: its own control.
    assert "variations@0.3:var@0.5" in arms and "counterfactual@0.6:cf@0.5" in arms
    runs = list(csv.DictReader(open(run / "evaluate/runs.csv")))
    n_extra = {r["arm"]: r["n_extra"] for r in runs}
    up = {u["arm"]: u for u in res["uplift"]}
    cf, var = "counterfactual@0.6:cf@0.5", "variations@0.3:var@0.5"
    assert up[cf]["control"] == f"duplicate_control:{cf}" and "auc_vs_dup" in up[cf]
    for arm in (cf, var):
        assert n_extra[arm] == n_extra[up[arm]["control"]] != "0"
    # The ratio's own control is used when the pool fills its counts (8 here; var holds 5).
    assert n_extra["duplicate_control@0.5"] == "8" and up[var]["control"] != "duplicate_control@0.5"
    memo = res["memorization"]["var"]
    assert memo["derived_from_patient"] and 0 <= memo["share_nearest_is_source"] <= 1
    assert memo["share_flagged_edits"] == memo["share_flagged"]
    # The audit's nearest neighbour of each edit is compared with the edit's own source row.
    from medsynth.evaluation.edit_arms import edit_audit_fields

    rows = [{"source_row": "7"}, {"source_row": "3"}]
    train = [{"row": "3"}, {"row": "5"}, {"row": "7"}]
    fake = {"share_flagged": 0.5, "per_sample": {"pixel_nn": [2, 1]}}
    assert edit_audit_fields(fake, rows, train)["share_nearest_is_source"] == 0.5


def test_dataset_card_and_audit_line_say_patient_derived(run):
    import json

    from medsynth.evaluation.memorization import audit_line
    from medsynth.experiment.report import _edited_cards

    memo = json.loads((run / "evaluate/memorization.json").read_text())
    line = audit_line(memo["var"])
    assert line.startswith("EDITED pool, derived from training patients' images")
    assert "nearest to their own source" in line
    cards = "".join(_edited_cards(run, memo))
    for pool in ("inpaint", "var", "cf"):
        assert f"edited pool <code>{pool}</code>" in cards
    assert cards.count("Derived from patient images") == 3
    assert "DERIVED\\SECONDARY\\SYNTHETIC\\EDITED" in cards
    assert "not run (add the pool to evaluation)" in cards  # inpaint was not evaluated


def test_review_shows_source_edit_difference_mask(run):
    import os

    from streamlit.testing.v1 import AppTest

    from medsynth.review.edits import edit_panels

    pool = run / "generate/inpaint"
    row = _manifest(pool)[0]
    p = edit_panels(run, pool, row)
    assert set(p) == {"source", "edit", "difference", "difference_max", "mask"}
    outside = p["mask"] == 0
    assert float(p["difference_max"]) > 0.01
    assert p["difference"][outside].max() * float(p["difference_max"]) < 1e-3

    app = Path(__file__).resolve().parents[1] / "dashboards/review.py"
    os.environ["MEDSYNTH_RUN"] = str(run)
    try:
        at = AppTest.from_file(str(app), default_timeout=60)
        at.query_params["reviewer"] = "me"
        at.run()
        at.sidebar.selectbox[0].set_value("inpaint").run()
        at.radio(key="view").set_value("Review").run()
        assert not at.exception
        text = " ".join(m.value for m in at.markdown)
        assert "EDITED (derived from a patient image)" in text
        captions = [c for img in at.get("image") for c in img.captions]
        assert len(captions) == 4
        assert any(c.startswith("REAL source · cache row") for c in captions)
        assert any(c.startswith("|edit − source|") for c in captions)
        assert any(c.startswith("mask · rect:") for c in captions)
    finally:
        del os.environ["MEDSYNTH_RUN"]


def test_canary_scan_of_edited_outputs_finds_nothing(run):
    # Runs after the edit tests above: every edited pool of this run is scanned.
    assert list((run / "generate").glob("*/manifest.csv"))
    values = _identifying_values(run / "phantoms")
    assert any(b"CANARY" in v for v in values) and len(values) > 50
    assert _scan_outputs(run, values) == []
    (run / "generate/inpaint/leak.txt").write_bytes(sorted(values)[0])
    assert len(_scan_outputs(run, values)) == 1
    (run / "generate/inpaint/leak.txt").unlink()
