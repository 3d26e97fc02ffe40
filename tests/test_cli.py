"""The command line: help reads, user errors are one paragraph with exit code 2."""

from typer.testing import CliRunner

from medsynth.cli import app

runner = CliRunner()


def test_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("phantoms", "ingest", "validate-protocol", "train"):
        assert cmd in res.output


def test_misspelled_key_is_a_clear_error(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("dataset:\n  kind: phantoms\ntraining:\n  max_stepz: 3\n")
    res = runner.invoke(app, ["validate-protocol", str(p)])
    assert res.exit_code == 2
    assert "unknown key 'training.max_stepz'" in res.output and "max_steps" in res.output
    assert "Traceback" not in res.output


def test_missing_data_folder_is_a_clear_error(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text(f"dataset:\n  root: {tmp_path / 'nothing'}\n  labels_csv: {tmp_path / 'l.csv'}\n")
    (tmp_path / "l.csv").write_text("SOPInstanceUID,label\n")
    res = runner.invoke(app, ["ingest", str(p), "--run-dir", str(tmp_path / "run")])
    assert res.exit_code == 2 and "data folder not found" in res.output


def test_run_dry_run_prints_the_expanded_sweep(tmp_path):
    from pathlib import Path

    from typer.testing import CliRunner

    from medsynth.cli import app

    proto = Path(__file__).resolve().parents[1] / "protocols" / "smoke_sweep.yaml"
    res = CliRunner().invoke(
        app, ["run", str(proto), "--run-dir", str(tmp_path / "r"), "--dry-run"]
    )
    assert res.exit_code == 0, res.output
    assert "6 synthetic configuration(s)" in res.output and "estimated time" in res.output
    assert "sweep/f0.5/evaluate/proportional/g2-dpmpp3-p1" in res.output
    assert not (tmp_path / "r").exists()  # a dry run writes nothing
    bad = CliRunner().invoke(
        app, ["run", str(proto), "--dry-run", "--set", "sweep.curve_pools=[nope]"]
    )
    assert bad.exit_code == 2 and "curve_pools names ['nope']" in bad.output
