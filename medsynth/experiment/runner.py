"""One protocol, one study: ingest -> train -> generate -> evaluate -> report, resumable.

Each stage writes ``<stage>/.stage.json`` last (``generate/<pool>/.stage.json`` for a pool, so
pools of other names stay valid beside it), holding the SHA-256 of its inputs (the protocol
sections it reads, chained through the stages before it). A rerun skips a stage whose marker
matches, resumes one without a marker (training from its newest state, generation from its
verified files), and clears and recomputes one whose inputs changed — and everything after it.
The stage commands (``medsynth ingest|train|generate|evaluate|report``) go through
:func:`run_stage` and record the same markers, so a following ``run`` skips what they did.
"""

from __future__ import annotations

import glob
import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medsynth.runfolder import STAGES, prepare_run_dir, run_dir_for, stage_inputs
from medsynth.runtime import apply_threads

MARKER = ".stage.json"


class StudyError(RuntimeError):
    """A study cannot go on; the message says what to do."""


@dataclass
class StagePlan:
    stage: str
    action: str  # run | resume | rerun (inputs changed) | skip (done) | guide (train: the
    # model is done, its autoguidance guide is not: train the guide only)
    inputs_sha256: str
    folder: Path  # RUN/<stage>, or RUN/generate/<pool>


@dataclass
class StudyResult:
    run_dir: Path
    plan: list[StagePlan]
    seconds: dict[str, float] = field(default_factory=dict)


def stage_folder(run_dir: Path, stage: str, protocol) -> Path:
    """Where ``stage`` writes for this protocol: a pool has a folder (and marker) of its own."""
    if stage == "generate":
        return Path(run_dir) / "generate" / protocol.generation.pool
    return Path(run_dir) / stage


def stage_status(folder: Path, want: str) -> str:
    """``skip`` (done with inputs ``want``), ``resume``, ``rerun`` (other inputs) or ``run``."""
    marker = folder / MARKER
    if marker.exists():
        return "skip" if json.loads(marker.read_text()).get("inputs_sha256") == want else "rerun"
    started = folder / ".inputs"
    if started.exists():
        return "resume" if started.read_text().strip() == want else "rerun"
    return "run"


def plan_stages(protocol, run_dir: Path, stages: list[str] | None = None) -> list[StagePlan]:
    """What a run would do, stage by stage; a stage after a recomputed one is recomputed too."""
    hashes = stage_hashes(protocol)
    chosen = stages or list(STAGES)
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        raise StudyError(f"unknown stage(s) {unknown}; valid choices: {', '.join(STAGES)}")
    plan, dirty = [], False
    for stage in STAGES:
        if stage not in chosen:
            continue
        folder = stage_folder(Path(run_dir), stage, protocol)
        action = stage_status(folder, hashes[stage])
        if dirty and action == "skip":
            action = "rerun"
        if stage == "train" and action == "skip" and _guide_pending(protocol, Path(run_dir)):
            action = "guide"  # the model stays; only a pool drawn with the guide is redrawn
        dirty = (
            dirty
            or action not in ("skip", "guide")
            or (action == "guide" and protocol.generation.uses_guide)
        )
        plan.append(StagePlan(stage, action, hashes[stage], folder))
    return plan


def _guide_pending(protocol, run: Path) -> bool:
    """Whether the protocol asks for an autoguidance guide that ``RUN/train`` lacks."""
    from medsynth.training.api import guide_snapshot

    steps = protocol.training.guide_steps
    return bool(steps) and guide_snapshot(run / "train", steps) is None


def stage_hashes(protocol) -> dict[str, str]:
    """Every stage's input hash, the base snapshot of an adapting protocol included."""
    return stage_inputs(protocol, _base_sha256(protocol))


def _base_sha256(protocol) -> str | None:
    """Hash of the base snapshot an adapting protocol starts from (None: none, or not found
    yet - training then stops with the reason)."""
    if not protocol.training.init_from:
        return None
    from medsynth.training.adapt import BaseModelError, resolve_base
    from medsynth.training.checkpoint import snapshot_sha256

    try:
        return snapshot_sha256(resolve_base(protocol.training.init_from))
    except (BaseModelError, FileNotFoundError):
        return None


def _check_class_names(protocol, run: Path, stage: str) -> None:
    """A key naming a class the ingest lacks fails before a later stage clears its folder (a
    protocol that does not name its classes can only be checked once they are ingested)."""
    summary = run / "ingest" / "summary.json"
    if stage != "ingest" and summary.exists():
        classes = json.loads(summary.read_text())["classes"]
        if why := protocol.unknown_class_names(classes):
            raise StudyError(f"{why}; the ingest's classes are {classes}")


def _begin(p: StagePlan) -> Path:
    folder = p.folder
    if p.action == "rerun" and folder.exists():
        # Stale outputs from other inputs must not be resumed from or mixed in.
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # In progress: a kill from here on leaves "resume", never a "done" claim for new outputs.
    (folder / MARKER).unlink(missing_ok=True)
    (folder / ".inputs").write_text(p.inputs_sha256 + "\n")
    return folder


def _finish(p: StagePlan, seconds: float, extra: dict | None = None) -> None:
    marker = {
        "inputs_sha256": p.inputs_sha256,
        "seconds": round(seconds, 2),
        "finished": time.time(),
    }
    (p.folder / MARKER).write_text(json.dumps(marker | (extra or {}), indent=2))


def _invalidate_after(protocol, run: Path, stage: str) -> None:
    """``stage`` was (re)computed: what later stages made from its old outputs is stale.

    Their markers go and their ``.inputs`` no longer match, so the next run clears and
    recomputes them. A pool no evaluation reads leaves evaluate and report alone.
    """
    if stage == "generate" and protocol.generation.pool not in protocol.evaluation.pools:
        return
    for later in STAGES[STAGES.index(stage) + 1 :]:
        if later == "generate":
            folders = sorted(p for p in (run / "generate").glob("*") if p.is_dir())
        else:
            folders = [run / later]
        for folder in folders:
            if (folder / MARKER).exists() or (folder / ".inputs").exists():
                (folder / MARKER).unlink(missing_ok=True)
                (folder / ".inputs").write_text(f"stale: {stage} was recomputed\n")


def run_stage(
    protocol,
    stage: str,
    run_dir: str | Path,
    work: Callable[[], Any],
    *,
    complete: Callable[[Any], bool] = lambda result: True,
    log: Callable[[str], None] = print,
) -> Any:
    """Do one stage the way :func:`run_protocol` does, for a stage command; return ``work()``.

    Inputs changed since the folder was made: it is cleared first (as ``run`` does). The stage
    is recorded done (``.stage.json``) when ``complete(result)`` holds and every stage before it
    is done for this protocol; stages after it that used its old outputs are marked stale.
    """
    run = Path(run_dir)
    prepare_run_dir(protocol, run)
    threads = apply_threads(protocol.runtime.threads)
    hashes = stage_hashes(protocol)
    folder = stage_folder(run, stage, protocol)
    p = StagePlan(stage, stage_status(folder, hashes[stage]), hashes[stage], folder)
    if p.action == "rerun":
        log(f"[{stage}] inputs changed since {folder} was made: clearing it and recomputing")
    # A done stage keeps its marker while its work repeats (a no-op, or the train stage's
    # missing guide): a kill then leaves it done, not "resume" with everything after it stale.
    guide = (
        p.action == "skip"
        and stage == "train"
        and protocol.generation.uses_guide
        and _guide_pending(protocol, run)
    )
    if p.action != "skip":
        _check_class_names(protocol, run, stage)
        _begin(p)
    t0 = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - t0
    if p.action != "skip" or guide:
        _invalidate_after(protocol, run, stage)
    before = STAGES[: STAGES.index(stage)]
    pending = [
        s for s in before if stage_status(stage_folder(run, s, protocol), hashes[s]) != "skip"
    ]
    if pending:
        log(
            f"[{stage}] not recorded as done: {', '.join(pending)} not done for this protocol "
            "in this run folder (`medsynth run` does them first)"
        )
    elif complete(result):
        _finish(p, seconds, {"threads": threads})
    return result


def run_protocol(
    protocol,
    *,
    stages: list[str] | None = None,
    run_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> StudyResult:
    """Run (or resume) the study the protocol describes; returns the run folder and plan."""
    from medsynth.data.ingest import ingest_dataset

    run = Path(run_dir or run_dir_for(protocol))
    prepare_run_dir(protocol, run)
    threads = apply_threads(protocol.runtime.threads)
    plan = plan_stages(protocol, run, stages)
    result = StudyResult(run, plan)
    ds = protocol.dataset
    for p in plan:
        if p.action == "skip":
            log(f"[{p.stage}] done before (inputs unchanged) - skipped")
            continue
        log(f"[{p.stage}] {p.action}")
        _check_class_names(protocol, run, p.stage)
        t0 = time.perf_counter()
        if p.stage == "ingest":
            # Ingest writes into RUN/ingest itself; its cache is cheap to rebuild on change.
            _begin(p)
            summary = ingest_dataset(ds, run)
            log("  " + summary.line())
        elif p.stage == "train":
            from medsynth.training.api import train_from_sections

            if p.action != "guide":  # the model's marker stays while only its guide trains
                _begin(p)
            snap = train_from_sections(
                run / "ingest",
                run / "train",
                protocol.model,
                protocol.schedule,
                protocol.training,
                train_fraction=ds.train_fraction,
                fraction_seed=ds.fraction_seed,
                progress=progress,
            )
            log(f"  snapshot {snap.relative_to(run)}")
            if protocol.upscaler is not None:
                from medsynth.training.api import train_upscaler_stage

                up = train_upscaler_stage(
                    run / "ingest",
                    run / "upscaler",
                    protocol.upscaler,
                    protocol.schedule,
                    train_fraction=ds.train_fraction,
                    fraction_seed=ds.fraction_seed,
                    device=protocol.training.device,
                    progress=progress,
                )
                log(f"  upsampler {up.relative_to(run)}")
                from medsynth.experiment.upscale_eval import compare_line, compare_upscaler

                if protocol.upscaler.compare_images:
                    n = protocol.upscaler.compare_images
                    log("  " + compare_line(compare_upscaler(run, protocol, max_images=n)))
        elif p.stage == "generate":
            from medsynth.generation.api import generate_from_protocol

            if p.action != "resume":
                _remove_chained(p.folder)
            _begin(p)
            res = generate_from_protocol(protocol, run, progress=progress)
            if not res["pool_complete"]:
                raise StudyError(
                    f"pool {protocol.generation.pool} is incomplete ({res['pool_missing']} missing)"
                )
            log(f"  pool {protocol.generation.pool}: {res['pool_images']} images")
            if "upscaled" in res:
                up = res["upscaled"]
                log(f"  pool {up['pool']}: {up['pool_images']} images upscaled")
        elif p.stage == "evaluate":
            from medsynth.evaluation.study import run_study

            _begin(p)
            missing = [
                pl
                for pl in protocol.evaluation.pools
                if not (run / "generate" / pl / "manifest.csv").exists()
            ]
            if missing:
                raise StudyError(
                    f"evaluation.pools names {missing}, which were not generated in {run / 'generate'}; "
                    f"generate them (generation.pool) or list only {protocol.generation.pool!r}"
                )
            res = run_study(
                run / "ingest",
                run / "generate",
                run / "evaluate",
                protocol.evaluation,
                train_fraction=ds.train_fraction,
                fraction_seed=ds.fraction_seed,
                progress=progress,
            )
            for w in res["summary"]["warnings"]:
                log(f"  WARNING: {w}")
        elif p.stage == "report":
            from medsynth.experiment.report import write_report

            _begin(p)
            path = write_report(run, protocol)
            log(f"  report {path}")
        result.seconds[p.stage] = time.perf_counter() - t0
        if p.action == "guide":
            log(f"  guide {(run / 'train' / 'guide').relative_to(run)}")
            continue
        _invalidate_after(protocol, run, p.stage)
        _finish(p, result.seconds[p.stage], {"threads": threads})
    return result


def _remove_chained(pool_dir: Path) -> None:
    """Remove the ``upscaler.chain`` pools of ``RUN/generate/<pool>`` (``<pool>_x<k>``, no
    marker of their own): a pool made again leaves them stale, and their request would refuse
    the new pool's upscale."""
    for folder in pool_dir.parent.glob(f"{glob.escape(pool_dir.name)}_x*"):
        if (
            re.fullmatch(r"_x\d+", folder.name[len(pool_dir.name) :])
            and not (folder / MARKER).exists()
        ):
            shutil.rmtree(folder)


def _chained_pool(folder: Path) -> str | None:
    """The source pool of an ``upscaler.chain`` pool folder (``<pool>_x<k>``, written inside
    its source pool's generate stage, so it has no marker of its own); else None."""
    m = re.fullmatch(r"(.+)_x\d+", folder.name)
    if folder.parent.name != "generate" or not m or not (folder / "manifest.csv").exists():
        return None
    return m.group(1) if (folder.parent / m.group(1) / MARKER).exists() else None


def _guide_status(run: Path) -> str:
    """``snapshot-0001000 (autoguidance)`` for a finished guide of the model in RUN/train."""
    from medsynth.training.api import guide_snapshot, run_guide_steps

    steps = run_guide_steps(run)
    if not steps:
        return "not used by this run's protocol"
    snap = guide_snapshot(run / "train", steps)
    if snap is None:
        return "started, not finished or not this protocol's (a rerun trains it)"
    return f"{snap.name} (autoguidance)"


def show(run_dir: str | Path) -> str:
    """Status of each stage and the headline results of a run folder, as text."""
    run = Path(run_dir)
    if not (run / "protocol.yaml").exists():
        raise StudyError(f"{run} is not a run folder (no protocol.yaml)")
    lines = [f"run folder: {run}"]
    for stage in STAGES:
        if stage == "generate" and (run / stage).is_dir():
            folders = sorted(p for p in (run / stage).glob("*") if p.is_dir()) or [run / stage]
        else:
            folders = [run / stage]
        for folder in folders:
            what = stage if folder.parent == run else f"{stage} {folder.name}"
            marker = folder / MARKER
            source = None if marker.exists() else _chained_pool(folder)
            if marker.exists():
                m = json.loads(marker.read_text())
                lines.append(f"  {what:<9} done in {m['seconds']:.1f} s")
            elif source:
                from medsynth.utils.csvsafe import read_rows

                n = len(read_rows(folder / "manifest.csv"))
                lines.append(f"  {what:<9} {n} images upscaled from {source}")
            elif folder.exists():
                lines.append(f"  {what:<9} started, not finished (a rerun resumes it)")
            else:
                lines.append(f"  {what:<9} not run")
            if stage == "train" and (folder / "guide").is_dir():
                lines.append(f"  {'guide':<9} {_guide_status(run)}")
    ingest = run / "ingest" / "summary.json"
    if ingest.exists():
        s = json.loads(ingest.read_text())
        lines.append(f"data: {s['images']} images, classes {s['classes']}, skipped {s['skipped']}")
        if s.get("duplicates"):
            from medsynth.data.leakage import leak_line

            lines.append("  " + leak_line(s["duplicates"]))
    uplift = run / "evaluate" / "uplift.csv"
    if uplift.exists():
        from medsynth.utils.csvsafe import read_rows

        lines.append("uplift (test AUC; difference to real-only with 95 % CI):")
        for r in read_rows(uplift):
            d = (
                (
                    f"{float(r['auc_vs_real']):+.3f} [{float(r['auc_vs_real_ci_low']):+.3f}, "
                    f"{float(r['auc_vs_real_ci_high']):+.3f}]"
                )
                if r.get("auc_vs_real")
                else ""
            )
            lines.append(f"  {r['arm']:<32} {float(r['auc_mean']):.3f} {d}")
        summary = json.loads((run / "evaluate" / "summary.json").read_text())
        lines += [f"  WARNING: {w}" for w in summary.get("warnings", [])]
    fidelity = run / "evaluate" / "fidelity.json"
    if fidelity.exists() and ingest.exists():
        from medsynth.evaluation.per_class import per_class_lines

        classes = json.loads(ingest.read_text())["classes"]
        for key, per in json.loads(fidelity.read_text()).items():
            lines.append(f"per-class quality, {key} (synthetic vs real of the same class):")
            lines += per_class_lines(per, classes, indent="  ")
    memo = run / "evaluate" / "memorization.json"
    if memo.exists():
        from medsynth.evaluation.memorization import audit_line

        for name, m in json.loads(memo.read_text()).items():
            lines.append(f"memorization audit, pool {name}: {audit_line(m)}")
    sweep = run / "sweep" / "stats.json"
    if sweep.exists():
        from medsynth.experiment.sweep_analysis import knob_effect_lines

        # A sweep run: its units live under RUN/sweep/; print the verdicts instead.
        done = len(list((run / "sweep").rglob(MARKER)))
        lines.append(f"sweep: {done} finished units; table {run / 'sweep' / 'configs.csv'}")
        for fr in json.loads(sweep.read_text())["fractions"].values():
            lines.append("  " + fr["recommendation"])
            lines += knob_effect_lines(fr)
            lines += [f"  WARNING: {w}" for w in fr.get("warnings", [])]
    if (run / "report" / "index.html").exists():
        lines.append(f"report: {run / 'report' / 'index.html'}")
    return "\n".join(lines)
