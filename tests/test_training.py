"""Training: resume after SIGKILL is bit-identical, DDP matches one process, NaN stops cleanly,
conditioning conditions."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medsynth import runtime
from medsynth.diffusion.unet import UNetConfig
from medsynth.experiment.report import _precision_text
from medsynth.training.checkpoint import latest_state, load_snapshot
from medsynth.training.loop import NonFiniteLossError, train

TINY_YAML = """\
name: tiny
dataset:
  kind: phantoms
  spatial_size: 16
  workers: 1
  phantoms: {n_patients: 24, size_px: 32}
model:
  channels: [16, 32]
  attention_levels: [false, true]
  num_head_channels: 16
training:
  max_steps: 60
  batch_size: 8
  checkpoint_every_steps: 10
  keep_states: 2
  warmup_steps: 5
  log_every_steps: 5
"""
TINY = UNetConfig(channels=[16, 32], attention_levels=[False, True], num_head_channels=16)


def _cli(*args, **popen):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "medsynth.cli", *args], env=env, **popen)


def _weights(snapshot: Path) -> dict:
    return load_file(snapshot / "ema.safetensors")


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    proto = tmp_path / "tiny.yaml"
    proto.write_text(TINY_YAML)
    ref = _cli("train", str(proto), "--run-dir", str(tmp_path / "ref"), stderr=subprocess.DEVNULL)
    assert ref.wait(timeout=300) == 0

    run = tmp_path / "killed"
    p = _cli("train", str(proto), "--run-dir", str(run), stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "train/state-0000020.pt").exists():
        assert p.poll() is None, "finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run / "train/snapshot-0000060").exists()
    resumed = _cli("train", str(proto), "--run-dir", str(run), stderr=subprocess.DEVNULL)
    assert resumed.wait(timeout=300) == 0

    a, b = (
        _weights(tmp_path / "ref/train/snapshot-0000060"),
        _weights(run / "train/snapshot-0000060"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "ref/train/state-0000060.pt", weights_only=True)
    sb = torch.load(run / "train/state-0000060.pt", weights_only=True)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    # The log has each step once, even though steps after the last state were redone.
    steps = [
        json.loads(line)["step"] for line in (run / "train/log.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(set(steps)) and steps[-1] == 60
    assert len(list((run / "train").glob("state-*.pt"))) == 2  # pruned to keep_states


def test_ddp_two_processes_match_one(tmp_path):
    proto = tmp_path / "tiny.yaml"
    proto.write_text(TINY_YAML.replace("max_steps: 60", "max_steps: 12"))
    one = _cli("train", str(proto), "--run-dir", str(tmp_path / "one"), stderr=subprocess.DEVNULL)
    assert one.wait(timeout=300) == 0
    # Same ingest cache for the two-process run (torchrun needs it ready).
    (tmp_path / "two").mkdir()
    os.symlink(tmp_path / "one/ingest", tmp_path / "two/ingest")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29533",
        "-m",
        "medsynth.cli",
        "train",
        str(proto),
        "--run-dir",
        str(tmp_path / "two"),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = (
        _weights(tmp_path / "one/train/snapshot-0000012"),
        _weights(tmp_path / "two/train/snapshot-0000012"),
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_nonfinite_loss_stops_and_keeps_last_good_state(tmp_path):
    images = torch.rand(16, 1, 16, 16) * 2 - 1
    labels = torch.randint(0, 2, (16,))
    kw = dict(
        unet=TINY, batch_size=4, checkpoint_every_steps=5, progress=False, max_nonfinite_steps=3
    )
    train(images, labels, ["a", "b"], tmp_path, max_steps=5, **kw)
    images[:] = float("nan")
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite losses"):
        train(images, labels, ["a", "b"], tmp_path, max_steps=20, **kw)
    state = latest_state(tmp_path)
    assert state["step"] == 5
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_precision_auto_trains_in_what_it_picks(tmp_path, monkeypatch, capsys):
    """``auto`` resolves per machine (fp32 without native bf16), says so, and records it; the
    report's model card names what ran; a resume where it resolves otherwise (the run moved
    machines) warns: not bit-identical."""
    images, labels = torch.rand(8, 1, 16, 16) * 2 - 1, torch.randint(0, 2, (8,))
    kw = dict(unet=TINY, batch_size=4, precision="auto", progress=False)
    out = tmp_path / "run" / "train"
    unknown = "bf16 autocast where the machine computes bf16 natively, else fp32 (precision auto)"
    assert _precision_text(tmp_path / "run", "auto") == unknown  # nothing trained yet
    monkeypatch.setattr(runtime, "native_bf16", lambda device="cpu": False)
    train(images, labels, ["a", "b"], out, max_steps=2, **kw)
    assert latest_state(out)["precision"] == "fp32"
    assert " in fp32, " in capsys.readouterr().out
    assert _precision_text(tmp_path / "run", "auto") == "fp32 (precision auto)"
    monkeypatch.setattr(runtime, "native_bf16", lambda device="cpu": True)
    with pytest.warns(UserWarning, match="in bf16; it was trained in fp32"):
        train(images, labels, ["a", "b"], out, max_steps=3, **kw)
    assert latest_state(out)["precision"] == "bf16"
    assert _precision_text(tmp_path / "run", "auto") == "bf16 (precision auto)"


def test_resume_refuses_another_model(tmp_path):
    images, labels = torch.rand(8, 1, 16, 16) * 2 - 1, torch.randint(0, 2, (8,))
    train(
        images, labels, ["a", "b"], tmp_path, unet=TINY, max_steps=2, batch_size=4, progress=False
    )
    other = UNetConfig(channels=[16, 16], attention_levels=[False, True], num_head_channels=16)
    with pytest.raises(ValueError, match="another model"):
        train(
            images,
            labels,
            ["a", "b"],
            tmp_path,
            unet=other,
            max_steps=4,
            batch_size=4,
            progress=False,
        )


def test_conditioning_conditions(tmp_path):
    """Two classes that differ only in where the bright blob is: samples must follow the label."""
    g = torch.Generator().manual_seed(0)
    n, s = 128, 16
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    labels = torch.arange(n) % 2
    cx = torch.where(labels == 0, 4.0, 11.0) + torch.randn(n, generator=g) * 0.7
    cy = 7.5 + torch.randn(n, generator=g) * 1.5
    blob = torch.exp(-((xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2) / 6.0)
    images = (blob * 1.8 - 0.9 + torch.randn(n, s, s, generator=g) * 0.05)[:, None]
    snap = train(
        images,
        labels,
        ["left", "right"],
        tmp_path,
        unet=TINY,
        max_steps=300,
        batch_size=32,
        lr=2e-3,
        warmup_steps=20,
        ema_halflife_steps=50,
        checkpoint_every_steps=300,
        progress=False,
    )
    model, sched, cfg = load_snapshot(snap)
    from medsynth.diffusion.sampler import sample

    want = [0] * 16 + [1] * 16
    out = sample(
        model,
        sched,
        want,
        list(range(32)),
        image_shape=(1, s, s),
        null_label=2,
        sampler="dpmpp",
        steps=15,
        guidance_scale=2.0,
    )
    # A simple classifier: which half is brighter?
    left, right = out[:, 0, :, : s // 2].mean((1, 2)), out[:, 0, :, s // 2 :].mean((1, 2))
    predicted = (right > left).long()
    accuracy = (predicted == torch.tensor(want)).float().mean().item()
    assert accuracy >= 0.85, accuracy
    assert cfg["classes"] == ["left", "right"]
