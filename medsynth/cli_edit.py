"""``medsynth edit inpaint|vary``: edit real training images (registered by ``cli.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

# Option types as in cli.py; its helpers are imported when a command runs (cli.py imports
# this module at its end, and `python -m medsynth.cli` runs cli.py as __main__).
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a protocol value, e.g. --set edit.steps=20"),
]
RunDirOpt = Annotated[
    Path | None, typer.Option(help="Run folder (default: runs/<name>-<dataset hash8>)")
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option("--threads", min=1, help="CPU threads for torch (overrides runtime.threads)"),
]

edit_app = typer.Typer(
    help="Edit real training images: inpainting (RePaint) and SDEdit variations/counterfactuals."
)

PoolOpt = Annotated[str | None, typer.Option(help="Pool name under RUN/generate")]
ToClassOpt = Annotated[
    str | None, typer.Option("--to-class", help="same | other (two classes) | a class name")
]
SnapshotOpt = Annotated[
    Path | None, typer.Option(help="Snapshot folder (default: newest in RUN/train)")
]


def _edit(protocol, set_, run_dir, snapshot, shard, threads, kind: str, extra: list[str]):
    """Shared body of the edit commands: options become ``--set edit.*`` overrides."""
    from medsynth.cli import _fail, _load, _run_dir_for
    from medsynth.generation.api import edit_from_protocol
    from medsynth.generation.masks import MaskError
    from medsynth.runtime import apply_threads

    overrides = list(set_ or []) + [f"edit.{kind}.{x}" for x in extra]
    proto = _load(protocol, overrides, threads)
    run = Path(run_dir or _run_dir_for(proto))
    i, n = 0, 1
    if shard:
        try:
            i, n = (int(v) for v in shard.split("/"))
        except ValueError:
            _fail(f"--shard expects i/n such as 0/2, got {shard!r}")
    apply_threads(proto.runtime.threads)
    try:
        res = edit_from_protocol(proto, run, kind, snapshot=snapshot, shard=(i, n))
    except (FileNotFoundError, MaskError, ValueError) as exc:
        _fail(str(exc))
    from medsynth.protocol_edit import EditSection

    pool = getattr(proto.edit or EditSection(), kind).pool
    rate = f"{res['images_per_s']:.2f} img/s" if res["images_per_s"] else "nothing to do"
    typer.echo(
        f"edit {kind} -> pool {pool}: edited {res['edited']} ({rate}), {res['already_present']} "
        f"already present; pool {res['pool_images']} images, {res['pool_missing']} missing -> "
        f"{run / 'generate' / pool}"
    )


@edit_app.command("inpaint")
def edit_inpaint(
    protocol: Annotated[Path, typer.Argument(help="Protocol YAML file")],
    mask: Annotated[
        str | None,
        typer.Option(
            help="boxes:TABLE.csv (original pixels) | png:FILE.png (model size) | rect:x0,y0,x1,y1"
        ),
    ] = None,
    to_class: ToClassOpt = None,
    jump_length: Annotated[int | None, typer.Option(help="RePaint j (levels per jump)")] = None,
    resamplings: Annotated[int | None, typer.Option(help="RePaint r (1 = none)")] = None,
    pool: PoolOpt = None,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    snapshot: SnapshotOpt = None,
    shard: Annotated[str | None, typer.Option(help="i/n: edits k with k % n == i")] = None,
    threads: ThreadsOpt = None,
) -> None:
    """Inpaint a mask of each training image (insert or remove a finding); resumable."""
    import json

    extra = []
    if mask:
        kind, _, arg = mask.partition(":")
        if kind in ("boxes", "png") and arg:
            mask = f"{kind}:{Path(arg).expanduser().resolve()}"  # relative to the shell's folder
        extra.append(f"mask={json.dumps(mask)}")
    for key, val in (
        ("to_class", to_class),
        ("jump_length", jump_length),
        ("resamplings", resamplings),
        ("pool", pool),
    ):
        if val is not None:
            extra.append(f"{key}={json.dumps(val)}")
    _edit(protocol, set_, run_dir, snapshot, shard, threads, "inpaint", extra)


@edit_app.command("vary")
def edit_vary(
    protocol: Annotated[Path, typer.Argument(help="Protocol YAML file")],
    strength: Annotated[
        float | None, typer.Option(help="SDEdit s in (0, 1]: noise level as a share of T")
    ] = None,
    to_class: ToClassOpt = None,
    pool: PoolOpt = None,
    set_: SetOpt = None,
    run_dir: RunDirOpt = None,
    snapshot: SnapshotOpt = None,
    shard: Annotated[str | None, typer.Option(help="i/n: edits k with k % n == i")] = None,
    threads: ThreadsOpt = None,
) -> None:
    """SDEdit variations of training images (same class) or counterfactuals (--to-class)."""
    import json

    extra = [
        f"{k}={json.dumps(v)}"
        for k, v in (("strength", strength), ("to_class", to_class), ("pool", pool))
        if v is not None
    ]
    _edit(protocol, set_, run_dir, snapshot, shard, threads, "vary", extra)
