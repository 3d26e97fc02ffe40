"""Resume hygiene: only published snapshots count; temp orphans of a kill are cleaned on resume."""

import os
from pathlib import Path

import pytest
import torch

from medsynth.diffusion.unet import UNetConfig
from medsynth.generation.pool import generate_pool
from medsynth.training.checkpoint import COMPLETE, latest_snapshot
from medsynth.training.loop import train

TINY = UNetConfig(channels=(16, 32), attention_levels=(False, True), num_head_channels=16)


def _train(out: Path, max_steps: int) -> Path:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 1, 16, 16, generator=g) * 2 - 1
    labels = torch.arange(16) % 2
    return train(
        images,
        labels,
        ["a", "b"],
        out,
        unet=TINY,
        max_steps=max_steps,
        batch_size=8,
        warmup_steps=2,
        checkpoint_every_steps=5,
        progress=False,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train")
    _train(out, 5)
    return out


def test_latest_snapshot_ignores_an_unpublished_tmp_folder(trained, tmp_path):
    # A kill between writing COMPLETE and the rename leaves snapshot-XXXXXXX.tmp with a marker.
    tmp = trained / "snapshot-0009999.tmp"
    tmp.mkdir()
    (tmp / COMPLETE).write_text("ok\n")
    try:
        assert latest_snapshot(trained).name == "snapshot-0000005"
    finally:
        (tmp / COMPLETE).unlink()
        tmp.rmdir()


def test_training_resume_cleans_temp_orphans(tmp_path):
    out = tmp_path / "train"
    _train(out, 5)
    orphans = [out / ".state-0000010.pt.k1l2m3.tmp", out / "snapshot-0000010.tmp"]
    orphans[0].write_bytes(b"x" * 100)
    orphans[1].mkdir()
    (orphans[1] / "ema.safetensors").write_bytes(b"x")
    keep = out / "notes.txt"  # not ours: left alone
    keep.write_text("mine")
    snap = _train(out, 10)
    assert snap.name == "snapshot-0000010" and (snap / COMPLETE).exists()
    assert not any(p.exists() for p in orphans[:1]) and not (out / "snapshot-0000010.tmp").exists()
    assert keep.exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_generation_resume_cleans_its_temp_orphans_only(trained, tmp_path):
    out = tmp_path / "pool"
    snap = latest_snapshot(trained)
    plan, kw = {"a": 2, "b": 2}, dict(steps=2, progress=False)
    generate_pool(snap, out, plan, **kw)
    cls = out / "dicom" / "a"
    mine = cls / ".000000.dcm.q8w7e6.tmp"  # a kill during the write of item (a, 0)
    manifest_tmp = out / ".manifest.csv.z9y8x7.tmp"
    other = cls / ".000001.dcm.r5t4y3.tmp"  # item (a, 1) is shard 1's: maybe a write under way
    for p in (mine, manifest_tmp, other):
        p.write_bytes(b"partial")
    (cls / "000000.dcm").unlink()
    res = generate_pool(snap, out, plan, shard=(0, 2), **kw)
    assert res["generated"] == 1 and res["pool_complete"]
    assert not mine.exists() and not manifest_tmp.exists()
    assert other.exists()
    assert sorted(os.listdir(cls)) == [".000001.dcm.r5t4y3.tmp", "000000.dcm", "000001.dcm"]


def test_resume_with_another_thread_count_warns(tmp_path):
    out = tmp_path / "train"
    _train(out, 5)
    # As if the interrupted run had used another thread count (running it would be slow here).
    path = out / "state-0000005.pt"
    state = torch.load(path, weights_only=True)
    assert state["threads"] == torch.get_num_threads()
    state["threads"] = torch.get_num_threads() + 1
    torch.save(state, path)
    with pytest.warns(UserWarning, match="threads"):
        _train(out, 6)
