"""Adaptation: init_from with a new class list, LoRA save/load/merge, leak check, resume, and
an unconditional base."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from medsynth.diffusion.sampler import sample
from medsynth.diffusion.unet import UNetConfig
from medsynth.training.adapt import BaseModelError, remap_class_embedding
from medsynth.training.checkpoint import load_snapshot
from medsynth.training.loop import train
from medsynth.training.provenance import DataLeakError

TINY = UNetConfig(channels=[16, 32], attention_levels=[False, True], num_head_channels=16)
LORA = {"kind": "lora", "rank": 4, "alpha": 4.0, "targets": ["attention", "conv"]}
KW = dict(unet=TINY, batch_size=8, warmup_steps=2, progress=False)


def _data(n=32, shape=(1, 16, 16), classes=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g) * 2 - 1, torch.arange(n) % classes


def _tiny():
    return UNetConfig(**TINY.to_dict())  # train() sets num_classes on the object it gets


def _sample(model, sched, n_classes, seeds=(0, 1, 2, 3)):
    labels = [i % max(1, n_classes) for i in range(len(seeds))]  # 0 classes: null only
    return sample(
        model,
        sched,
        labels,
        list(seeds),
        image_shape=(1, 16, 16),
        null_label=n_classes,
        sampler="dpmpp",
        steps=5,
        guidance_scale=2.0,
    )


def _adapt_two_steps(base, out, images, labels, unet):
    """Adapt ``base`` to classes ['a', 'b'] for two steps (the checks fail before any)."""
    kw = dict(KW, unet=unet)
    return train(images, labels, ["a", "b"], out, init_from=str(base), max_steps=2, **kw)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A two-class base ['a', 'b'] trained a few steps on random images."""
    images, labels = _data(seed=1)
    out = tmp_path_factory.mktemp("base")
    kw = dict(KW, unet=_tiny())
    return train(images, labels, ["a", "b"], out, max_steps=6, checkpoint_every_steps=6, **kw)


def test_init_from_with_new_class_list(base, tmp_path):
    base_model, _, base_cfg = load_snapshot(base)
    # Remapping: known names keep their row, new classes and null start from the base's null.
    model, _, _ = load_snapshot(base)
    remap_class_embedding(model, ["a", "b"], ["b", "c", "d"])
    old, new = base_model.class_embedding.weight, model.class_embedding.weight
    assert new.shape == (4, old.shape[1])
    assert torch.equal(new[0], old[1]) and torch.equal(new[1], old[2])
    assert torch.equal(new[2], old[2]) and torch.equal(new[3], old[2])
    assert not torch.equal(old[0], old[2])  # the rows differ, so the copies above mean something

    images, labels = _data(classes=3)
    snap = train(
        images,
        labels,
        ["b", "c", "d"],
        tmp_path,
        init_from=str(base),
        adapter={"kind": "full"},
        max_steps=4,
        checkpoint_every_steps=4,
        **dict(KW, unet=_tiny()),
    )
    model, sched, cfg = load_snapshot(snap)
    assert cfg["classes"] == ["b", "c", "d"] and cfg["unet"]["num_classes"] == 3
    assert cfg["base"]["sha256"] and cfg["adapter"]["kind"] == "full"
    out = _sample(model, sched, 3)
    assert out.shape == (4, 1, 16, 16) and torch.isfinite(out).all()
    # The base's provenance is carried along: adapting twice cannot launder a leak.
    assert set(base_cfg["provenance"]["train_pixel_sha256"]) <= set(
        cfg["provenance"]["train_pixel_sha256"]
    )


@pytest.mark.parametrize(
    ("shape", "why"), [((1, 8, 8), r"\(1, 16, 16\).*\(1, 8, 8\)"), ((3, 16, 16), "channels")]
)
def test_resolution_or_channel_mismatch_fails_clearly(base, tmp_path, shape, why):
    images, labels = _data(n=8, shape=shape)
    with pytest.raises(BaseModelError, match=why) as exc:
        _adapt_two_steps(base, tmp_path, images, labels, _tiny())
    assert str(base) in str(exc.value) and "must match" in str(exc.value)


def test_lora_save_load_merge_round_trip(base, tmp_path):
    images, labels = _data(classes=3, seed=2)
    snap = train(
        images,
        labels,
        ["a", "b", "new"],
        tmp_path / "lora",
        init_from=str(base),
        adapter=LORA,
        lr=1e-2,
        max_steps=8,
        checkpoint_every_steps=8,
        **dict(KW, unet=_tiny()),
    )
    # Only what changed is stored: adapter tensors and the class embedding.
    assert not (snap / "ema.safetensors").exists()
    tensors = load_file(snap / "adapter.safetensors")
    assert tensors and all("lora_" in k or k.startswith("class_embedding.") for k in tensors)
    assert (snap / "adapter.safetensors").stat().st_size < (
        base / "ema.safetensors"
    ).stat().st_size / 3
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in tensors.items())

    merged, sched, cfg = load_snapshot(snap)
    unmerged, _, _ = load_snapshot(snap, merge=False)
    assert not any("lora_" in k for k in merged.state_dict())  # a plain UNet again
    assert any("lora_" in k for k in unmerged.state_dict())
    a, b = _sample(merged, sched, 3), _sample(unmerged, sched, 3)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    base_model, _, _ = load_snapshot(base)
    with torch.no_grad():
        x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 500])
        c = torch.tensor([0, 1])
        assert not torch.allclose(merged(x, t, class_labels=c), base_model(x, t, class_labels=c))

    # It loads wherever the base is found by hash, and says so clearly when it is not.
    moved = tmp_path / "elsewhere" / "base"
    shutil.copytree(base, moved)
    shutil.copytree(snap, tmp_path / "copy")
    cfg_path = tmp_path / "copy/config.json"
    c = json.loads(cfg_path.read_text())
    c["base"].update(path=str(tmp_path / "gone"), relpath="../gone")
    cfg_path.write_text(json.dumps(c))
    with pytest.raises(BaseModelError, match="needs its base snapshot sha256"):
        load_snapshot(tmp_path / "copy")
    again, _, _ = load_snapshot(tmp_path / "copy", base=moved)
    torch.testing.assert_close(_sample(again, sched, 3), a, atol=1e-4, rtol=0)
    other = tmp_path / "other"
    shutil.copytree(base, other)
    (other / "config.json").write_text((other / "config.json").read_text() + " ")
    with pytest.raises(BaseModelError, match="another model"):
        load_snapshot(tmp_path / "copy", base=other)


def test_unconditional_base_then_adapt(tmp_path):
    images, labels = _data(seed=3)
    snap = train(
        images,
        labels,
        ["x", "y"],
        tmp_path / "base",
        unconditional=True,
        max_steps=4,
        checkpoint_every_steps=4,
        **dict(KW, unet=_tiny()),
    )
    model, sched, cfg = load_snapshot(snap)
    assert cfg["classes"] == [] and model.class_embedding.weight.shape[0] == 1
    assert (tmp_path / "base/preview-0000004.png").exists()
    assert _sample(model, sched, 0, seeds=(0, 1)).shape == (2, 1, 16, 16)
    ad = train(
        images,
        labels,
        ["normal", "pneumonia"],
        tmp_path / "ad",
        init_from=str(snap),
        adapter=LORA,
        max_steps=4,
        checkpoint_every_steps=4,
        **dict(KW, unet=_tiny()),
    )
    model, sched, cfg = load_snapshot(ad)
    assert cfg["classes"] == ["normal", "pneumonia"]
    assert torch.isfinite(_sample(model, sched, 2)).all()


# --- leak check and resume, on a tiny phantom ingest ---------------------------------------

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
  max_steps: 40
  batch_size: 8
  checkpoint_every_steps: 10
  keep_states: 2
  warmup_steps: 5
  log_every_steps: 5
"""


@pytest.fixture(scope="module")
def phantom_run(tmp_path_factory):
    from medsynth.data.ingest import ingest_dataset
    from medsynth.protocol import parse_protocol

    run = tmp_path_factory.mktemp("run")
    proto = parse_protocol(TINY_YAML)
    ingest_dataset(proto.dataset, run)
    return run, proto


def test_leak_check_refuses_overlapping_base(phantom_run, tmp_path):
    from medsynth.data.datasets import load_split
    from medsynth.training.api import train_from_sections

    run, proto = phantom_run
    kw = dict(KW, unet=_tiny(), max_steps=2, checkpoint_every_steps=2)
    everything = load_split(run / "ingest", "all")  # includes val and test
    leaky = train(
        everything.images, everything.labels, everything.classes, tmp_path / "leaky", **kw
    )
    clean_data = load_split(run / "ingest", "train")
    clean = train(
        clean_data.images, clean_data.labels, clean_data.classes, tmp_path / "clean", **kw
    )

    training = proto.training.model_copy(update={"init_from": str(leaky), "max_steps": 2})
    with pytest.raises(DataLeakError, match=r"trained on \d+ of the \d+ val images") as exc:
        train_from_sections(run / "ingest", tmp_path / "a", proto.model, proto.schedule, training)
    assert str(leaky) in str(exc.value)
    assert not (tmp_path / "a").exists()  # refused before anything was written

    training = training.model_copy(update={"init_from": str(clean)})
    snap = train_from_sections(
        run / "ingest", tmp_path / "b", proto.model, proto.schedule, training, progress=False
    )
    assert snap.exists()

    # A base without provenance cannot be checked, so it is refused too.
    cfg = json.loads((clean / "config.json").read_text())
    del cfg["provenance"]
    (clean / "config.json").write_text(json.dumps(cfg))
    training = training.model_copy(update={"init_from": str(clean)})
    with pytest.raises(DataLeakError, match="records no training-image provenance"):
        train_from_sections(run / "ingest", tmp_path / "c", proto.model, proto.schedule, training)


def _cli(*args, **popen):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "medsynth.cli", *args], env=env, **popen)


def test_sigkill_during_lora_adaptation_then_resume_is_bit_identical(base, tmp_path):
    proto = tmp_path / "adapt.yaml"
    proto.write_text(
        TINY_YAML
        + f"  init_from: {base}\n"
        + "  adapter: {kind: lora, rank: 4, alpha: 4.0, targets: [attention, conv]}\n"
    )
    ref = _cli("train", str(proto), "--run-dir", str(tmp_path / "ref"), stderr=subprocess.PIPE)
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-2000:]

    run = tmp_path / "killed"
    p = _cli("train", str(proto), "--run-dir", str(run), stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "train/state-0000020.pt").exists():
        assert p.poll() is None, "finished before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run / "train/snapshot-0000040").exists()
    resumed = _cli("train", str(proto), "--run-dir", str(run), stderr=subprocess.DEVNULL)
    assert resumed.wait(timeout=300) == 0

    name = "snapshot-0000040/adapter.safetensors"
    a, b = load_file(tmp_path / "ref/train" / name), load_file(run / "train" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = torch.load(tmp_path / "ref/train/state-0000040.pt", weights_only=True)
    sb = torch.load(run / "train/state-0000040.pt", weights_only=True)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


def test_generation_from_adapter_snapshot_and_provenance_on_resume(base, tmp_path):
    from medsynth.generation.pool import generate_pool

    images, labels = _data(classes=2, seed=4)
    kw = dict(KW, unet=_tiny(), init_from=str(base), adapter=LORA, checkpoint_every_steps=2)
    train(images, labels, ["a", "b"], tmp_path / "ad", max_steps=2, **kw)
    more, _ = _data(classes=2, seed=5)
    snap = train(more, labels, ["a", "b"], tmp_path / "ad", max_steps=4, **kw)  # resumes at 2
    prov = json.loads((snap / "config.json").read_text())["provenance"]["train_pixel_sha256"]
    from medsynth.training.provenance import pixel_hashes

    assert set(pixel_hashes(images)) | set(pixel_hashes(more)) <= set(prov)

    res = generate_pool(
        snap,
        tmp_path / "pool",
        {"a": 2, "b": 1},
        steps=3,
        batch_size=3,
        progress=False,
        device="cpu",
    )
    assert res["pool_complete"] and res["pool_images"] == 3
    assert len(list((tmp_path / "pool/dicom").rglob("*.dcm"))) == 3


def test_retrained_base_reruns_the_adaptation_stage(base, tmp_path):
    from medsynth.experiment.runner import plan_stages
    from medsynth.experiment.sweep import _train_sha, fraction_protocol
    from medsynth.protocol import parse_protocol
    from medsynth.runfolder import stage_inputs

    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    proto = parse_protocol(TINY_YAML + f"  init_from: {copy}\n")
    plain = parse_protocol(TINY_YAML)
    assert stage_inputs(plain) == stage_inputs(plain, None)  # unchanged without a base
    before = plan_stages(proto, tmp_path / "run")[1].inputs_sha256
    sweep_before = _train_sha(proto, 0.5)  # a sweep's per-fraction generator, likewise
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(dict(cfg, step=cfg["step"] + 1)))
    after = plan_stages(proto, tmp_path / "run")[1].inputs_sha256
    assert before != after
    assert _train_sha(proto, 0.5) != sweep_before
    assert _train_sha(plain, 0.5) == stage_inputs(fraction_protocol(plain, 0.5))["train"]


def test_init_from_names_a_snapshot_train_or_run_folder_or_one_glob_match(base, tmp_path):
    from medsynth.training.adapt import resolve_base

    for i in (1, 2):
        shutil.copytree(base, tmp_path / f"run-{i}/train" / base.name)
    assert resolve_base(base) == base
    assert resolve_base(tmp_path / "run-1") == tmp_path / "run-1/train" / base.name
    assert resolve_base(tmp_path / "run-2/train") == tmp_path / "run-2/train" / base.name
    assert resolve_base(str(tmp_path / "run-1*")) == tmp_path / "run-1/train" / base.name
    with pytest.raises(BaseModelError, match="matches 2 folders"):
        resolve_base(str(tmp_path / "run-*"))
    with pytest.raises(BaseModelError, match="no complete snapshot"):
        resolve_base(tmp_path)


def test_adapting_with_another_embedding_injection_names_it(base, tmp_path):
    images, labels = _data()
    unet = UNetConfig(**dict(TINY.to_dict(), embedding_injection="scale_shift"))
    with pytest.raises(
        BaseModelError, match="embedding_injection: base add vs protocol scale_shift"
    ):
        _adapt_two_steps(base, tmp_path, images, labels, unet)
