"""Protocol -> pool generation (the one call the CLI and the runner make)."""

from __future__ import annotations

import json
from pathlib import Path

from medsynth.data.datasets import split_rows
from medsynth.data.spacing import cache_spacing
from medsynth.generation.pool import generate_pool, plan_counts
from medsynth.protocol import Protocol
from medsynth.training.api import guide_dir, guide_snapshot
from medsynth.training.checkpoint import latest_snapshot


def generate_from_protocol(
    proto: Protocol,
    run_dir: str | Path,
    *,
    snapshot: str | Path | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> dict:
    """Generate ``generation.pool`` into ``RUN/generate/<pool>`` from the newest snapshot.

    Sampler ``distilled`` samples from the newest student in ``RUN/distill`` (see
    ``medsynth distill``); every other sampler from the newest snapshot in ``RUN/train``.
    With ``upscaler.chain`` the finished pool is also upscaled into
    ``RUN/generate/<pool>_x<factor>`` (result under ``"upscaled"``). With
    ``generation.autoguidance`` the guide is the finished guide of that model in
    ``RUN/train/guide`` (``training.guide_fraction``).
    """
    run = Path(run_dir)
    stage = "distill" if proto.generation.sampler == "distilled" else "train"
    snap = Path(snapshot) if snapshot else latest_snapshot(run / stage)
    summary = json.loads((run / "ingest" / "summary.json").read_text())
    rows = split_rows(
        run / "ingest", "train", proto.dataset.train_fraction, proto.dataset.fraction_seed
    )
    real = {c: sum(r["label"] == c for r in rows) for c in summary["classes"]}
    spacing, note = cache_spacing(rows, proto.dataset.spatial_size, proto.dataset.resize_mode)
    g = proto.generation
    guide = _guide(proto, run, snapshot) if g.uses_guide else None
    plan = plan_counts(
        g.count_mode,
        summary["classes"],
        real,
        per_class=g.per_class,
        counts=g.counts,
        ratio=g.ratio,
    )
    res = generate_pool(
        snap,
        run / "generate" / g.pool,
        plan,
        pool=g.pool,
        sampler=g.sampler,
        steps=g.steps,
        guidance_scale=g.guidance_scale,
        ddim_eta=g.ddim_eta,
        guidance_rescale=g.guidance_rescale,
        guidance_interval=g.guidance_interval,
        timestep_spacing=g.timestep_spacing,
        class_guidance=g.class_guidance,
        guide_snapshot=guide,
        autoguided_classes=g.autoguided_classes or None,  # [] (false) draws no guide anyway
        batch_size=g.batch_size,
        net_batch=g.net_batch,
        precision=g.precision,
        export_png=g.export_png,
        device=g.device,
        shard=shard,
        protocol_sha256=proto.sha256(),
        pixel_spacing=spacing,
        spacing_note=note,
        progress=progress,
    )
    up = proto.upscaler
    if up is not None and up.chain and res["pool_complete"]:
        from medsynth.generation.upscale import upscale_pool

        res["upscaled"] = upscale_pool(
            run / "generate" / g.pool,
            latest_snapshot(run / "upscaler"),
            run / "generate" / f"{g.pool}_x{up.factor}",
            tile_px=up.tile_px,
            overlap_px=up.overlap_px,
            sampler=up.sampler,
            steps=up.steps,
            per_class=up.chain_per_class,
            device=g.device,
            progress=progress,
        )
    return res


def _guide(proto: Protocol, run: Path, snapshot: str | Path | None) -> Path | None:
    """The guide autoguidance pairs with ``RUN/train``'s model (only asked for when some
    autoguided class is guided: else the guide is never called)."""
    model = latest_snapshot(run / "train")
    if snapshot and Path(snapshot).resolve() != model.resolve():
        raise ValueError(
            f"autoguidance pairs {model} with the guide trained beside it; --snapshot {snapshot} "
            "is another model: drop --snapshot, or --set generation.autoguidance=false"
        )
    steps = proto.training.guide_steps
    guide = guide_snapshot(run / "train", steps)
    if guide is None:
        raise FileNotFoundError(
            f"no finished {steps}-step guide for {model} in {guide_dir(run / 'train')}: run "
            "`medsynth train` (it trains the guide beside the model, resuming either)"
        )
    return guide


def edit_from_protocol(
    proto: Protocol,
    run_dir: str | Path,
    kind: str,
    *,
    snapshot: str | Path | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> dict:
    """Edit training images per ``proto.edit`` into ``RUN/generate/<edit.<kind>.pool>``.

    ``kind``: ``inpaint`` or ``vary``. Sources are the train split (the same patient-level
    fraction the generator saw); validation and test images are never edited.
    """
    import numpy as np

    from medsynth.generation.edit import edit_pool, plan_sources
    from medsynth.generation.masks import MaskSource
    from medsynth.protocol_edit import EditSection

    run = Path(run_dir)
    section = proto.edit or EditSection()
    snap = Path(snapshot) if snapshot else latest_snapshot(run / "train")
    summary = json.loads((run / "ingest" / "summary.json").read_text())
    rows = split_rows(
        run / "ingest", "train", proto.dataset.train_fraction, proto.dataset.fraction_seed
    )
    sources = plan_sources(rows, summary["classes"], section)
    cache = np.load(run / "ingest" / "images.npy", mmap_mode="r")
    ds = proto.dataset
    key_attribute = ds.join_attribute
    masks = None
    if kind == "inpaint":
        if not section.inpaint.mask:
            raise ValueError(
                "inpainting needs a mask: set edit.inpaint.mask or pass --mask "
                "(boxes:TABLE.csv, png:FILE.png or rect:x0,y0,x1,y1)"
            )
        if section.inpaint.mask.startswith("boxes:") and key_attribute not in rows[0]:
            raise ValueError(
                f"a box table joins on dataset.join_attribute {key_attribute!r}, which the ingest "
                f"index does not keep; its columns are {sorted(rows[0])}"
            )
        masks = MaskSource(
            section.inpaint.mask,
            cache.shape[-1],
            ds.resize_mode,
            key_column=section.inpaint.box_key_column or ds.join_column or key_attribute,
        )
    sub = section.inpaint if kind == "inpaint" else section.vary
    return edit_pool(
        snap,
        cache,
        sources,
        run / "generate" / sub.pool,
        section,
        kind=kind,
        masks=masks,
        key_attribute=key_attribute,
        shard=shard,
        protocol_sha256=proto.sha256(),
        resize_mode=ds.resize_mode,
        progress=progress,
    )
