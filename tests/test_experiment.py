"""The study runner end to end on the smoke protocol: stages, skip, recompute, resume, report."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from medsynth.experiment.runner import plan_stages, run_protocol, show
from medsynth.protocol import load_protocol

SMOKE = Path(__file__).resolve().parents[1] / "protocols" / "smoke.yaml"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("smoke")
    res = run_protocol(load_protocol(SMOKE), run_dir=run, log=lambda s: None, progress=False)
    return run, res


def test_smoke_study_end_to_end(smoke_run):
    run, res = smoke_run
    assert [p.action for p in res.plan] == ["run"] * 5
    for f in (
        "protocol.yaml",
        "environment.json",
        "ingest/index.csv",
        "train/log.jsonl",
        "generate/main/manifest.csv",
        "evaluate/uplift.csv",
        "report/index.html",
        "report/samples.png",
        "report/uplift.png",
    ):
        assert (run / f).exists(), f
    page = (run / "report/index.html").read_text()
    for text in (
        "Not for clinical use",
        "duplicate control",
        "FD_clf",
        "Memorization audit",
        "Model card",
        "validation/test images",  # the split-leak count, always stated
        "calibrated on",  # the audit names its calibration set (or says it is not informative)
    ):
        assert text in page or (text == "calibrated on" and "audit not informative" in page), text
    assert "data:image/png;base64," in page  # self-contained
    text = show(run)
    assert "report    done" in text and "synthetic:main:random@1" in text
    assert "have a near-duplicate in train" in text and "memorization audit, pool main:" in text


def test_rerun_skips_and_changed_inputs_recompute_downstream_only(smoke_run):
    run, _ = smoke_run
    proto = load_protocol(SMOKE)
    assert [p.action for p in plan_stages(proto, run)] == ["skip"] * 5
    changed = load_protocol(SMOKE, ["evaluation.seeds=3"])
    assert [p.action for p in plan_stages(changed, run)] == [
        "skip",
        "skip",
        "skip",
        "rerun",
        "rerun",
    ]
    gen = load_protocol(SMOKE, ["generation.guidance_scale=3"])
    assert [p.action for p in plan_stages(gen, run)] == ["skip", "skip", "rerun", "rerun", "rerun"]


def _run_cli(run: Path, **popen):
    # Same thread count as the in-process reference run: float sums depend on it.
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "medsynth.cli", "run", str(SMOKE), "--run-dir", str(run)]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen
    )


def test_interrupted_training_resumes_to_the_same_results(smoke_run, tmp_path):
    ref, _ = smoke_run
    run = tmp_path / "killed"
    p = _run_cli(run)
    deadline = time.time() + 300
    while not (run / "train/state-0000010.pt").exists():
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run / "train/.stage.json").exists()
    assert [pl.action for pl in plan_stages(load_protocol(SMOKE), run)][:2] == ["skip", "resume"]
    assert _run_cli(run).wait(timeout=300) == 0
    a, b = (
        load_file(ref / "train/snapshot-0000030/ema.safetensors"),
        load_file(run / "train/snapshot-0000030/ema.safetensors"),
    )
    assert all((a[k] == b[k]).all() for k in a)
    assert (ref / "generate/main/manifest.csv").read_text() == (
        run / "generate/main/manifest.csv"
    ).read_text()
    assert (ref / "evaluate/uplift.csv").read_text() == (run / "evaluate/uplift.csv").read_text()
    assert json.loads((run / "train/.stage.json").read_text())["inputs_sha256"]


def test_dry_run_and_errors(tmp_path):
    from typer.testing import CliRunner

    from medsynth.cli import app

    res = CliRunner().invoke(
        app, ["run", str(SMOKE), "--run-dir", str(tmp_path / "r"), "--dry-run"]
    )
    assert (
        res.exit_code == 0
        and "ingest    run" in res.output
        and not (tmp_path / "r" / "ingest").exists()
    )
    bad = CliRunner().invoke(
        app, ["run", str(SMOKE), "--run-dir", str(tmp_path / "r"), "--stages", "ingest,paint"]
    )
    assert bad.exit_code == 2 and "valid choices" in bad.output
    sampler = CliRunner().invoke(
        app, ["run", str(SMOKE), "--set", "generation.sampler=heun", "--dry-run"]
    )
    assert (
        sampler.exit_code == 2
        and "'ddpm', 'ddim', 'dpmpp', 'euler' or 'distilled'" in sampler.output
    )


def test_disk_full_is_one_paragraph(tmp_path, monkeypatch):
    import errno

    from typer.testing import CliRunner

    import medsynth.experiment.runner as runner
    from medsynth.cli import app

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.dcm"))

    monkeypatch.setattr(runner, "run_protocol", full)
    res = CliRunner().invoke(app, ["run", str(SMOKE), "--run-dir", str(tmp_path / "r")])
    assert (
        res.exit_code == 2
        and "disk is full" in res.output
        and "rerun the same command" in res.output
    )
    assert "Traceback" not in res.output
