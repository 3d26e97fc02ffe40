"""The ``medsynth`` command: a thin typer app, one library call per subcommand.

Heavy imports (torch, MONAI, pydicom) happen inside the commands so ``--help`` is instant.
Errors a user can fix are printed as one paragraph without a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Synthetic labeled medical images from a class-conditional diffusion model, "
    "and an honest measure of whether they help a classifier.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a protocol value, e.g. --set training.max_steps=500"),
]

RunDirOpt = Annotated[
    Path | None, typer.Option(help="Run folder (default: runs/<name>-<dataset hash8>)")
]

ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="CPU threads for torch (overrides runtime.threads; default $OMP_NUM_THREADS, "
        "else every CPU). A bit-identical resume needs the same count.",
    ),
]


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _load(protocol: Path, overrides: list[str] | None, threads: int | None = None):
    from medsynth.protocol import ProtocolError, load_protocol

    try:
        proto = load_protocol(protocol, overrides or [])
    except ProtocolError as exc:
        _fail(str(exc))
    if threads is not None:
        proto.runtime.threads = threads  # --threads wins over the protocol's runtime.threads
    return proto


def _stage(proto, stage: str, run: Path, work, **kw):
    """Run a stage command's ``work`` and record its stage marker exactly as `run` does."""
    from medsynth.experiment.runner import run_stage

    return run_stage(proto, stage, run, work, log=typer.echo, **kw)


@app.command("validate-protocol")
def validate_protocol(
    protocol: Annotated[Path, typer.Argument(help="Protocol YAML file")],
    set_: SetOpt = None,
    show: Annotated[bool, typer.Option(help="Print the resolved protocol")] = False,
) -> None:
    """Check a protocol file; print its hash (and the resolved values with --show)."""
    proto = _load(protocol, set_)
    if show:
        typer.echo(proto.to_yaml())
    problems = _missing_data_paths(proto.dataset)
    if problems:
        _fail(f"{protocol}: " + "; ".join(problems))
    typer.echo(f"ok: {protocol} (sha256 {proto.sha256()[:16]})")


def _missing_data_paths(ds) -> list[str]:
    """Data paths of a ``dicom_folder`` dataset that do not exist (phantoms are written later)."""
    from medsynth.protocol import DatasetKind

    if ds.kind != DatasetKind.dicom_folder.value:
        return []
    out = []
    if not Path(ds.root).expanduser().is_dir():
        out.append(f"dataset.root {ds.root} does not exist or is not a folder")
    if not Path(ds.labels_csv).expanduser().is_file():
        out.append(f"dataset.labels_csv {ds.labels_csv} does not exist or is not a file")
    return out


@app.command()
def phantoms(
    out: Annotated[Path, typer.Argument(help="Folder to write the DICOM dataset into")],
    n_patients: Annotated[int, typer.Option(help="Patients (~25 % get a second study)")] = 160,
    num_classes: Annotated[
        int, typer.Option(help="2..5: normal, opacity, cardiomegaly, effusion, nodule")
    ] = 2,
    size_px: Annotated[int, typer.Option(help="Image side in pixels")] = 128,
    difficulty: Annotated[float, typer.Option(help="0 = obvious findings, 1 = invisible")] = 0.6,
    seed: int = 0,
    body_part: Annotated[
        str, typer.Option(help="chest (grey CR) or fundus (RGB OP: 5 colour findings)")
    ] = "chest",
) -> None:
    """Write the embedded phantom DICOM dataset (chest radiographs or colour fundus photographs)
    with labels.csv."""
    from medsynth.data.phantoms import write_phantoms

    try:
        labels = write_phantoms(
            out,
            n_patients=n_patients,
            num_classes=num_classes,
            size_px=size_px,
            difficulty=difficulty,
            seed=seed,
            body_part=body_part,
        )
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(f"wrote phantoms to {out} (labels: {labels})")


@app.command()
def ingest(
    protocol: Annotated[Path, typer.Argument(help="Protocol YAML file")],
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Scan, label, split and cache the protocol's DICOM dataset into RUN/ingest."""
    proto = _load(protocol, set_, threads)
    run = Path(run_dir or _run_dir_for(proto))
    _stage(proto, "ingest", run, lambda: _ingest(proto, run))
    typer.echo(f"run folder: {run}")


@app.command()
def train(
    protocol: Annotated[
        Path | None, typer.Argument(help="Protocol YAML (omit with --ingest)")
    ] = None,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    ingest_dir: Annotated[
        Path | None, typer.Option("--ingest", help="Train from this ingest folder instead")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the newest state in RUN/train")
    ] = True,
    threads: ThreadsOpt = None,
) -> None:
    """Train the class-conditional diffusion model on the train split (resumable; torchrun-ready)."""
    import os

    from medsynth.protocol import parse_protocol
    from medsynth.runtime import apply_threads
    from medsynth.training.api import train_from_sections
    from medsynth.training.loop import NonFiniteLossError

    main_rank = int(os.environ.get("RANK", "0")) == 0
    world = int(os.environ.get("WORLD_SIZE", "1"))
    record = False  # a stage marker only for the run's own ingest, kept by rank 0
    if protocol is not None:
        proto = _load(protocol, set_, threads)
        run = Path(run_dir or _run_dir_for(proto))
        record = main_rank and ingest_dir is None
        ingest_dir = ingest_dir or run / "ingest"
        if not (ingest_dir / "index.csv").exists():
            if world > 1:
                _fail(f"no ingest cache in {ingest_dir}; run `medsynth ingest` before torchrun")
            _stage(proto, "ingest", run, lambda: _ingest(proto, run))
        if record and world > 1 and _stage_action(proto, run, "train") == "rerun":
            # Clearing RUN/train under the other ranks' feet is no option.
            _fail(
                f"the protocol's training inputs changed since {run / 'train'} was made; "
                "run `medsynth train` once without torchrun (it clears the folder) or remove it"
            )
    elif ingest_dir is not None:
        # Defaults for every model/training setting, with --set overrides.
        proto = parse_protocol("dataset: {kind: phantoms}\n", set_ or [])
        if threads is not None:
            proto.runtime.threads = threads
        run = Path(run_dir or ingest_dir.parent)
    else:
        _fail("give a protocol file or --ingest INGEST_DIR")

    def work():
        snap = train_from_sections(
            ingest_dir,
            run / "train",
            proto.model,
            proto.schedule,
            proto.training,
            resume=resume,
            train_fraction=proto.dataset.train_fraction,
            fraction_seed=proto.dataset.fraction_seed,
        )
        if proto.upscaler is not None and main_rank:
            from medsynth.training.api import train_upscaler_stage

            up = train_upscaler_stage(
                ingest_dir,
                run / "upscaler",
                proto.upscaler,
                proto.schedule,
                train_fraction=proto.dataset.train_fraction,
                fraction_seed=proto.dataset.fraction_seed,
                device=proto.training.device,
                resume=resume,
            )
            typer.echo(f"upsampler snapshot: {up}")
        return snap

    try:
        if record:
            snap = _stage(proto, "train", run, work)
        else:
            apply_threads(proto.runtime.threads)
            snap = work()
    except (NonFiniteLossError, ValueError) as exc:
        _fail(str(exc))
    if main_rank:
        typer.echo(f"snapshot: {snap}")


@app.command()
def distill(
    protocol: Annotated[Path, typer.Argument(help="Protocol YAML file")],
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    resume: Annotated[
        bool, typer.Option(help="Continue from the newest state in RUN/distill")
    ] = True,
    threads: ThreadsOpt = None,
) -> None:
    """Distil the trained model into a 1-4 step student (RUN/distill; resumable). Sample from it
    with --set generation.sampler=distilled --set generation.steps=2 (2 measured best)."""
    from medsynth.runtime import apply_threads
    from medsynth.training.distill import distill_from_protocol

    proto = _load(protocol, set_, threads)
    run = Path(run_dir or _run_dir_for(proto))
    apply_threads(proto.runtime.threads)
    try:
        snap = distill_from_protocol(proto, run, resume=resume)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"student snapshot: {snap}")


@app.command()
def generate(
    protocol: Annotated[Path, typer.Argument(help="Protocol YAML file")],
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    snapshot: Annotated[
        Path | None, typer.Option(help="Snapshot folder (default: newest in RUN/train)")
    ] = None,
    shard: Annotated[str | None, typer.Option(help="i/n: generate items k with k % n == i")] = None,
    threads: ThreadsOpt = None,
) -> None:
    """Generate the protocol's synthetic pool as DICOM + manifest (resumable, shardable)."""
    from medsynth.generation.api import generate_from_protocol
    from medsynth.generation.pool import shard_from_env
    from medsynth.runtime import apply_threads

    proto = _load(protocol, set_, threads)
    run = Path(run_dir or _run_dir_for(proto))
    if shard:
        try:
            i, n = (int(v) for v in shard.split("/"))
        except ValueError:
            _fail(f"--shard expects i/n such as 0/2, got {shard!r}")
    else:
        i, n = shard_from_env()

    def work():
        return generate_from_protocol(proto, run, snapshot=snapshot, shard=(i, n))

    try:
        if snapshot is None:
            # Recorded done (as `run` records it) once the whole pool is there, whichever shard
            # finishes it; a pool from a hand-picked snapshot is not what `run` would make.
            res = _stage(proto, "generate", run, work, complete=lambda r: r["pool_complete"])
        else:
            apply_threads(proto.runtime.threads)
            res = work()
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    rate = f"{res['images_per_s']:.1f} img/s" if res["images_per_s"] else "nothing to do"
    typer.echo(
        f"pool {proto.generation.pool}: generated {res['generated']} ({rate}), "
        f"{res['already_present']} already present; pool {res['pool_images']} images, "
        f"{res['pool_missing']} missing -> {run / 'generate' / proto.generation.pool}"
    )


@app.command()
def evaluate(
    protocol: Annotated[Path, typer.Argument(help="Protocol YAML file")],
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    shard: Annotated[
        str | None,
        typer.Option(help="i/n: fit only the arms k with k % n == i (then run --merge n)"),
    ] = None,
    merge: Annotated[
        int | None, typer.Option(min=1, help="Merge n finished shards into RUN/evaluate")
    ] = None,
    threads: ThreadsOpt = None,
) -> None:
    """Uplift study (arms x seeds, CIs), fidelity/diversity, memorization -> RUN/evaluate.

    Under torchrun (WORLD_SIZE > 1) each rank fits its shard and rank 0 merges."""
    import os

    from medsynth.evaluation.study import run_study

    proto = _load(protocol, set_, threads)
    run = Path(run_dir or _run_dir_for(proto))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if shard and merge:
        _fail("give --shard i/n (fit one shard) or --merge n (combine them), not both")
    study_args = dict(
        train_fraction=proto.dataset.train_fraction, fraction_seed=proto.dataset.fraction_seed
    )
    try:
        if shard or merge or world > 1:
            res = _evaluate_sharded(proto, run, shard, merge, world, study_args)
            if res is None:
                return
        else:
            res = _stage(
                proto,
                "evaluate",
                run,
                lambda: run_study(
                    run / "ingest",
                    run / "generate",
                    run / "evaluate",
                    proto.evaluation,
                    **study_args,
                ),
            )
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(format_uplift(res["uplift"]))
    typer.echo(f"results: {run / 'evaluate'}")


def _evaluate_sharded(proto, run: Path, shard, merge, world: int, study_args: dict):
    """``--shard i/n``: fit one shard (returns None); ``--merge n`` or rank 0 under torchrun
    after a barrier: merge into RUN/evaluate as the evaluate stage (returns the study result)."""
    import os

    from medsynth.evaluation.shards import merge_shards, parse_shard, run_shard
    from medsynth.runtime import apply_threads

    key = _stage_hash(proto, "evaluate")
    shard_dir = run / "evaluate-shards" / key[:16]
    args = (run / "ingest", run / "generate")
    if merge is None:
        i, n = parse_shard(shard) if shard else (int(os.environ.get("RANK", "0")), world)
        apply_threads(proto.runtime.threads)
        path = run_shard(*args, shard_dir, proto.evaluation, (i, n), key=key, **study_args)
        typer.echo(f"evaluation shard {i}/{n}: {path}")
        if shard or not _barrier():
            return None  # a job runner's shard: `--merge n` combines them
        merge = n
    return _stage(
        proto,
        "evaluate",
        run,
        lambda: merge_shards(
            *args, shard_dir, run / "evaluate", proto.evaluation, merge, key=key, **study_args
        ),
    )


def _barrier() -> bool:
    """Wait for every torchrun rank (gloo; no time limit worth hitting); True on rank 0."""
    from datetime import timedelta

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(hours=24))
    dist.barrier()
    return dist.get_rank() == 0


@app.command()
def report(
    protocol: Annotated[Path, typer.Argument(help="Protocol YAML file")],
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Write RUN/report/index.html: tables, plots, sample grids, dataset and model cards."""
    from medsynth.experiment.report import write_report

    proto = _load(protocol, set_, threads)
    run = Path(run_dir or _run_dir_for(proto))
    try:
        path = _stage(proto, "report", run, lambda: write_report(run, proto))
    except Exception as exc:  # noqa: BLE001 - known user errors become one paragraph
        _fail(_explain(exc))
    typer.echo(f"report: {path}")


@app.command()
def upscale(
    pool_dir: Annotated[Path, typer.Argument(help="Generated pool folder (with manifest.csv)")],
    snapshot: Annotated[
        Path, typer.Option(help="Upsampler snapshot, or a run folder (newest in RUN/upscaler)")
    ],
    out: Annotated[
        Path | None, typer.Option(help="Output pool folder (default: <pool>_x<factor> beside it)")
    ] = None,
    tile_px: Annotated[int, typer.Option(min=8, help="Tile side at the high resolution")] = 64,
    overlap_px: Annotated[int, typer.Option(min=0, help="Blended overlap of tiles")] = 16,
    sampler: Annotated[str, typer.Option(help="ddim | dpmpp | ddpm")] = "dpmpp",
    steps: Annotated[int, typer.Option(min=1, help="Sampler steps per tile")] = 10,
    per_class: Annotated[
        int | None, typer.Option(min=1, help="Only the first N images of each class")
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    threads: ThreadsOpt = None,
) -> None:
    """Upscale a generated pool x4 with the in-run diffusion upsampler (tiled, resumable)."""
    import json

    from medsynth.generation.upscale import upscale_pool
    from medsynth.runtime import apply_threads
    from medsynth.training.checkpoint import latest_snapshot

    apply_threads(threads)
    if overlap_px * 2 > tile_px:
        _fail(f"--overlap-px {overlap_px} must be at most half of --tile-px {tile_px}")
    if sampler not in ("ddim", "dpmpp", "ddpm"):
        _fail(f"unknown --sampler {sampler!r}; valid choices: ddim, dpmpp, ddpm")
    try:
        snap = snapshot
        if (snapshot / "upscaler").is_dir():
            snap = latest_snapshot(snapshot / "upscaler")
        elif not (snapshot / "config.json").exists():
            snap = latest_snapshot(snapshot)
        factor = json.loads((snap / "config.json").read_text()).get("upsampler", {}).get("factor")
        res = upscale_pool(
            pool_dir,
            snap,
            out or pool_dir.parent / f"{pool_dir.name}_x{factor}",
            tile_px=tile_px,
            overlap_px=overlap_px,
            sampler=sampler,
            steps=steps,
            per_class=per_class,
            device=device,
        )
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    per = res["seconds_per_image"]
    typer.echo(
        f"pool {res['pool']}: upscaled {res['upscaled']}"
        + (f" ({per:.2f} s/img)" if per else "")
        + f", {res['already_present']} already present, {res['pool_missing']} missing"
    )


@app.command("run")
def run_cmd(
    protocol: Annotated[Path, typer.Argument(help="Protocol YAML file")],
    set_: SetOpt = None,
    stages: Annotated[
        str | None,
        typer.Option(help="Comma-separated subset of ingest,train,generate,evaluate,report"),
    ] = None,
    run_dir: RunDirOpt = None,
    dry_run: Annotated[
        bool, typer.Option(help="Print the resolved protocol and planned stages only")
    ] = False,
    threads: ThreadsOpt = None,
) -> None:
    """Run a whole study from a protocol; a rerun skips done stages and resumes an interrupted one."""
    from medsynth.experiment.runner import StudyError, plan_stages, run_protocol, show

    proto = _load(protocol, set_, threads)
    run = Path(run_dir or _run_dir_for(proto))
    chosen = [s.strip() for s in stages.split(",")] if stages else None
    if proto.sweep is not None:
        _run_sweep(proto, run, dry_run, chosen)
        return
    try:
        if dry_run:
            typer.echo(proto.to_yaml())
            for p in plan_stages(proto, run, chosen):
                typer.echo(f"{p.stage:<9} {p.action:<7} inputs {p.inputs_sha256[:12]}")
            typer.echo(f"run folder: {run}")
            return
        res = run_protocol(proto, stages=chosen, run_dir=run, log=typer.echo)
    except StudyError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - turn known user errors into one paragraph
        _fail(_explain(exc))
    typer.echo(show(res.run_dir))


def _run_sweep(proto, run: Path, dry_run: bool, stages) -> None:
    """A protocol with a ``sweep:`` section: print the expanded plan, or run / resume it."""
    from medsynth.experiment.runner import StudyError
    from medsynth.experiment.sweep import describe, run_sweep

    if stages:
        _fail("--stages does not apply to a sweep; a rerun skips every finished unit by itself")
    try:
        if dry_run:
            typer.echo(describe(proto, run))
            return
        path = run_sweep(proto, run_dir=run, log=typer.echo)
    except StudyError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - turn known user errors into one paragraph
        _fail(_explain(exc))
    typer.echo(
        f"sweep done: {path / 'sweep' / 'configs.csv'}, report {path / 'report' / 'index.html'}"
    )


@app.command("show")
def show_cmd(run_dir: Annotated[Path, typer.Argument(help="Run folder")]) -> None:
    """Print a run's stage status and headline results."""
    from medsynth.experiment.runner import StudyError, show

    try:
        typer.echo(show(run_dir))
    except StudyError as exc:
        _fail(str(exc))


review_app = typer.Typer(
    help="Human review of generated pools (the dashboard writes the decisions)."
)
app.add_typer(review_app, name="review")


@review_app.command("export")
def review_export(
    run_dir: Annotated[Path, typer.Argument(help="Run folder")],
    pool: Annotated[str, typer.Option(help="Pool name under RUN/generate")] = "main",
    out: Annotated[
        Path | None, typer.Option(help="Destination (default RUN/generate/<pool>-accepted)")
    ] = None,
    reviewer: Annotated[str | None, typer.Option(help="Only this reviewer's decisions")] = None,
    link: Annotated[bool, typer.Option(help="Symlink DICOM files instead of copying")] = False,
) -> None:
    """Export the accepted samples of a reviewed pool as a pool of their own."""
    from medsynth.review.export import export_accepted

    try:
        folder, n = export_accepted(run_dir, pool, out, reviewer=reviewer, link=link)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"exported {n} accepted samples to {folder}")


def _explain(exc: Exception) -> str:
    """One paragraph for errors a user meets; anything else re-raises with its traceback."""
    import errno

    from medsynth.data.index import IngestError
    from medsynth.training.loop import NonFiniteLossError

    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return (
            f"the disk is full while writing {exc.filename or 'run outputs'}. Free space (or point "
            "output_root at a larger disk) and rerun the same command: finished work is kept and "
            "interrupted stages resume."
        )
    if isinstance(exc, (IngestError, NonFiniteLossError, FileNotFoundError, ValueError, KeyError)):
        return str(exc).strip("'\"")
    raise exc


def format_uplift(uplift: list[dict]) -> str:
    """A plain-text uplift table: AUC mean, difference to real-only and to the duplicate control."""

    def ci(r, key):
        if f"{key}" not in r:
            return "—"
        return f"{r[key]:+.3f} [{r[key + '_ci_low']:+.3f}, {r[key + '_ci_high']:+.3f}]"

    lines = [f"{'arm':<34}{'AUC':>8}  {'vs real-only (95% CI)':<28}{'vs duplicate control':<28}"]
    for r in uplift:
        lines.append(
            f"{r['arm']:<34}{r['auc_mean']:>8.3f}  {ci(r, 'auc_vs_real'):<28}{ci(r, 'auc_vs_dup'):<28}"
        )
    return "\n".join(lines)


def _run_dir_for(proto):
    from medsynth.runfolder import run_dir_for

    return run_dir_for(proto)


def _stage_hash(proto, stage: str) -> str:
    from medsynth.experiment.runner import stage_hashes

    return stage_hashes(proto)[stage]


def _stage_action(proto, run: Path, stage: str) -> str:
    from medsynth.experiment.runner import stage_folder, stage_hashes, stage_status

    return stage_status(stage_folder(run, stage, proto), stage_hashes(proto)[stage])


def _ingest(proto, run: Path):
    from medsynth.data.index import IngestError
    from medsynth.data.ingest import ingest_dataset

    try:
        summary = ingest_dataset(proto.dataset, run)
    except IngestError as exc:
        _fail(str(exc))
    typer.echo(summary.line())
    return summary


# The edit commands live in their own module (it uses the helpers above).
from medsynth.cli_edit import edit_app  # noqa: E402

app.add_typer(edit_app, name="edit")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
