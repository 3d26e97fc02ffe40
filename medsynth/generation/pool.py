"""Generate a labeled synthetic pool: resumable, shardable, byte-reproducible.

A sample is named by (pool, class, index): its seed, file name and UIDs derive from that alone,
so the same request yields the same files whatever the batch size, shard split or restarts.
Each file is written atomically; its manifest line (with checksums) is appended only after the
file is in place. A rerun ignores a torn last line, re-verifies claimed files and generates only
what is missing. ``--shard i/n`` (or torchrun's RANK/WORLD_SIZE) takes items ``k % n == i``.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medsynth import __version__
from medsynth.dicom.write import atomic_write_bytes, pixel_sha256, synthetic_instance, to_bytes
from medsynth.diffusion.sampler import pick_scale, sample
from medsynth.protocol import ClassScale, format_scale, guide_called, sampler_revision
from medsynth.runtime import resolve_precision
from medsynth.training.checkpoint import load_guide, load_snapshot, snapshot_sha256
from medsynth.training.latent import snapshot_decoder
from medsynth.training.loop import pick_device
from medsynth.utils.csvsafe import neutralise_row, restore_row

MANIFEST_COLUMNS = (
    "path",
    "SOPInstanceUID",
    "class_name",
    "class_index",
    "index",
    "seed",
    "guidance_scale",
    "sampler",
    "steps",
    "snapshot_sha256",
    "protocol_sha256",
    "pixel_sha256",
    "file_sha256",
    "medsynth_version",
)


@dataclass(frozen=True)
class Item:
    class_index: int
    index: int  # position within its class, 0-based

    def relpath(self, class_name: str) -> str:
        return f"dicom/{class_name}/{self.index:06d}.dcm"


def sample_seed(pool: str, class_index: int, index: int) -> int:
    """63-bit seed from the sample's name (pool, class, index)."""
    digest = hashlib.sha256(f"{pool}/{class_index}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def plan_counts(
    mode: str,
    classes: list[str],
    real_counts: dict[str, int],
    *,
    per_class: int = 100,
    counts: dict[str, int] | None = None,
    ratio: float = 1.0,
) -> dict[str, int]:
    """Images to generate per class. ``real_counts``: real training images per class."""
    unknown = sorted(set(counts or {}) - set(classes))
    if unknown:
        raise ValueError(
            f"generation.counts names unknown classes {unknown}; classes are {classes}"
        )
    if mode == "per_class":
        plan = dict.fromkeys(classes, per_class)
    elif mode == "ratio":
        plan = {c: round(ratio * real_counts.get(c, 0)) for c in classes}
    elif mode == "balance":
        top = round(ratio * max(real_counts.values()))
        plan = {c: max(0, top - real_counts.get(c, 0)) for c in classes}
    else:
        raise ValueError(f"unknown count_mode {mode!r}; valid: per_class, ratio, balance")
    plan.update(counts or {})
    return plan


def _read_rows(path: Path, columns: tuple[str, ...] = MANIFEST_COLUMNS) -> list[dict]:
    """Rows of a manifest part; a torn last line (crash mid-append) is ignored."""
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    rows = [restore_row(r) for r in csv.DictReader(io.StringIO("".join(lines)))]
    return [r for r in rows if r.get("medsynth_version") and len(r) == len(columns)]


def _verified(
    out: Path, columns: tuple[str, ...] = MANIFEST_COLUMNS
) -> dict[tuple[int, int], dict]:
    """Manifest rows (all parts) whose file exists with the recorded checksum."""
    good = {}
    for part in sorted((out / "parts").glob("*.csv")):
        for r in _read_rows(part, columns):
            f = out / r["path"]
            if f.exists() and hashlib.sha256(f.read_bytes()).hexdigest() == r["file_sha256"]:
                good[(int(r["class_index"]), int(r["index"]))] = r
    return good


def _append_row(part: Path, row: dict, columns: tuple[str, ...] = MANIFEST_COLUMNS) -> None:
    new = not part.exists() or part.stat().st_size == 0
    torn = False
    if not new:
        # Only the last byte matters; reading the whole part per row would be quadratic.
        with part.open("rb") as fh:
            fh.seek(-1, os.SEEK_END)
            torn = fh.read(1) != b"\n"
    with part.open("a", newline="") as fh:
        if torn:
            fh.write("\n")  # close a torn line so the next row stands alone
        w = csv.DictWriter(fh, fieldnames=columns)
        if new:
            w.writeheader()
        w.writerow(neutralise_row(row))  # class names come from the user's labels
        fh.flush()
        os.fsync(fh.fileno())


def write_manifest(
    out: Path,
    plan: dict[str, int],
    classes: list[str],
    *,
    want: list[tuple[int, int]] | None = None,
    columns: tuple[str, ...] = MANIFEST_COLUMNS,
) -> tuple[int, int]:
    """Merge verified parts into ``manifest.csv`` sorted by (class, index); (done, missing).

    ``want``: the (class index, index) keys of the pool in order (default: from ``plan``).
    Shards finishing at once take turns (file lock), so the last writer sees every part.
    """
    if want is None:
        want = [(classes.index(c), k) for c in classes for k in range(plan.get(c, 0))]
    with open(out / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _merge_parts(out, want, columns)


def _merge_parts(
    out: Path, want: list[tuple[int, int]], columns: tuple[str, ...]
) -> tuple[int, int]:
    good = _verified(out, columns)
    rows = [good[key] for key in want if key in good]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    w.writerows(neutralise_row(r) for r in rows)
    atomic_write_bytes(out / "manifest.csv", buf.getvalue().encode())
    return len(rows), len(want) - len(rows)


def generate_pool(
    snapshot_dir: str | Path,
    out_dir: str | Path,
    plan: dict[str, int],
    *,
    pool: str = "main",
    sampler: str = "dpmpp",
    steps: int = 20,
    guidance_scale: float = 2.0,
    ddim_eta: float = 0.0,
    guidance_rescale: float = 0.0,  # rescaled-guidance mix phi in [0, 1]; 0 = plain CFG
    guidance_interval: tuple[float, float] | list[float] = (0.0, 1.0),  # guided share of t / T
    timestep_spacing: str = "trailing",  # trailing | karras (ddim, ddpm, dpmpp)
    class_guidance: dict[str, ClassScale] | None = None,  # class -> its scale or set of scales
    guide_snapshot: str | Path | None = None,  # autoguidance: guide from this weaker model
    autoguided_classes: list[str] | None = None,  # those classes only (None: every class)
    batch_size: int = 64,
    net_batch: int = 16,
    precision: str = "fp32",  # auto | fp32 | bf16 (autocast)
    export_png: bool = False,
    device: str = "auto",
    shard: tuple[int, int] = (0, 1),
    protocol_sha256: str = "",
    pixel_spacing: tuple[float, float] | None = None,  # mm per pixel of the model's images
    spacing_note: str = "",  # why there is no spacing (written instead)
    progress: bool = True,
) -> dict:
    """Generate the planned samples of this shard into ``out_dir``; return counts and rates.

    ``plan``: class name -> number of images. Writes ``dicom/<class>/<index:06d>.dcm``,
    ``parts/shard-i-of-n.csv`` and, merged from every part, ``manifest.csv``.
    ``guide_snapshot``: autoguidance (Karras et al. 2024) — guided rows extrapolate from this
    weaker model of the same task under their own class instead of from the null class; its
    hash joins the request and every file's derivation. Unused (and unrecorded) when no class
    is guided, since then the guide is never called. ``autoguided_classes``: only these
    classes' guided rows use it, the others extrapolate from the null class (recorded too).
    """
    rank, world = shard
    if not 0 <= rank < world:
        raise ValueError(f"shard {rank}/{world} is not valid; use i/n with 0 <= i < n")
    out = Path(out_dir)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    # Resolved before the request is written: "auto" and the precision it picks make one pool.
    precision = resolve_precision(precision, str(dev), "generation")
    model, sched_cfg, cfg = load_snapshot(snapshot_dir, dev)
    # A latent model samples latents and decodes them to the full-resolution image.
    decoder = snapshot_decoder(snapshot_dir, cfg, dev)
    classes = cfg["classes"]
    unknown = sorted(set(plan) - set(classes))
    if unknown:
        raise ValueError(f"plan names unknown classes {unknown}; the snapshot knows {classes}")
    if (sampler == "distilled") != ("distill" in cfg):
        raise ValueError(
            f"snapshot {snapshot_dir} is a distilled student: use sampler 'distilled'"
            if "distill" in cfg
            else f"sampler 'distilled' needs a student made by `medsynth distill`; "
            f"{snapshot_dir} is a plain diffusion snapshot"
        )
    class_guidance = dict(class_guidance or {})
    unknown = sorted(set(class_guidance) - set(classes))
    if unknown:
        raise ValueError(
            f"generation.class_guidance names unknown classes {unknown}; the snapshot knows {classes}"
        )
    unknown = sorted(set(autoguided_classes or []) - set(classes))
    if unknown:
        raise ValueError(
            f"generation.autoguidance names unknown classes {unknown}; the snapshot knows {classes}"
        )
    snap_sha = snapshot_sha256(snapshot_dir)
    guide, guide_sha = None, None
    autoguidance = True if autoguided_classes is None else sorted(autoguided_classes)
    if guide_snapshot is not None and guide_called(autoguidance, guidance_scale, class_guidance):
        guide = load_guide(guide_snapshot, cfg, dev)
        guide_sha = snapshot_sha256(guide_snapshot)
    items = [Item(classes.index(c), k) for c in classes for k in range(plan.get(c, 0))]
    mine = [it for pos, it in enumerate(items) if pos % world == rank]
    request = {
        "snapshot_sha256": snap_sha,
        "plan": plan,
        "pool": pool,
        "sampler": sampler,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "net_batch": net_batch,
        "precision": precision,
    }
    revision = sampler_revision(sampler, steps, sched_cfg.num_train_timesteps)
    request |= revision
    if ddim_eta:
        request["ddim_eta"] = ddim_eta  # only when set: pools made before the knob still match
    interval = [float(v) for v in guidance_interval]
    extra = ""
    if guidance_rescale:
        request["guidance_rescale"] = guidance_rescale  # likewise
        extra += f" rescale={guidance_rescale:g}"
    if interval != [0.0, 1.0]:
        request["guidance_interval"] = interval
        extra += f" interval={interval[0]:g}-{interval[1]:g}"
    if timestep_spacing != "trailing":
        request["timestep_spacing"] = timestep_spacing
        extra += f" spacing={timestep_spacing}"
    if class_guidance:
        request["class_guidance"] = dict(sorted(class_guidance.items()))
        extra += " class_guidance=" + ",".join(
            f"{k}:{format_scale(v)}" for k, v in sorted(class_guidance.items())
        )
    if guide_sha:
        request["guide_snapshot_sha256"] = guide_sha
        extra += f" autoguide sha256:{guide_sha[:16]}"
        if autoguided_classes is not None:
            request["autoguided_classes"] = autoguidance
            extra += " for=" + ",".join(autoguidance)
    with open(out / ".manifest.lock", "w") as lock:
        # Shards start together: one at a time checks the request and sweeps its own orphans.
        fcntl.flock(lock, fcntl.LOCK_EX)
        _check_request(out, request)
        _clean_orphans(out, {it.relpath(classes[it.class_index]) for it in mine})
    done = _verified(out)
    todo = [it for it in mine if (it.class_index, it.index) not in done]
    part = out / "parts" / f"shard-{rank}-of-{world}.csv"
    derivation = (
        f"medsynth {__version__} diffusion snapshot sha256:{snap_sha[:16]} "
        f"sampler={sampler} steps={steps} guidance={guidance_scale} net_batch={net_batch} {precision}"
    )
    if ddim_eta:
        derivation += f" eta={ddim_eta:g}"
    if revision:
        derivation += f" rev={revision['sampler_revision']}"
    derivation += extra

    t0, t_write = time.perf_counter(), 0.0
    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(todo),
        disable=not progress,
        unit="img",
        desc=f"generate {pool}",
    )
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        seeds = [sample_seed(pool, it.class_index, it.index) for it in batch]
        images = sample(
            model,
            sched_cfg,
            [it.class_index for it in batch],
            seeds,
            image_shape=tuple(cfg["image_shape"]),
            null_label=len(classes),
            sampler=sampler,
            steps=steps,
            guidance_scale=guidance_scale,
            ddim_eta=ddim_eta,
            guidance_rescale=guidance_rescale,
            guidance_interval=interval,
            timestep_spacing=timestep_spacing,
            class_guidance={classes.index(c): v for c, v in class_guidance.items()},
            guide=guide,
            guide_classes=None
            if autoguided_classes is None
            else [classes.index(c) for c in autoguidance],
            device=dev,
            bf16=precision == "bf16",
            net_batch=net_batch,
            distilled=cfg.get("distill") if sampler == "distilled" else None,
            clip=decoder is None,
        )
        if decoder is not None:
            images = decoder(images)
        images = images.cpu().numpy()
        tw = time.perf_counter()
        for it, seed, img in zip(batch, seeds, images, strict=True):
            name = classes[it.class_index]
            scale = pick_scale(class_guidance.get(name, guidance_scale), seed)
            # A class drawn from a set of scales: the file says which one it got.
            picked = f" scale={scale:g}" if isinstance(class_guidance.get(name), list) else ""
            ds = synthetic_instance(
                img,
                run_id=snap_sha,
                pool=pool,
                class_name=name,
                class_index=it.class_index,
                seed=seed,
                index=it.index,
                derivation=f"{derivation} seed={seed}{picked}",
                pixel_spacing=pixel_spacing,
                spacing_note=spacing_note,
            )
            data = to_bytes(ds)
            rel = it.relpath(name)
            atomic_write_bytes(out / rel, data)
            if export_png:
                _write_png(out / "png" / name / f"{it.index:06d}.png", img)
            _append_row(
                part,
                {
                    "path": rel,
                    "SOPInstanceUID": ds.SOPInstanceUID,
                    "class_name": name,
                    "class_index": it.class_index,
                    "index": it.index,
                    "seed": seed,
                    "guidance_scale": scale,
                    "sampler": sampler,
                    "steps": steps,
                    "snapshot_sha256": snap_sha,
                    "protocol_sha256": protocol_sha256,
                    "pixel_sha256": pixel_sha256(ds),
                    "file_sha256": hashlib.sha256(data).hexdigest(),
                    "medsynth_version": __version__,
                },
            )
        t_write += time.perf_counter() - tw
        bar.update(len(batch))
    bar.close()
    n_done, n_missing = write_manifest(out, plan, classes)
    seconds = time.perf_counter() - t0
    return {
        "generated": len(todo),
        "already_present": len(mine) - len(todo),
        "pool_complete": n_missing == 0,
        "pool_images": n_done,
        "pool_missing": n_missing,
        "seconds": seconds,
        "images_per_s": len(todo) / seconds if seconds > 0 and todo else None,
        "dicom_written_per_s": len(todo) / t_write if t_write > 0 else None,
    }


def _check_request(out: Path, request: dict) -> None:
    """Refuse to mix samples of different requests in one pool folder (resume needs the same)."""
    path = out / "request.json"
    if path.exists():
        if json.loads(path.read_text()) != request:
            raise ValueError(
                f"pool folder {out} holds samples of another request ({path}); use another "
                "generation.pool name or delete the folder to regenerate"
            )
        return
    atomic_write_bytes(path, json.dumps(request, indent=2, sort_keys=True).encode())


def _clean_orphans(out: Path, mine: set[str]) -> list[str]:
    """Remove temp files a kill left in the pool folder; return their paths (relative).

    ``atomic_write_bytes`` writes ``.<name>.<random>.tmp`` beside its target. Only temp files of
    this shard's own items (``mine``: ``dicom/<class>/<index>.dcm``, and their PNGs) and of the
    request/manifest files (written under the pool lock the caller holds) are removed: a
    ``.tmp`` of another shard's item may be a write in progress.
    """
    png = {f"png/{Path(r).parent.name}/{Path(r).stem}.png" for r in mine}
    removed = []
    for folder in [out, *sorted(out.glob("dicom/*")), *sorted(out.glob("png/*"))]:
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):
            name = entry.name
            if not (name.startswith(".") and name.endswith(".tmp")) or not entry.is_file():
                continue
            target = (Path(folder) / name[1:].rsplit(".", 2)[0]).relative_to(out).as_posix()
            if target in mine or target in png or target in ("manifest.csv", "request.json"):
                os.unlink(entry.path)
                removed.append(target)
    return removed


def _write_png(path: Path, image: np.ndarray) -> None:
    """``image``: ``(1, H, W)`` -> 16-bit grey PNG; ``(3, H, W)`` -> 8-bit RGB PNG (Pillow
    writes no 16-bit RGB), both from [-1, 1]."""
    from PIL import Image

    if image.shape[0] == 3:
        rgb = np.round((np.clip(image, -1, 1) + 1) / 2 * 255).astype(np.uint8)
        pil = Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 2, 0)))
    else:
        pil = Image.fromarray(
            np.round((np.clip(image[0], -1, 1) + 1) / 2 * 65535).astype(np.uint16)
        )
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def shard_from_env() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) under torchrun, else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
