from pathlib import Path

import pytest

from medsynth.protocol import ProtocolError, load_protocol, parse_protocol

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
name: t
dataset:
  kind: phantoms
  spatial_size: 16
training:
  max_steps: 5
"""


def test_all_bundled_protocols_validate():
    files = sorted((REPO / "protocols").glob("*.yaml"))
    assert files
    for f in files:
        load_protocol(f)


def test_misspelled_key_names_key_line_and_valid_choices():
    text = GOOD.replace("  spatial_size: 16", "  spatial_sise: 16")
    with pytest.raises(ProtocolError) as exc:
        parse_protocol(text, source="p.yaml")
    msg = str(exc.value)
    assert "p.yaml:4" in msg
    assert "dataset.spatial_sise" in msg
    assert "Did you mean 'spatial_size'" in msg
    assert "root" in msg and "labels_csv" in msg  # valid keys listed


def test_unknown_kind_lists_valid_choices():
    with pytest.raises(ProtocolError) as exc:
        parse_protocol(GOOD.replace("kind: phantoms", "kind: nifti"))
    msg = str(exc.value)
    assert "dicom_folder" in msg and "phantoms" in msg and ":3" in msg


def test_unknown_section_fails():
    with pytest.raises(ProtocolError, match="unknown key 'trainig'"):
        parse_protocol(GOOD + "trainig:\n  lr: 1\n")


def test_set_overrides_and_hash():
    a = parse_protocol(GOOD)
    b = parse_protocol(GOOD, ["training.max_steps=7", "dataset.phantoms.num_classes=3"])
    assert b.training.max_steps == 7 and b.dataset.phantoms.num_classes == 3
    assert a.sha256() != b.sha256()
    assert a.sha256() == parse_protocol(GOOD).sha256()
    with pytest.raises(ProtocolError, match="unknown key 'training.max_step'"):
        parse_protocol(GOOD, ["training.max_step=7"])
    with pytest.raises(ProtocolError, match="key.path=value"):
        parse_protocol(GOOD, ["training.max_steps"])


def test_dicom_folder_needs_root_and_table():
    with pytest.raises(ProtocolError, match="needs dataset.root"):
        parse_protocol("dataset:\n  kind: dicom_folder\n")


def test_relative_paths_resolve(tmp_path):
    p = tmp_path / "sub" / "p.yaml"
    p.parent.mkdir()
    p.write_text("dataset:\n  root: ../data\n  labels_csv: labels.csv\n")
    proto = load_protocol(p)
    assert proto.dataset.root == str((tmp_path / "data").resolve())
    assert proto.dataset.labels_csv == str((tmp_path / "data" / "labels.csv").resolve())


def test_resolved_protocol_written(tmp_path):
    from medsynth.runfolder import prepare_run_dir, run_dir_for

    proto = parse_protocol(GOOD)
    run = prepare_run_dir(proto, run_dir_for(proto, tmp_path))
    assert run.name.startswith("t-") and run == run_dir_for(
        parse_protocol(GOOD, ["training.lr=0.1"]), tmp_path
    )
    assert (run / "protocol.sha256").read_text().strip() == proto.sha256()
    again = parse_protocol((run / "protocol.yaml").read_text())
    assert again.sha256() == proto.sha256()
