"""Upscale a generated pool with the in-run diffusion upsampler: DICOM in, DICOM x4 out.

Resumable like pool generation: sample k keeps its seed (the upscale noise is drawn from it),
file name and class, gets UIDs of the new pool, is written atomically, and its manifest line is
appended only after the file is in place. Images are read, upscaled and written one at a time,
so memory is one image plus the network's tiles, whatever the pool size.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch
from tqdm import tqdm

from medsynth import __version__
from medsynth.data.spacing import parse_spacing
from medsynth.dicom.read import load_unit_image, read_header
from medsynth.dicom.write import (
    atomic_write_bytes,
    pixel_sha256,
    synthetic_decode_options,
    synthetic_instance,
    to_bytes,
)
from medsynth.diffusion.upsampler import upscale
from medsynth.generation.dataset import read_manifest
from medsynth.generation.pool import (
    Item,
    _append_row,
    _check_request,
    _verified,
    write_manifest,
)
from medsynth.protocol import sampler_revision
from medsynth.training.checkpoint import snapshot_sha256
from medsynth.training.loop import pick_device
from medsynth.training.upscaler import load_upsampler


def _spacing_after(path: Path, factor: int) -> tuple[tuple[float, float] | None, str]:
    """The source image's ``PixelSpacing`` / ``factor``, or its note on why there is none."""
    header = read_header(path, ("PixelSpacing", "ImageComments"))
    spacing = parse_spacing(header["PixelSpacing"])
    if spacing is not None:
        return (spacing[0] / factor, spacing[1] / factor), ""
    return None, header["ImageComments"]


def upscale_pool(
    src_dir: str | Path,
    snapshot_dir: str | Path,
    out_dir: str | Path,
    *,
    pool: str | None = None,  # name of the new pool (default: <source folder>_x<factor>)
    tile_px: int = 64,  # tile side at the high resolution
    overlap_px: int = 16,  # blended overlap of neighbouring tiles
    sampler: str = "dpmpp",
    steps: int = 10,
    net_batch: int = 4,  # tiles per network call
    per_class: int | None = None,  # only the first N images (by index) of each class
    device: str = "auto",
    progress: bool = True,
) -> dict:
    """Upscale every image of the pool in ``src_dir`` (its manifest) into ``out_dir``.

    Returns counts and the time per image. ``snapshot_dir``: an upsampler snapshot
    (``RUN/upscaler/snapshot-*``). ``per_class`` selects images without changing any: a later
    call with a larger N adds the missing ones and keeps those already written.
    """
    src, out = Path(src_dir), Path(out_dir)
    dev = pick_device(device)
    model, sched, cfg = load_upsampler(snapshot_dir, dev)
    factor = int(cfg["upsampler"]["factor"])
    channels = int(cfg["upsampler"]["in_channels"])
    pool = pool or f"{src.name}_x{factor}"
    rows = read_manifest(src)
    if per_class is not None:
        rows = [r for r in rows if int(r["index"]) < per_class]
    # Class k keeps index k (a class with no images in the pool still holds its place).
    names = {int(r["class_index"]): r["class_name"] for r in rows}
    classes = [names.get(k, f"\0unused{k}") for k in range(max(names, default=-1) + 1)]
    plan = {c: sum(r["class_name"] == c for r in rows) for c in classes}
    sr_sha = snapshot_sha256(snapshot_dir)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    request = {
        "source_pool": src.name,
        "source_manifest_sha256": hashlib.sha256((src / "manifest.csv").read_bytes()).hexdigest(),
        "upsampler_sha256": sr_sha,
        "tile_px": tile_px,
        "overlap_px": overlap_px,
        "sampler": sampler,
        "steps": steps,
        "net_batch": net_batch,
    }
    revision = sampler_revision(sampler, steps, sched.num_train_timesteps)
    request |= revision
    _check_request(out, request)
    done = _verified(out)
    part = out / "parts" / "shard-0-of-1.csv"
    opts = synthetic_decode_options(channels)
    derivation = (
        f"medsynth {__version__} upscaled x{factor} from pool {src.name} by diffusion upsampler "
        f"sha256:{sr_sha[:16]} sampler={sampler} steps={steps} tile={tile_px} overlap={overlap_px}"
    )
    if revision:
        derivation += f" rev={revision['sampler_revision']}"
    t0, n = time.perf_counter(), 0
    for r in tqdm(rows, disable=not progress, unit="img", desc=f"upscale {pool}"):
        it = Item(int(r["class_index"]), int(r["index"]))
        if (it.class_index, it.index) in done:
            continue
        low = torch.from_numpy(load_unit_image(src / r["path"], opts)) * 2 - 1
        spacing, note = _spacing_after(src / r["path"], factor)
        seed = int(r["seed"])
        high = upscale(
            model,
            sched,
            low,
            seed,
            factor=factor,
            tile=tile_px,
            overlap=overlap_px,
            sampler=sampler,
            steps=steps,
            net_batch=net_batch,
            device=dev,
        ).numpy()
        ds = synthetic_instance(
            high,
            run_id=r["snapshot_sha256"],
            pool=pool,
            class_name=r["class_name"],
            class_index=it.class_index,
            seed=seed,
            index=it.index,
            derivation=f"{derivation} seed={seed}",
            pixel_spacing=spacing,
            spacing_note=note,
        )
        data = to_bytes(ds)
        rel = it.relpath(r["class_name"])
        atomic_write_bytes(out / rel, data)
        _append_row(
            part,
            {
                **{k: r[k] for k in ("class_name", "seed", "snapshot_sha256", "protocol_sha256")},
                "path": rel,
                "SOPInstanceUID": ds.SOPInstanceUID,
                "class_index": it.class_index,
                "index": it.index,
                "guidance_scale": r["guidance_scale"],
                "sampler": f"{r['sampler']}+sr:{sampler}",
                "steps": f"{r['steps']}+{steps}",
                "pixel_sha256": pixel_sha256(ds),
                "file_sha256": hashlib.sha256(data).hexdigest(),
                "medsynth_version": __version__,
            },
        )
        n += 1
    n_done, n_missing = write_manifest(out, plan, classes)
    seconds = time.perf_counter() - t0
    return {
        "upscaled": n,
        "already_present": len(rows) - n,
        "pool": pool,
        "pool_images": n_done,
        "pool_missing": n_missing,
        "seconds_per_image": seconds / n if n else None,
    }
