"""Start from a trained generator: full fine-tuning or LoRA, new class lists, adapter snapshots.

A run with ``init_from`` builds the base's network from its snapshot, checks that resolution,
channels, architecture and schedule match, gives the target's class list an embedding table of
its own (rows of classes the base knows are copied, new classes and the null class start from
the base's null row, so at step 0 every new class samples like the base's unconditional model),
then either trains everything (``full``) or freezes the base and trains LoRA adapters plus the
class embedding (``lora``).

An adapter snapshot holds ``config.json`` (with ``base: {sha256, path, relpath}``) and
``adapter.safetensors`` (EMA adapter tensors and the class embedding only). It loads wherever
the base snapshot is found (explicit ``base=``, the recorded relative path, then the recorded
absolute path) with the recorded SHA-256; the loaded network is merged by default.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from medsynth.diffusion.schedule import ScheduleConfig
from medsynth.diffusion.unet import UNetConfig
from medsynth.training.lora import inject_lora, is_adapter_key, merge_lora

ADAPTER_FILE = "adapter.safetensors"


class BaseModelError(ValueError):
    """The base model cannot be used for this adaptation; the message says why and what to do."""


def resolve_base(init_from: str | Path) -> Path:
    """A snapshot folder from a snapshot, a ``train/`` folder or a run folder (glob allowed)."""
    from medsynth.training.checkpoint import COMPLETE, latest_snapshot

    text = str(init_from)
    matches = sorted(glob.glob(os.path.expanduser(text))) if glob.has_magic(text) else [text]
    if len(matches) != 1:
        raise BaseModelError(
            f"training.init_from {text!r} matches {len(matches)} folders "
            f"({', '.join(matches[:5]) or 'none'}); it must name exactly one base"
        )
    path = Path(matches[0]).expanduser()
    if (path / "config.json").is_file() and (path / COMPLETE).is_file():
        return path
    for train_dir in (path / "train", path):
        if train_dir.is_dir() and any(train_dir.glob("snapshot-[0-9]*")):
            return latest_snapshot(train_dir)
    raise BaseModelError(
        f"training.init_from {path}: no complete snapshot there (expected a snapshot folder, "
        "a train folder or a run folder whose base training has finished)"
    )


def check_compatible(
    base_cfg: dict, base_dir: Path, image_shape: tuple, unet: UNetConfig, schedule: ScheduleConfig
) -> None:
    """Raise :class:`BaseModelError` unless image shape, architecture and schedule match."""
    want = tuple(base_cfg["image_shape"])
    if tuple(image_shape) != want:
        raise BaseModelError(
            f"base snapshot {base_dir} was trained on images of shape {want} (channels, H, W); "
            f"the target's are {tuple(image_shape)}. Resolution and channels must match: set "
            f"dataset.spatial_size: {want[1]} and dataset.color to "
            f"{'rgb' if want[0] == 3 else 'grey'}, or pretrain a base at this size"
        )
    # Every field, defaults included (a saved config leaves out the ones added at their default).
    mine = {k: v for k, v in asdict(unet).items() if k != "num_classes"}
    theirs = {k: v for k, v in asdict(UNetConfig(**base_cfg["unet"])).items() if k != "num_classes"}
    if mine != theirs:
        diff = {k: (theirs[k], mine[k]) for k in mine if mine[k] != theirs[k]}
        raise BaseModelError(
            f"the model section differs from the base snapshot {base_dir}: "
            f"{', '.join(f'{k}: base {a} vs protocol {b}' for k, (a, b) in diff.items())}; "
            "copy the base's model section into the protocol"
        )
    if schedule.to_dict() != base_cfg["schedule"]:
        raise BaseModelError(
            f"the schedule section differs from the base snapshot {base_dir} "
            f"({base_cfg['schedule']}); an adapted model must keep its base's schedule"
        )


@torch.no_grad()
def remap_class_embedding(model: nn.Module, base_classes: list[str], classes: list[str]) -> None:
    """Give ``model`` a ``(len(classes) + 1, D)`` class embedding built from the base's rows.

    Known class names keep their row; new classes and the null class (last row) get the base's
    null row, so a new class starts out as the base's unconditional model.
    """
    old = model.class_embedding.weight
    null = old[len(base_classes)]
    rows = [old[base_classes.index(c)] if c in base_classes else null for c in classes] + [null]
    emb = nn.Embedding(len(rows), old.shape[1]).to(old)
    emb.weight.copy_(torch.stack(rows))
    model.class_embedding = emb
    model.num_class_embeds = len(rows)


def adapted_model(
    base_dir: Path, base_cfg: dict, classes: list[str], adapter: dict
) -> tuple[nn.Module, UNetConfig]:
    """The network to train: base weights, remapped class embedding, adapters if ``lora``."""
    from medsynth.training.checkpoint import load_snapshot

    model, _, _ = load_snapshot(base_dir)
    model.train()
    remap_class_embedding(model, list(base_cfg["classes"]), classes)
    if adapter["kind"] == "lora":
        inject_lora(model, adapter["rank"], adapter["alpha"], list(adapter["targets"]))
        model.class_embedding.requires_grad_(True)
    unet = UNetConfig(**dict(base_cfg["unet"], num_classes=len(classes)))
    return model, unet


def base_reference(base_dir: Path, out_dir: Path) -> dict:
    """What an adapted snapshot records about its base (hash first; paths are hints)."""
    from medsynth.training.checkpoint import snapshot_sha256

    base_dir = base_dir.resolve()
    return {
        "sha256": snapshot_sha256(base_dir),
        "path": str(base_dir),
        # Relative to a snapshot folder inside out_dir, so a copied tree keeps working.
        "relpath": os.path.relpath(base_dir, (out_dir / "snapshot-x").resolve()),
    }


def snapshot_format(config: dict) -> dict:
    """Keyword arguments for ``save_snapshot``: LoRA snapshots keep only what changed."""
    if (config.get("adapter") or {}).get("kind") != "lora":
        return {}
    return {"weights_file": ADAPTER_FILE, "key_filter": _changed_key}


def _changed_key(key: str) -> bool:
    return is_adapter_key(key) or key.startswith("class_embedding.")


def find_base(snapshot_dir: Path, ref: dict, base: str | Path | None = None) -> Path:
    """The base snapshot an adapter needs, verified by SHA-256; a clear error if absent."""
    from medsynth.training.checkpoint import snapshot_sha256

    candidates = [Path(base)] if base else []
    candidates += [snapshot_dir / ref["relpath"], Path(ref["path"])]
    tried = []
    for c in candidates:
        if (c / "config.json").is_file():
            if snapshot_sha256(c) == ref["sha256"]:
                return c
            tried.append(f"{c} (another model)")
        else:
            tried.append(f"{c} (absent)")
    raise BaseModelError(
        f"adapter snapshot {snapshot_dir} needs its base snapshot sha256:{ref['sha256'][:16]}; "
        f"not found: {'; '.join(tried)}. Copy the base snapshot to one of these places or "
        "pass its folder as base="
    )


def load_adapter_snapshot(
    snapshot_dir: Path, device="cpu", base: str | Path | None = None, merge: bool = True
):
    """Rebuild ``(unet, schedule_config, config)`` from an adapter snapshot and its base."""
    config = json.loads((snapshot_dir / "config.json").read_text())
    base_dir = find_base(snapshot_dir, config["base"], base)
    base_cfg = json.loads((base_dir / "config.json").read_text())
    model, _ = adapted_model(base_dir, base_cfg, list(config["classes"]), config["adapter"])
    tensors = load_file(snapshot_dir / ADAPTER_FILE)
    want = {k for k in model.state_dict() if _changed_key(k)}
    if set(tensors) != want:
        raise BaseModelError(
            f"{snapshot_dir / ADAPTER_FILE} does not match its config's adapter: "
            f"{len(want - set(tensors))} tensors missing, {len(set(tensors) - want)} unexpected"
        )
    model.load_state_dict(tensors, strict=False)
    if merge:
        model = merge_lora(model)
    model.to(device).eval().requires_grad_(False)
    return model, ScheduleConfig(**config["schedule"]), config
