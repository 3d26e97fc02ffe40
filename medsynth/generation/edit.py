"""Edited pools: inpainted or SDEdit-varied training images, written like generated pools.

An edit is named by (pool, kind, source cache row, repeat j): its seed, and with it every random
draw, derives from that alone, so edit (row, j) is the same image whatever the batch size, shard
split or restart. Files go to ``dicom/<target class>/<index:06d>.dcm`` (index = position in the
plan), each written atomically with its manifest line appended afterwards, exactly as
``generation.pool`` does; a rerun re-verifies claimed files and edits only what is missing.

The pixels derive from a real patient, so the DICOM says ``EDITED`` (see
``dicom.write.synthetic_instance``), and the manifest records the edit, strength, mask and the
source's *cache row* (an index into this run's ingest cache) - never a source identifier.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medsynth import __version__
from medsynth.data.spacing import cache_spacing
from medsynth.dicom.write import atomic_write_bytes, pixel_sha256, synthetic_instance, to_bytes
from medsynth.diffusion.edit import repaint, sdedit
from medsynth.generation.masks import MaskSource
from medsynth.generation.pool import (
    Item,
    _append_row,
    _check_request,
    _clean_orphans,
    _verified,
    write_manifest,
)
from medsynth.protocol_edit import EditSection
from medsynth.runtime import resolve_precision
from medsynth.training.checkpoint import load_snapshot, snapshot_sha256
from medsynth.training.loop import pick_device

EDIT_COLUMNS = (
    "path",
    "SOPInstanceUID",
    "class_name",
    "class_index",
    "index",
    "seed",
    "edit",  # inpaint | vary
    "strength",  # SDEdit s; 1 for inpainting (the masked region is regenerated from noise)
    "source_row",  # cache row of the source image in this run's ingest/index.csv
    "source_class",
    "counterfactual",  # 1 when the target class differs from the source's
    "mask",  # boxes:own:N | boxes:from-row-R:N | png:NAME | rect:x0,y0,x1,y1 | '' (vary)
    "mask_path",  # masks/<index>.png (inpaint) or ''
    "jump_length",
    "resamplings",
    "guidance_scale",
    "steps",
    "snapshot_sha256",
    "protocol_sha256",
    "pixel_sha256",
    "file_sha256",
    "medsynth_version",
)
KINDS = ("inpaint", "vary")


def edit_seed(pool: str, kind: str, source_row: int, repeat: int) -> int:
    """63-bit seed from the edit's name (pool, kind, source cache row, repeat)."""
    digest = hashlib.sha256(f"{pool}/{kind}/{source_row}/{repeat}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def target_class(to_class: str, source: str, classes: list[str]) -> str:
    """``same`` -> the source's class; ``other`` -> the other of two classes; else a name."""
    if to_class == "same":
        return source
    if to_class == "other":
        if len(classes) != 2:
            raise ValueError(
                f"to_class 'other' needs exactly two classes, the model has {classes}; name one"
            )
        return classes[1 - classes.index(source)]
    if to_class not in classes:
        raise ValueError(f"to_class {to_class!r} is not a class; valid: same, other, {classes}")
    return to_class


def plan_sources(rows: list[dict], classes: list[str], section: EditSection) -> list[dict]:
    """The training rows to edit, in cache-row order (a seeded subset under ``max_sources``)."""
    unknown = sorted(set(section.source_classes) - set(classes))
    if unknown:
        raise ValueError(f"edit.source_classes names unknown classes {unknown}; valid: {classes}")
    keep = [r for r in rows if not section.source_classes or r["label"] in section.source_classes]
    keep.sort(key=lambda r: int(r["row"]))
    if section.max_sources and len(keep) > section.max_sources:
        pick = np.random.default_rng(0).permutation(len(keep))[: section.max_sources]
        keep = [keep[i] for i in sorted(pick)]
    if not keep:
        raise ValueError("no training image to edit (check edit.source_classes)")
    return keep


def edit_pool(
    snapshot_dir: str | Path,
    cache: np.ndarray,
    sources: list[dict],
    out_dir: str | Path,
    section: EditSection,
    *,
    kind: str,
    masks: MaskSource | None = None,
    key_attribute: str = "PatientID",
    shard: tuple[int, int] = (0, 1),
    protocol_sha256: str = "",
    resize_mode: str = "pad",  # dataset.resize_mode: how the cache was made (for PixelSpacing)
    progress: bool = True,
) -> dict:
    """Edit ``sources`` (index rows of the train split) into the pool folder ``out_dir``.

    ``cache``: the ingest cache ``(N, C, S, S)`` float in [-1, 1], indexed by cache row.
    ``kind``: ``inpaint`` (needs ``masks``) or ``vary``. Returns counts and rates. An edit keeps
    its source's physical scale: ``PixelSpacing`` is the source's at the cache size.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; valid: {', '.join(KINDS)}")
    if kind == "inpaint" and masks is None:
        raise ValueError("inpainting needs a mask: --mask boxes:PATH | png:PATH | rect:x0,y0,x1,y1")
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard {rank}/{world} is not valid; use i/n with 0 <= i < n")
    sub = section.inpaint if kind == "inpaint" else section.vary
    out = Path(out_dir)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    dev = pick_device(section.device)
    precision = resolve_precision(section.precision, str(dev), "editing")
    model, sched_cfg, cfg = load_snapshot(snapshot_dir, dev)
    classes = cfg["classes"]
    if tuple(cache.shape[1:]) != tuple(cfg["image_shape"]):
        raise ValueError(
            f"ingest cache images are {tuple(cache.shape[1:])} but the snapshot makes "
            f"{tuple(cfg['image_shape'])}; edit with the run's own snapshot"
        )
    mask_of = masks.for_rows(sources, key_attribute) if kind == "inpaint" else {}
    strength = 1.0 if kind == "inpaint" else float(sub.strength)
    snap_sha = snapshot_sha256(snapshot_dir)
    plan = []  # (Item, source row dict, repeat, target class name)
    for r in sources:
        tgt = target_class(sub.to_class, r["label"], classes)
        for j in range(section.per_source):
            plan.append((Item(classes.index(tgt), len(plan)), r, j, tgt))
    mine = [p for pos, p in enumerate(plan) if pos % world == rank]
    request = {
        "edit": kind,
        "snapshot_sha256": snap_sha,
        "pool": sub.pool,
        "sources": [int(r["row"]) for r in sources],
        # Only what shapes these edits: the other command's subsection may change freely.
        "settings": section.model_dump(
            mode="json", exclude={"batch_size", "device", "inpaint", "vary"}
        )
        | {kind: sub.model_dump(mode="json"), "precision": precision},
    }
    with open(out / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _check_request(out, request)
        _clean_orphans(out, {p[0].relpath(p[3]) for p in mine})
    done = _verified(out, EDIT_COLUMNS)
    todo = [p for p in mine if (p[0].class_index, p[0].index) not in done]
    part = out / "parts" / f"shard-{rank}-of-{world}.csv"
    base = (
        f"medsynth {__version__} EDIT {kind} of a real training image (run cache row; no source "
        f"identifier) snapshot sha256:{snap_sha[:16]} steps={section.steps} "
        f"guidance={section.guidance_scale} net_batch={section.net_batch} {precision}"
    )
    base += (
        f" jump_length={sub.jump_length} resamplings={sub.resamplings}"
        if kind == "inpaint"
        else f" strength={strength:g}"
    )
    common = {
        "null_label": len(classes),
        "steps": section.steps,
        "guidance_scale": section.guidance_scale,
        "device": dev,
        "bf16": precision == "bf16",
        "net_batch": section.net_batch,
    }
    t0 = time.perf_counter()
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), disable=not progress, unit="img")
    for start in range(0, len(todo), section.batch_size):
        batch = todo[start : start + section.batch_size]
        seeds = [edit_seed(sub.pool, kind, int(r["row"]), j) for _, r, j, _ in batch]
        src = torch.from_numpy(np.stack([np.asarray(cache[int(r["row"])]) for _, r, _, _ in batch]))
        labels = [it.class_index for it, *_ in batch]
        if kind == "inpaint":
            m = np.stack([mask_of[int(r["row"])][0] for _, r, _, _ in batch])[:, None]
            images = repaint(
                model,
                sched_cfg,
                src.float(),
                torch.from_numpy(m).float(),
                labels,
                seeds,
                jump_length=sub.jump_length,
                resamplings=sub.resamplings,
                **common,
            )
        else:
            images = sdedit(
                model, sched_cfg, src.float(), labels, seeds, strength=strength, **common
            )
        for (it, r, _j, tgt), seed, img in zip(batch, seeds, images.cpu().numpy(), strict=True):
            row = int(r["row"])
            mask_desc, mask_rel = "", ""
            if kind == "inpaint":
                mask_desc = mask_of[row][1]
                mask_rel = f"masks/{it.index:06d}.png"
                _write_mask(out / mask_rel, mask_of[row][0])
            spacing, note = cache_spacing([r], cache.shape[-1], resize_mode)
            ds = synthetic_instance(
                img,
                run_id=snap_sha,
                pool=sub.pool,
                class_name=tgt,
                class_index=it.class_index,
                seed=seed,
                index=it.index,
                derivation=f"{base} target={tgt} seed={seed}",
                edited=True,
                pixel_spacing=spacing,
                spacing_note=note,
            )
            data = to_bytes(ds)
            rel = it.relpath(tgt)
            atomic_write_bytes(out / rel, data)
            _append_row(
                part,
                {
                    "path": rel,
                    "SOPInstanceUID": ds.SOPInstanceUID,
                    "class_name": tgt,
                    "class_index": it.class_index,
                    "index": it.index,
                    "seed": seed,
                    "edit": kind,
                    "strength": strength,
                    "source_row": row,
                    "source_class": r["label"],
                    "counterfactual": int(tgt != r["label"]),
                    "mask": mask_desc,
                    "mask_path": mask_rel,
                    "jump_length": sub.jump_length if kind == "inpaint" else "",
                    "resamplings": sub.resamplings if kind == "inpaint" else "",
                    "guidance_scale": section.guidance_scale,
                    "steps": section.steps,
                    "snapshot_sha256": snap_sha,
                    "protocol_sha256": protocol_sha256,
                    "pixel_sha256": pixel_sha256(ds),
                    "file_sha256": hashlib.sha256(data).hexdigest(),
                    "medsynth_version": __version__,
                },
                EDIT_COLUMNS,
            )
        bar.update(len(batch))
    bar.close()
    want = [(it.class_index, it.index) for it, *_ in plan]
    want.sort()
    n_done, n_missing = write_manifest(out, {}, classes, want=want, columns=EDIT_COLUMNS)
    seconds = time.perf_counter() - t0
    return {
        "edited": len(todo),
        "already_present": len(mine) - len(todo),
        "pool_complete": n_missing == 0,
        "pool_images": n_done,
        "pool_missing": n_missing,
        "seconds": seconds,
        "images_per_s": len(todo) / seconds if seconds > 0 and todo else None,
    }


def _write_mask(path: Path, mask: np.ndarray) -> None:
    """``(S, S)`` {0, 1} -> 8-bit PNG (0 / 255), for the dashboard and for reuse as ``png:``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((mask > 0).astype(np.uint8) * 255).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
