"""One protocol, one study: ingest -> train -> generate -> evaluate -> report, resumable.

Each stage writes ``<stage>/.stage.json`` last, holding the SHA-256 of its inputs (the protocol
sections it reads, chained through the stages before it). A rerun skips a stage whose marker
matches, resumes one without a marker (training from its newest state, generation from its
verified files), and clears and recomputes one whose inputs changed — and everything after it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medsynth.runfolder import STAGES, prepare_run_dir, run_dir_for, stage_inputs

MARKER = ".stage.json"


class StudyError(RuntimeError):
    """A study cannot go on; the message says what to do."""


@dataclass
class StagePlan:
    stage: str
    action: str  # run | resume | rerun (inputs changed) | skip (done)
    inputs_sha256: str


@dataclass
class StudyResult:
    run_dir: Path
    plan: list[StagePlan]
    seconds: dict[str, float] = field(default_factory=dict)


def stage_status(run_dir: Path, stage: str, want: str) -> str:
    marker = run_dir / stage / MARKER
    if marker.exists():
        return "skip" if json.loads(marker.read_text()).get("inputs_sha256") == want else "rerun"
    started = run_dir / stage / ".inputs"
    if started.exists():
        return "resume" if started.read_text().strip() == want else "rerun"
    return "run"


def plan_stages(protocol, run_dir: Path, stages: list[str] | None = None) -> list[StagePlan]:
    """What a run would do, stage by stage; a stage after a recomputed one is recomputed too."""
    hashes = stage_inputs(protocol, _base_sha256(protocol))
    chosen = stages or list(STAGES)
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        raise StudyError(f"unknown stage(s) {unknown}; valid choices: {', '.join(STAGES)}")
    plan, dirty = [], False
    for stage in STAGES:
        if stage not in chosen:
            continue
        action = stage_status(run_dir, stage, hashes[stage])
        if dirty and action == "skip":
            action = "rerun"
        dirty = dirty or action != "skip"
        plan.append(StagePlan(stage, action, hashes[stage]))
    return plan


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


def _begin(run_dir: Path, p: StagePlan) -> Path:
    folder = run_dir / p.stage
    if p.action == "rerun" and folder.exists():
        # Stale outputs from other inputs must not be resumed from or mixed in.
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".inputs").write_text(p.inputs_sha256 + "\n")
    return folder


def _finish(run_dir: Path, p: StagePlan, seconds: float, extra: dict | None = None) -> None:
    marker = {
        "inputs_sha256": p.inputs_sha256,
        "seconds": round(seconds, 2),
        "finished": time.time(),
    }
    (run_dir / p.stage / MARKER).write_text(json.dumps(marker | (extra or {}), indent=2))


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
    plan = plan_stages(protocol, run, stages)
    result = StudyResult(run, plan)
    ds = protocol.dataset
    for p in plan:
        if p.action == "skip":
            log(f"[{p.stage}] done before (inputs unchanged) - skipped")
            continue
        log(f"[{p.stage}] {p.action}")
        t0 = time.perf_counter()
        if p.stage == "ingest":
            # Ingest writes into RUN/ingest itself; its cache is cheap to rebuild on change.
            _begin(run, p)
            summary = ingest_dataset(ds, run)
            log("  " + summary.line())
        elif p.stage == "train":
            from medsynth.training.api import train_from_sections

            _begin(run, p)
            snap = train_from_sections(run / "ingest", run / "train", protocol.model, protocol.schedule,
                                       protocol.training, train_fraction=ds.train_fraction,
                                       fraction_seed=ds.fraction_seed, progress=progress)  # fmt: skip
            log(f"  snapshot {snap.relative_to(run)}")
        elif p.stage == "generate":
            from medsynth.generation.api import generate_from_protocol

            _begin(run, p)
            res = generate_from_protocol(protocol, run, progress=progress)
            if not res["pool_complete"]:
                raise StudyError(
                    f"pool {protocol.generation.pool} is incomplete ({res['pool_missing']} missing)"
                )
            log(f"  pool {protocol.generation.pool}: {res['pool_images']} images")
        elif p.stage == "evaluate":
            from medsynth.evaluation.study import run_study

            _begin(run, p)
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
            run_study(run / "ingest", run / "generate", run / "evaluate", protocol.evaluation,
                      train_fraction=ds.train_fraction, fraction_seed=ds.fraction_seed, progress=progress)  # fmt: skip
        elif p.stage == "report":
            from medsynth.experiment.report import write_report

            _begin(run, p)
            path = write_report(run, protocol)
            log(f"  report {path}")
        result.seconds[p.stage] = time.perf_counter() - t0
        _finish(run, p, result.seconds[p.stage])
    return result


def show(run_dir: str | Path) -> str:
    """Status of each stage and the headline results of a run folder, as text."""
    run = Path(run_dir)
    if not (run / "protocol.yaml").exists():
        raise StudyError(f"{run} is not a run folder (no protocol.yaml)")
    lines = [f"run folder: {run}"]
    for stage in STAGES:
        marker = run / stage / MARKER
        if marker.exists():
            m = json.loads(marker.read_text())
            lines.append(f"  {stage:<9} done in {m['seconds']:.1f} s")
        elif (run / stage).exists():
            lines.append(f"  {stage:<9} started, not finished (a rerun resumes it)")
        else:
            lines.append(f"  {stage:<9} not run")
    ingest = run / "ingest" / "summary.json"
    if ingest.exists():
        s = json.loads(ingest.read_text())
        lines.append(f"data: {s['images']} images, classes {s['classes']}, skipped {s['skipped']}")
    uplift = run / "evaluate" / "uplift.csv"
    if uplift.exists():
        import csv

        lines.append("uplift (test AUC; difference to real-only with 95 % CI):")
        for r in csv.DictReader(uplift.open()):
            d = (f"{float(r['auc_vs_real']):+.3f} [{float(r['auc_vs_real_ci_low']):+.3f}, "
                 f"{float(r['auc_vs_real_ci_high']):+.3f}]") if r.get("auc_vs_real") else ""  # fmt: skip
            lines.append(f"  {r['arm']:<32} {float(r['auc_mean']):.3f} {d}")
    if (run / "report" / "index.html").exists():
        lines.append(f"report: {run / 'report' / 'index.html'}")
    return "\n".join(lines)
