"""Stage commands record their markers like `run`; thread count from --threads / runtime.threads."""

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medsynth.cli import app
from medsynth.experiment.runner import plan_stages
from medsynth.protocol import ProtocolError, load_protocol, parse_protocol
from medsynth.runtime import resolve_threads

SMOKE = Path(__file__).resolve().parents[1] / "protocols" / "smoke.yaml"
runner = CliRunner()


def _ok(args: list[str]) -> str:
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res.output


def test_each_stage_command_records_its_stage_so_run_skips_it(tmp_path):
    run = str(tmp_path / "run")
    proto = load_protocol(SMOKE)
    for i, stage in enumerate(("ingest", "train", "generate", "evaluate", "report")):
        _ok([stage, str(SMOKE), "--run-dir", run, "--threads", "1"])
        actions = [p.action for p in plan_stages(proto, Path(run))]
        assert actions[: i + 1] == ["skip"] * (i + 1), (stage, actions)
    assert (tmp_path / "run/report/index.html").exists()
    # Performance-only knobs do not change what a stage computes: still all skipped.
    fast = load_protocol(SMOKE, ["generation.batch_size=3", "runtime.threads=2"])
    assert [p.action for p in plan_stages(fast, Path(run))] == ["skip"] * 5
    # A second pool is recorded beside the first; neither invalidates the other.
    _ok(["generate", str(SMOKE), "--run-dir", run, "--set", "generation.pool=other"])
    assert [p.action for p in plan_stages(proto, Path(run))] == ["skip"] * 5
    assert (tmp_path / "run/generate/other/manifest.csv").exists()
    out = _ok(["run", str(SMOKE), "--run-dir", run])
    assert "skipped" in out and "[train] run" not in out


def test_threads_option_protocol_setting_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(None) == 3
    assert resolve_threads(2) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert resolve_threads(None) == len(os.sched_getaffinity(0))  # every CPU for one job
    assert parse_protocol("dataset: {kind: phantoms}\nruntime: {threads: 2}\n").runtime.threads == 2
    with pytest.raises(ProtocolError, match="runtime.threads"):
        parse_protocol("dataset: {kind: phantoms}\nruntime: {threads: 0}\n")
    # The protocol hash (and so every manifest) ignores how many threads computed it.
    a = parse_protocol("dataset: {kind: phantoms}\n")
    b = parse_protocol(
        "dataset: {kind: phantoms}\nruntime: {threads: 2}\n", ["generation.batch_size=7"]
    )
    assert a.sha256() == b.sha256()
    before = torch.get_num_threads()
    try:
        run = str(tmp_path / "run")
        res = runner.invoke(app, ["ingest", str(SMOKE), "--run-dir", run, "--threads", "0"])
        assert res.exit_code == 2
        torch.set_num_threads(2)
        _ok(["ingest", str(SMOKE), "--run-dir", run, "--threads", "1"])
        assert torch.get_num_threads() == 1
        _ok(["ingest", str(SMOKE), "--run-dir", run, "--set", "runtime.threads=2"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
