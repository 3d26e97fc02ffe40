"""Messages that used to mislead: each says what is wrong and where."""

import csv

import numpy as np
import pytest
from typer.testing import CliRunner

from medsynth.cli import app
from medsynth.data.index import IngestError
from medsynth.data.ingest import ingest
from medsynth.protocol import DatasetSection, ProtocolError, load_protocol
from medsynth.utils.csvsafe import neutralise, read_rows, restore

from .hostile import image_dataset, write_native

runner = CliRunner()


def _folder(tmp_path, n=4):
    data = tmp_path / "data"
    data.mkdir()
    uids = []
    for i in range(n):
        ds = image_dataset(8, 8, StudyID=str(i), PatientID=f"P{i}")
        write_native(data / f"im{i}.dcm", ds, np.full(64, i * 100, np.uint16).tobytes())
        uids.append(ds.SOPInstanceUID)
    return data, uids


def _ds(data, table, **kw):
    return DatasetSection(root=str(data), labels_csv=str(table), workers=1, spatial_size=8, **kw)


def test_empty_label_table_says_empty_and_names_it(tmp_path):
    data, _ = _folder(tmp_path)
    table = tmp_path / "labels.csv"
    table.write_text("")
    with pytest.raises(IngestError, match=f"label table {table} is empty"):
        ingest(_ds(data, table), tmp_path / "out")


def test_header_only_label_table_says_no_rows(tmp_path):
    data, _ = _folder(tmp_path)
    table = tmp_path / "labels.csv"
    table.write_text("SOPInstanceUID,label\n")
    with pytest.raises(IngestError, match=f"label table {table} has a header but no rows"):
        ingest(_ds(data, table), tmp_path / "out")


def test_every_label_table_error_names_the_table(tmp_path):
    data, uids = _folder(tmp_path)
    table = tmp_path / "labels.csv"
    table.write_text("sop,y\n" + "".join(f"{u},a\n" for u in uids))
    with pytest.raises(IngestError, match=f"label table {table} has no column 'SOPInstanceUID'"):
        ingest(_ds(data, table), tmp_path / "out")
    table.write_text("sop,y\n" + f"{uids[0]},a\n{uids[0]},b\n")
    with pytest.raises(IngestError, match=f"label table {table} gives key"):
        ingest(_ds(data, table, join_column="sop", label_column="y"), tmp_path / "out")


def test_validate_protocol_checks_data_paths(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(f"dataset:\n  root: {tmp_path / 'nope'}\n  labels_csv: {tmp_path / 'l.csv'}\n")
    res = runner.invoke(app, ["validate-protocol", str(p)])
    assert res.exit_code == 2, res.output
    assert f"dataset.root {tmp_path / 'nope'} does not exist" in res.output
    assert f"dataset.labels_csv {tmp_path / 'l.csv'} does not exist" in res.output
    (tmp_path / "nope").mkdir()
    (tmp_path / "l.csv").write_text("SOPInstanceUID,label\nx,a\n")
    res = runner.invoke(app, ["validate-protocol", str(p)])
    assert res.exit_code == 0 and res.output.startswith("ok:"), res.output


def test_set_error_is_attributed_to_set(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("dataset:\n  kind: phantoms\ntraining:\n  max_steps: 3\n")
    with pytest.raises(ProtocolError) as err:
        load_protocol(p, ["training.lr=fast"])
    msg = str(err.value)
    assert "--set training.lr=fast" in msg and f"{p}:3" not in msg, msg
    # An error in the file itself still names its line.
    p.write_text("dataset:\n  kind: phantoms\ntraining:\n  lr: fast\n")
    with pytest.raises(ProtocolError, match=f"{p}:4: training.lr"):
        load_protocol(p)


def test_small_class_warning_in_training_and_report(tmp_path):
    from medsynth.data.datasets import small_class_warnings

    rows = [{"label": "a", "PatientID": f"A{i}", "path": f"a{i}"} for i in range(40)]
    rows += [{"label": "b", "PatientID": f"B{i}", "path": f"b{i}"} for i in range(3)]
    warnings = small_class_warnings(rows, ["a", "b"])
    assert len(warnings) == 1 and "class 'b' has only 3 training images" in warnings[0]
    assert small_class_warnings(rows[:40] + rows[:5], ["a"]) == []


def test_csv_cells_are_neutralised_and_restored(tmp_path):
    for value in [
        "=HYPERLINK(1)",
        "+1+1",
        "-cmd",
        "@SUM(A1)",
        "'=x",
        "\tx",
        "ok",
        "-1.5",
        "",
        "1e3",
    ]:
        assert restore(neutralise(value)) == value
    assert neutralise("=1+1") == "'=1+1" and neutralise("-1.5") == "-1.5"
    assert neutralise("'=x") == "''=x"


def test_formula_labels_are_neutralised_in_index(tmp_path):
    data, uids = _folder(tmp_path)
    table = tmp_path / "labels.csv"
    table.write_text(
        "SOPInstanceUID,label\n"
        + "".join(f"{u},{'=cmd|calc' if i % 2 else '@bad'}\n" for i, u in enumerate(uids))
    )
    ingest(_ds(data, table, classes=["=cmd|calc", "@bad"]), tmp_path / "out")
    raw = list(csv.DictReader((tmp_path / "out" / "index.csv").open()))
    assert {r["label"] for r in raw} == {"'=cmd|calc", "'@bad"}
    assert {r["label"] for r in read_rows(tmp_path / "out" / "index.csv")} == {"=cmd|calc", "@bad"}
    from medsynth.data.datasets import split_rows

    assert {r["label"] for r in split_rows(tmp_path / "out", "all")} == {"=cmd|calc", "@bad"}


def test_formula_class_names_are_neutralised_in_manifests(tmp_path):
    from medsynth.generation.pool import MANIFEST_COLUMNS, _append_row, _read_rows

    row = dict.fromkeys(MANIFEST_COLUMNS, "1")
    row.update(class_name='=HYPERLINK("http://x")', path="dicom/0/000001.dcm")
    part = tmp_path / "part.csv"
    _append_row(part, row)
    raw = next(csv.DictReader(part.open()))
    assert raw["class_name"].startswith("'=")
    assert _read_rows(part) == [row]


def test_small_class_warning_reaches_the_report(tmp_path):
    from medsynth.experiment.report import _small_class_card
    from medsynth.protocol import parse_protocol

    (tmp_path / "ingest").mkdir()
    rows = [f"{c}{i},{c}{i},{c},train" for c, n in (("a", 20), ("b", 2)) for i in range(n)]
    (tmp_path / "ingest" / "index.csv").write_text("path,PatientID,label,split\n" + "\n".join(rows))
    card = _small_class_card(tmp_path, parse_protocol("dataset: {kind: phantoms}"), ["a", "b"])
    assert "class &#x27;b&#x27; has only 2 training images" in card and "&#x27;a&#x27;" not in card


def test_no_usable_images_writes_the_skipped_csv_it_names(tmp_path):
    data, uids = _folder(tmp_path, n=2)
    for f in data.iterdir():
        f.write_bytes(f.read_bytes()[:-100])  # truncated pixel data: fails at decode
    table = tmp_path / "labels.csv"
    table.write_text("SOPInstanceUID,label\n" + f"{uids[0]},a\n{uids[1]},b\n")
    with pytest.raises(IngestError, match="no usable images.*2 file.*skipped.csv"):
        ingest(_ds(data, table), tmp_path / "out")
    reasons = {r["path"]: r["reason"] for r in read_rows(tmp_path / "out" / "skipped.csv")}
    assert set(reasons) == {"im0.dcm", "im1.dcm"}
    assert all("pixel decode failed" in r for r in reasons.values())


def test_study_tables_neutralise_formulas_and_read_back(tmp_path):
    from medsynth.evaluation.study import _write_csv

    _write_csv(tmp_path / "uplift.csv", [{"arm": "=1+1", "auc_vs_real": "-0.5"}])
    raw = next(csv.DictReader((tmp_path / "uplift.csv").open()))
    assert raw == {"arm": "'=1+1", "auc_vs_real": "-0.5"}  # numbers stay numbers
    assert read_rows(tmp_path / "uplift.csv") == [{"arm": "=1+1", "auc_vs_real": "-0.5"}]
