"""Snapshots (what to sample from) and resume states (how to go on), written atomically.

``snapshot-XXXXXXX/``: ``config.json`` (UNet + schedule + classes + image shape) and
``ema.safetensors``; :func:`load_snapshot` rebuilds the network from these two files alone.
``state-XXXXXXX.pt``: raw and EMA weights, optimizer, LR schedule, step and every RNG state,
loadable with ``torch.load(weights_only=True)``. A state or snapshot is only pruned after a
newer one is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from medsynth.diffusion.schedule import ScheduleConfig
from medsynth.diffusion.unet import UNetConfig, build_unet

COMPLETE = "COMPLETE"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def atomic_torch_save(obj: dict, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, chmod 644, rename, fsync folder."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state() -> dict:
    """Every global RNG state, as tensors and plain lists (weights_only-safe)."""
    np_state = np.random.get_state()  # noqa: NPY002 - saving the global state on purpose
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [
            np_state[0],
            np_state[1].tolist(),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))  # noqa: NPY002
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(train_dir: Path, step: int, payload: dict, keep: int) -> Path:
    """Write ``state-{step:07d}.pt`` atomically, then prune all but the ``keep`` newest."""
    path = train_dir / f"state-{step:07d}.pt"
    atomic_torch_save(payload, path)
    for old in list_states(train_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_states(train_dir: Path) -> list[Path]:
    return sorted(Path(train_dir).glob("state-[0-9]*.pt"))


def latest_state(train_dir: Path) -> dict | None:
    """The newest resume state that loads (a corrupt newest one falls back to the previous)."""
    for path in reversed(list_states(train_dir)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a torn file is skipped, the older state is used
            continue
    return None


def save_snapshot(
    train_dir: Path,
    step: int,
    ema: torch.nn.Module,
    config: dict,
    keep: int,
    *,
    weights_file: str = "ema.safetensors",
    key_filter=None,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write ``snapshot-{step:07d}/`` (config.json + ema.safetensors + marker) atomically.

    An adapter snapshot passes ``weights_file="adapter.safetensors"`` and a ``key_filter`` that
    keeps only the tensors that differ from its base. ``extra_files`` (name -> source path) are
    copied in too: a latent model carries its autoencoder, so the snapshot alone decodes.
    """
    final = train_dir / f"snapshot-{step:07d}"
    tmp = train_dir / f"snapshot-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {
        k: v.detach().cpu().contiguous()
        for k, v in ema.state_dict().items()
        if key_filter is None or key_filter(k)
    }
    save_file(weights, tmp / weights_file)
    (tmp / "config.json").write_text(json.dumps(dict(config, step=step), indent=2))
    for name, src in (extra_files or {}).items():
        shutil.copyfile(src, tmp / name)
    for f in (weights_file, "config.json", *(extra_files or {})):
        _fsync_file(tmp / f)
    (tmp / COMPLETE).write_text("ok\n")
    _fsync_file(tmp / COMPLETE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(train_dir)
    for old in list_snapshots(train_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


_SNAPSHOT = re.compile(r"snapshot-\d{7}")
_STATE = re.compile(r"state-\d{7}\.pt")


def list_snapshots(train_dir: Path) -> list[Path]:
    """Published snapshots, oldest first: ``snapshot-XXXXXXX`` with its COMPLETE marker.

    ``snapshot-XXXXXXX.tmp`` is never one, even with its marker: a kill between the marker and
    the rename leaves exactly that, and sampling from it would use an unpublished model.
    """
    return sorted(
        p
        for p in Path(train_dir).glob("snapshot-*")
        if _SNAPSHOT.fullmatch(p.name) and (p / COMPLETE).exists()
    )


def clean_orphans(train_dir: str | Path) -> list[str]:
    """Remove what a kill during a write leaves behind; return the names removed.

    That is ``.state-XXXXXXX.pt.*.tmp`` files (from :func:`atomic_torch_save`, a full-size state
    each) and ``snapshot-XXXXXXX.tmp/`` folders. Only the single writer (rank 0, before it
    writes) may call this: another process's write in progress would be taken for an orphan.
    """
    removed = []
    for p in sorted(Path(train_dir).iterdir()):
        if p.is_file() and p.name.startswith(".") and p.name.endswith(".tmp"):
            target = p.name[1:].rsplit(".", 2)[0]  # .state-0000010.pt.ab12cd.tmp -> state-...pt
            if _STATE.fullmatch(target):
                p.unlink(missing_ok=True)
                removed.append(p.name)
        elif p.is_dir() and p.name.endswith(".tmp") and _SNAPSHOT.fullmatch(p.name[:-4]):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def latest_snapshot(train_dir: str | Path) -> Path:
    snaps = list_snapshots(Path(train_dir))
    if not snaps:
        cmd = "distill" if Path(train_dir).name == "distill" else "train"
        raise FileNotFoundError(f"no complete snapshot in {train_dir}; run `medsynth {cmd}` first")
    return snaps[-1]


def snapshot_sha256(snapshot_dir: str | Path) -> str:
    """SHA-256 over the snapshot's config.json and weights (names the model in outputs).

    An adapter snapshot's config names its base by hash, so its own hash covers the base too.
    """
    h = hashlib.sha256()
    for name in (
        "config.json",
        "ema.safetensors",
        "adapter.safetensors",
        "autoencoder.safetensors",
    ):
        if name == "config.json" or (Path(snapshot_dir) / name).exists():
            h.update((Path(snapshot_dir) / name).read_bytes())
    return h.hexdigest()


def load_snapshot(
    snapshot_dir: str | Path, device: str | torch.device = "cpu", *, base=None, merge: bool = True
):
    """Rebuild ``(unet, schedule_config, config_dict)`` from a snapshot folder alone.

    An adapter snapshot (``adapter.safetensors``) also needs its base snapshot, found by hash
    (``base`` or the recorded paths); ``merge`` folds the adapters into a plain UNet.
    """
    snapshot_dir = Path(snapshot_dir)
    if (snapshot_dir / "adapter.safetensors").exists():
        from medsynth.training.adapt import load_adapter_snapshot

        return load_adapter_snapshot(snapshot_dir, device, base=base, merge=merge)
    config = json.loads((snapshot_dir / "config.json").read_text())
    unet = build_unet(UNetConfig(**config["unet"]))
    unet.load_state_dict(load_file(snapshot_dir / "ema.safetensors"))
    unet.to(device).eval()
    return unet, ScheduleConfig(**config["schedule"]), config


# What a guide shares with the model it guides: the same classes, images and noise process.
GUIDE_TASK_KEYS = ("classes", "image_shape", "schedule", "latent")


def load_guide(guide_dir: str | Path, model_config: dict, device: str | torch.device = "cpu"):
    """The autoguidance guide at ``guide_dir``, checked to model the model's task; its UNet.

    A guide of other classes, image shape, schedule or latent space fails inside the network
    (or silently guides towards another task): refused here, naming what differs.
    """
    unet, _, config = load_snapshot(guide_dir, device)
    differ = [k for k in GUIDE_TASK_KEYS if config.get(k) != model_config.get(k)]
    if differ:
        raise ValueError(
            f"guide {guide_dir} models another task ({', '.join(differ)} differ: "
            f"{[config.get(k) for k in differ]} vs the model's "
            f"{[model_config.get(k) for k in differ]}); a guide must model the same task"
        )
    return unet
