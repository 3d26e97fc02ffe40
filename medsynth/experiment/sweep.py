"""A sweep in one protocol: plan -> generators -> pools -> evaluations -> analysis -> report.

``sweep:`` lists values; the plan is their grid. Per train fraction one generator is trained on
that fraction only; each pool (guidance x sampler x pool size) is generated once under a name
derived from its settings; the arms are uplift studies (``evaluation.study.run_study``): per
fraction x class mix one baseline unit (real-only and the count-matched duplicate control of
every ratio) and per pool one unit (real-only as feature extractor, the synthetic arms of every
selector x ratio). Every unit writes the runner's stage marker last, so a rerun after ``kill -9``
skips what is done and resumes the rest; ``sweep_analysis`` pairs the arms with the baselines.

Layout: ``RUN/ingest`` (shared), ``RUN/sweep/f<fraction>/{train, generate/<pool>,
evaluate/<mix>/{_baselines, <pool>}}``, ``RUN/sweep/{plan.json, configs.csv, stats.json}``,
``RUN/report``.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

from medsynth.experiment.runner import (
    StagePlan,
    StudyError,
    _begin,
    _finish,
    stage_hashes,
    stage_status,
)
from medsynth.protocol import (
    GRID_SAMPLERS,
    LATER_KNOBS,
    Protocol,
    SamplerSetting,
    autoguidance_below_one,
    is_guided,
    sampler_revision,
)
from medsynth.runfolder import _sha, prepare_run_dir, run_dir_for, stage_inputs

# A pool unit fits real-only too (seed 0 is its feature extractor; deterministic, so identical
# in every unit of a fraction); the duplicate controls do not depend on the pool and are fitted
# once per fraction x class mix, in the baseline unit.
POOL_ARMS = ["real_only", "synthetic"]
BASELINE_ARMS = ["real_only", "duplicate_control"]


@dataclass(frozen=True)
class PoolSpec:
    """The generation settings of one pool; ``name`` is derived from them alone."""

    guidance_scale: float
    sampler: str
    steps: int
    ddim_eta: float
    pool_size: float  # images per class = ceil(pool_size x the largest real class)
    guidance_rescale: float = 0.0  # rescaled-guidance phi; 0 = plain CFG
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # guided share of t / T
    class_guidance: tuple[tuple[str, float], ...] = ()  # sorted (class name, scale) pairs
    autoguidance: bool = False  # guided rows extrapolate from the guide, not the null class

    @property
    def name(self) -> str:
        """E.g. ``g2-dpmpp20-p1``; the later knobs add ``-r0.7`` / ``-i0.2-0.8`` /
        ``-c.normal_2`` / ``-ag`` only when set, so pools of older sweeps keep their names."""
        eta = f"-eta{self.ddim_eta:g}" if self.sampler == "ddim" else ""
        guide = f"-r{self.guidance_rescale:g}" if self.guidance_rescale else ""
        lo, hi = self.guidance_interval
        if (lo, hi) != (0.0, 1.0):
            guide += f"-i{lo:g}-{hi:g}"
        # A class name may hold any character, the pool name is a folder name; a scale never
        # holds "_", so the last one separates them ("0" at 11.5 -> c.0_11.5, "01" -> c.01_1.5).
        guide += "".join(f"-c.{_name_part(c)}_{v:g}" for c, v in self.class_guidance)
        guide += "-ag" if self.autoguidance else ""
        return (
            f"g{self.guidance_scale:g}{guide}-{self.sampler}{self.steps}{eta}-p{self.pool_size:g}"
        )

    @property
    def guided(self) -> bool:
        """Whether some class is sampled at a scale other than 1 (two passes per step)."""
        return is_guided(self.guidance_scale, (v for _, v in self.class_guidance))

    def scale_of(self, class_name: str) -> float:
        """The guidance scale this pool's images of ``class_name`` are sampled with."""
        return dict(self.class_guidance).get(class_name, self.guidance_scale)


def _name_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", text)


@dataclass(frozen=True)
class Unit:
    """One uplift study: a pool of one fraction's generator, evaluated under one class mix."""

    fraction: float
    class_mix: str
    pool: PoolSpec
    selectors: tuple[str, ...]

    @property
    def folder(self) -> str:
        return f"{fraction_dir(self.fraction)}/evaluate/{self.class_mix}/{self.pool.name}"


@dataclass
class SweepPlan:
    grid_fractions: list[float]  # every pool x selector at these
    pools: list[PoolSpec]
    class_mixes: list[str]
    selectors: list[str]
    ratios: list[float]
    curve_fractions: list[float] = field(default_factory=list)  # curve pools/selectors only
    curve_pools: list[PoolSpec] = field(default_factory=list)
    curve_selectors: list[str] = field(default_factory=list)

    @property
    def fractions(self) -> list[float]:
        return sorted(set(self.grid_fractions) | set(self.curve_fractions))

    def pools_at(self, fraction: float) -> list[PoolSpec]:
        return self.pools if fraction in self.grid_fractions else self.curve_pools

    def selectors_at(self, fraction: float) -> list[str]:
        return self.selectors if fraction in self.grid_fractions else self.curve_selectors

    @property
    def units(self) -> list[Unit]:
        return [
            Unit(f, m, p, tuple(self.selectors_at(f)))
            for f in self.fractions
            for m in self.class_mixes
            for p in self.pools_at(f)
        ]

    @property
    def n_configs(self) -> int:
        """Synthetic configurations per grid fraction (pool x selector x ratio x class mix)."""
        return len(self.pools) * len(self.selectors) * len(self.ratios) * len(self.class_mixes)


def fraction_dir(fraction: float) -> str:
    return f"sweep/f{fraction:g}"


def baseline_dir(fraction: float, class_mix: str) -> str:
    """The unit with real-only and the duplicate controls of every ratio for one fraction/mix."""
    return f"{fraction_dir(fraction)}/evaluate/{class_mix}/_baselines"


def expand(protocol: Protocol) -> SweepPlan:
    """The grid a protocol's ``sweep:`` describes; an empty list keeps the protocol's value."""
    sw, g, ev = protocol.sweep, protocol.generation, protocol.evaluation
    if sw is None:
        raise StudyError("the protocol has no sweep: section")
    samplers = sw.samplers or [
        SamplerSetting(sampler=g.sampler, steps=g.steps, ddim_eta=g.ddim_eta)
    ]
    pool_sizes = sw.pool_size or [max(sw.ratios or ev.ratios)]
    pools = [
        PoolSpec(gs, s.sampler, s.steps, s.ddim_eta, ps, gr, tuple(gi), tuple(sorted(cg.items())))
        for gs, gr, gi, cg, s, ps in itertools.product(
            sw.guidance_scale or [g.guidance_scale],
            sw.guidance_rescale or [g.guidance_rescale],
            sw.guidance_interval or [g.guidance_interval],
            sw.class_guidance or [g.class_guidance],
            samplers,
            pool_sizes,
        )
    ]
    # An unguided pool never calls the guide: drawn once, not once per autoguidance value.
    pools = list(
        dict.fromkeys(
            replace(p, autoguidance=ag and p.guided)
            for p in pools
            for ag in sw.autoguidance or [g.autoguidance]
        )
    )
    for p in pools:
        low = autoguidance_below_one(p.guidance_scale, dict(p.class_guidance))
        if p.autoguidance and low:
            raise StudyError(
                f"sweep: the pool {p.name}: {low}; take the value out of the sweep or "
                "sweep.autoguidance"
            )
        same = [c for c, v in p.class_guidance if v == p.guidance_scale]
        if same:
            raise StudyError(
                f"sweep.class_guidance gives {same} the scale {p.guidance_scale:g}, which is "
                f"guidance_scale already: the pool {p.name} would repeat the one without it"
            )
    names = [p.name for p in pools]
    if len(set(names)) != len(names):
        raise StudyError(
            f"two pools of the sweep would share a name (the same sampler setting twice, or "
            f"class names that differ only in characters a folder name cannot hold): {names}"
        )
    by_name = {p.name: p for p in pools}
    unknown = [n for n in sw.curve_pools if n not in by_name]
    if unknown:
        raise StudyError(
            f"sweep.curve_pools names {unknown}, which the sweep does not generate; "
            f"its pools are: {', '.join(by_name)}"
        )
    selectors = sw.selectors or list(ev.selectors)
    plan = SweepPlan(
        sw.train_fractions or [protocol.dataset.train_fraction],
        pools,
        sw.class_mix or [ev.class_mix],
        selectors,
        sw.ratios or list(ev.ratios),
        sw.curve_fractions,
        [by_name[n] for n in sw.curve_pools] or pools,
        sw.curve_selectors or selectors,
    )
    if protocol.schedule.kind == "rflow" and any(p.sampler != "euler" for p in pools):
        raise StudyError("rflow schedules sample with 'euler' only; fix sweep.samplers")
    if protocol.schedule.kind != "rflow" and any(p.sampler == "euler" for p in pools):
        raise StudyError("the 'euler' sampler needs schedule.kind 'rflow'; fix sweep.samplers")
    off_grid = sorted({p.sampler for p in pools if p.sampler not in GRID_SAMPLERS})
    if g.timestep_spacing != "trailing" and off_grid:
        raise StudyError(
            f"generation.timestep_spacing {g.timestep_spacing!r} applies to "
            f"{', '.join(GRID_SAMPLERS)}; sweep.samplers also lists {off_grid}"
        )
    return plan


# --- per-fraction protocols and stage hashes -----------------------------------------------


def fraction_protocol(protocol: Protocol, fraction: float) -> Protocol:
    ds = protocol.dataset.model_copy(update={"train_fraction": fraction})
    return protocol.model_copy(update={"dataset": ds})


def pool_protocol(protocol: Protocol, fraction: float, pool: PoolSpec, per_class: int) -> Protocol:
    gen = protocol.generation.model_copy(
        update={
            "pool": pool.name,
            "guidance_scale": pool.guidance_scale,
            "sampler": pool.sampler,
            "steps": pool.steps,
            "ddim_eta": pool.ddim_eta,
            "guidance_rescale": pool.guidance_rescale,
            "guidance_interval": list(pool.guidance_interval),
            "class_guidance": dict(pool.class_guidance),
            "autoguidance": pool.autoguidance,
            "count_mode": "per_class",
            "per_class": per_class,
            "counts": {},
        }
    )
    return fraction_protocol(protocol, fraction).model_copy(update={"generation": gen})


def unit_evaluation(protocol: Protocol, plan: SweepPlan, unit: Unit):
    return protocol.evaluation.model_copy(
        update={
            "pools": [unit.pool.name],
            "selectors": list(unit.selectors),
            "ratios": plan.ratios,
            "class_mix": unit.class_mix,
            "arms": POOL_ARMS,
        }
    )


def baseline_evaluation(protocol: Protocol, plan: SweepPlan, class_mix: str):
    return protocol.evaluation.model_copy(
        update={"pools": [], "ratios": plan.ratios, "class_mix": class_mix, "arms": BASELINE_ARMS}
    )


# --- estimate --------------------------------------------------------------------------------


def _train_counts(protocol: Protocol, run: Path, fraction: float) -> dict[str, int]:
    """Real training images per class name at ``fraction``: from the ingest cache, else
    estimated; in the classes' label order."""
    if (run / "ingest" / "index.csv").exists():
        from medsynth.data.datasets import split_rows

        summary = json.loads((run / "ingest" / "summary.json").read_text())
        rows = split_rows(run / "ingest", "train", fraction, protocol.dataset.fraction_seed)
        return {c: sum(r["label"] == c for r in rows) for c in summary["classes"]}
    ds = protocol.dataset
    if ds.kind == "phantoms":
        from medsynth.data.phantoms import class_names

        n = ds.phantoms.num_classes
        total = ds.phantoms.n_patients * 1.25 * ds.split_fractions["train"]
        return dict.fromkeys(class_names(ds.phantoms.body_part)[:n], round(total * fraction / n))
    import csv

    with Path(ds.labels_csv).open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if ds.split_column:
        rows = [r for r in rows if r.get(ds.split_column) == ds.split_values["train"]]
    else:
        rows = rows[: round(len(rows) * ds.split_fractions["train"])]
    labels = ds.classes or sorted({r[ds.label_column] for r in rows})
    return {c: round(sum(r[ds.label_column] == c for r in rows) * fraction) for c in labels}


def estimate(protocol: Protocol, plan: SweepPlan, run: Path) -> dict:
    """Seconds each part of the sweep should take, from the ``sweep.seconds_per_*`` constants."""
    sw, tr, ev = protocol.sweep, protocol.training, protocol.evaluation
    out = {"train": 0.0, "generate": 0.0, "evaluate": 0.0, "fits": 0}
    epochs = ev.classifier.epochs
    for f in plan.fractions:
        counts = _train_counts(protocol, run, f)
        n, top = sum(counts.values()), max(counts.values())
        out["train"] += (tr.max_steps + tr.guide_steps) * sw.seconds_per_train_step
        for p in plan.pools_at(f):
            lo, hi = p.guidance_interval
            per_class = math.ceil(p.pool_size * top)
            for c in counts:
                # A guided image takes the null pass too, over the guided share of the steps.
                calls = p.steps * (1 if p.scale_of(c) == 1 else 1 + (hi - lo))
                out["generate"] += per_class * calls * sw.seconds_per_image_step
        for _ in plan.class_mixes:
            # The baseline unit: real-only and a duplicate control per ratio.
            sizes = [n] + [n * (1 + r) for r in plan.ratios]
            for _p in plan.pools_at(f):
                # A pool unit: real-only (its feature extractor) and every synthetic arm.
                sizes += [n] + [n * (1 + r) for r in plan.ratios for _s in plan.selectors_at(f)]
            out["fits"] += ev.seeds * len(sizes)
            out["evaluate"] += ev.seeds * sum(sizes) * epochs * sw.seconds_per_fit_image_epoch
    out["total"] = out["train"] + out["generate"] + out["evaluate"]
    return out


def describe(protocol: Protocol, run: Path) -> str:
    """The expanded plan, what is done already, and the estimated time, as text (--dry-run)."""
    plan = expand(protocol)
    est = estimate(protocol, plan, run)
    lines = [
        f"sweep {protocol.name}: grid at train fraction(s) "
        f"{', '.join(f'{f:g}' for f in plan.grid_fractions)}; {len(plan.pools)} pool(s); "
        f"{plan.n_configs} synthetic configuration(s) per grid fraction "
        f"({len(plan.pools)} pools x {len(plan.selectors)} selectors x {len(plan.ratios)} ratios x "
        f"{len(plan.class_mixes)} class mixes); {protocol.evaluation.seeds} seeds",
        "pools:",
    ]
    lines += [f"  {p.name}" for p in plan.pools]
    lines.append(f"selectors {plan.selectors}, ratios {plan.ratios}, class mix {plan.class_mixes}")
    curve_only = [f for f in plan.curve_fractions if f not in plan.grid_fractions]
    if curve_only:
        lines.append(
            f"low-data curve at {', '.join(f'{f:g}' for f in curve_only)}: pools "
            f"{[p.name for p in plan.curve_pools]} x selectors {plan.curve_selectors}"
        )
    lines.append("units (fraction / class mix / pool -> action):")
    for f in plan.fractions:
        for m in plan.class_mixes:
            act = stage_status(run / baseline_dir(f, m), _baseline_sha(protocol, plan, f, m))
            lines.append(f"  {baseline_dir(f, m):<60} {'skip (done)' if act == 'skip' else act}")
    for u in plan.units:
        lines.append(f"  {u.folder:<60} {_unit_action(protocol, plan, run, u)}")
    lines.append(
        f"estimated time: train {_dur(est['train'])}, generate {_dur(est['generate'])}, "
        f"evaluate {_dur(est['evaluate'])} ({est['fits']} classifier fits); "
        f"total {_dur(est['total'])} "
        "(sweep.seconds_per_* constants; finished units are counted too)"
    )
    lines.append(f"run folder: {run}")
    return "\n".join(lines)


def _dur(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


# --- execution -----------------------------------------------------------------------------


def _train_sha(protocol: Protocol, fraction: float) -> str:
    # stage_hashes, not stage_inputs: an adapting sweep retrains when its base snapshot changes.
    return stage_hashes(fraction_protocol(protocol, fraction))["train"]


def _pool_sha(protocol: Protocol, fraction: float, pool: PoolSpec) -> str:
    gen = pool_protocol(protocol, fraction, pool, 0).generation.model_dump(mode="json")
    gen.pop("per_class")  # follows from the data; the train hash covers that
    gen |= sampler_revision(pool.sampler, pool.steps, protocol.schedule.num_train_timesteps)
    # Added after the pinned pool hashes (unlike the guidance knobs): left out at their defaults.
    for key in ("timestep_spacing", "class_guidance", "autoguidance"):
        if gen[key] == LATER_KNOBS["generation"][key]:
            del gen[key]
    if pool.autoguidance:
        gen["guide_fraction"] = protocol.training.guide_fraction  # the guide drew it too
    return _sha([_train_sha(protocol, fraction), gen])


def _baseline_sha(protocol: Protocol, plan: SweepPlan, fraction: float, class_mix: str) -> str:
    ev = baseline_evaluation(protocol, plan, class_mix).model_dump(mode="json")
    ds = fraction_protocol(protocol, fraction).dataset
    return _sha([stage_inputs(protocol)["ingest"], ds.train_fraction, ds.fraction_seed, ev])


def _unit_sha(protocol: Protocol, plan: SweepPlan, unit: Unit) -> str:
    ev = unit_evaluation(protocol, plan, unit).model_dump(mode="json")
    return _sha([_pool_sha(protocol, unit.fraction, unit.pool), ev])


def _unit_action(protocol: Protocol, plan: SweepPlan, run: Path, unit: Unit) -> str:
    steps = [
        (f"{fraction_dir(unit.fraction)}/train", _train_sha(protocol, unit.fraction)),
        (
            f"{fraction_dir(unit.fraction)}/generate/{unit.pool.name}",
            _pool_sha(protocol, unit.fraction, unit.pool),
        ),
        (unit.folder, _unit_sha(protocol, plan, unit)),
    ]
    acts = [stage_status(run / folder, sha) for folder, sha in steps]
    return "skip (done)" if acts == ["skip"] * 3 else "/".join(acts) + " (train/generate/evaluate)"


def _step(run: Path, folder: str, sha: str, work: Callable[[], None], log) -> None:
    """Run ``work`` for ``RUN/folder`` unless its marker says it is done with these inputs."""
    action = stage_status(run / folder, sha)
    if action == "skip":
        return
    log(f"[{folder}] {action}")
    p = StagePlan(folder, action, sha, run / folder)
    t0 = time.perf_counter()
    _begin(p)
    work()
    _finish(p, time.perf_counter() - t0)


def _check_pool_sizes(plan: SweepPlan, counts: list[int], fraction: float) -> None:
    import torch

    from medsynth.evaluation.study import class_counts

    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    for p in plan.pools_at(fraction):
        have = math.ceil(p.pool_size * max(counts))
        for mix in plan.class_mixes:
            for r in plan.ratios:
                need = max(class_counts(labels, len(counts), r, mix))
                if need > have:
                    raise StudyError(
                        f"pool {p.name} at train fraction {fraction:g} holds {have} images per "
                        f"class but ratio {r:g} with class mix {mix!r} needs {need}: the duplicate "
                        "control would no longer match the synthetic count. Raise sweep.pool_size "
                        f"to at least {need / max(counts):.2f} or drop that ratio."
                    )


def _check_class_guidance_names(plan: SweepPlan, run: Path) -> None:
    """Class names of ``class_guidance`` against the ingested classes, before any training (the
    protocol checks them at load only where it lists ``dataset.classes``)."""
    classes = json.loads((run / "ingest" / "summary.json").read_text())["classes"]
    unknown = sorted({c for p in plan.pools for c, _ in p.class_guidance} - set(classes))
    if unknown:
        raise StudyError(
            f"class_guidance names unknown classes {unknown}; the ingested classes are {classes}"
        )


def run_sweep(
    protocol: Protocol,
    *,
    run_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> Path:
    """Run (or resume) every unit of the sweep, then the analysis and the report; returns RUN."""
    from medsynth.experiment.runner import run_protocol
    from medsynth.generation.api import generate_from_protocol
    from medsynth.training.api import guide_snapshot, train_from_sections

    plan = expand(protocol)
    run = Path(run_dir or run_dir_for(protocol))
    prepare_run_dir(protocol, run)
    run_protocol(protocol, stages=["ingest"], run_dir=run, log=log, progress=progress)
    (run / "sweep").mkdir(exist_ok=True)
    (run / "sweep" / "plan.json").write_text(
        json.dumps(
            {
                "grid_fractions": plan.grid_fractions,
                "curve_fractions": plan.curve_fractions,
                "pools": [asdict(p) | {"name": p.name} for p in plan.pools],
                "curve_pools": [p.name for p in plan.curve_pools],
                "curve_selectors": plan.curve_selectors,
                "class_mixes": plan.class_mixes,
                "selectors": plan.selectors,
                "ratios": plan.ratios,
                "estimate_s": estimate(protocol, plan, run),
            },
            indent=2,
        )
    )
    _check_class_guidance_names(plan, run)
    counts = {f: list(_train_counts(protocol, run, f).values()) for f in plan.fractions}
    for f in plan.fractions:
        _check_pool_sizes(plan, counts[f], f)
    for f in plan.fractions:
        fdir = run / fraction_dir(f)
        fdir.mkdir(parents=True, exist_ok=True)
        if not (fdir / "ingest").exists():
            (fdir / "ingest").symlink_to(Path("..", "..", "ingest"))  # one shared cache

        def train(f=f, fdir=fdir):
            p = fraction_protocol(protocol, f)
            train_from_sections(
                run / "ingest",
                fdir / "train",
                p.model,
                p.schedule,
                p.training,
                train_fraction=f,
                fraction_seed=p.dataset.fraction_seed,
                progress=progress,
            )

        _step(run, f"{fraction_dir(f)}/train", _train_sha(protocol, f), train, log)
        steps = protocol.training.guide_steps
        if steps and guide_snapshot(fdir / "train", steps) is None:
            log(f"[{fraction_dir(f)}/train] guide")
            train()  # the model is done (a no-op resume); its guide trains or resumes
        for p in plan.pools_at(f):
            pp = pool_protocol(protocol, f, p, math.ceil(p.pool_size * max(counts[f])))

            def gen(pp=pp, fdir=fdir, p=p):
                res = generate_from_protocol(pp, fdir, progress=progress)
                if not res["pool_complete"]:
                    raise StudyError(f"pool {p.name} is incomplete ({res['pool_missing']} missing)")

            _step(run, f"{fraction_dir(f)}/generate/{p.name}", _pool_sha(protocol, f, p), gen, log)
    for f in plan.fractions:
        for m in plan.class_mixes:
            sha = _baseline_sha(protocol, plan, f, m)
            _step(
                run,
                baseline_dir(f, m),
                sha,
                partial(_evaluate_baselines, protocol, plan, run, f, m, progress),
                log,
            )
    for u in plan.units:
        work = partial(_evaluate, protocol, plan, run, u, progress)
        _step(run, u.folder, _unit_sha(protocol, plan, u), work, log)
    from medsynth.experiment.sweep_analysis import analyse_sweep, summary_text
    from medsynth.experiment.sweep_report import write_sweep_report

    log(summary_text(analyse_sweep(run, plan, protocol.evaluation.bootstrap)))
    log(f"  report {write_sweep_report(run, protocol)}")
    return run


def _evaluate_baselines(
    protocol: Protocol, plan: SweepPlan, run: Path, fraction: float, class_mix: str, progress: bool
) -> None:
    from medsynth.evaluation.study import run_study

    run_study(
        run / "ingest",
        run / fraction_dir(fraction) / "generate",
        run / baseline_dir(fraction, class_mix),
        baseline_evaluation(protocol, plan, class_mix),
        train_fraction=fraction,
        fraction_seed=protocol.dataset.fraction_seed,
        progress=progress,
    )


def _evaluate(protocol: Protocol, plan: SweepPlan, run: Path, u: Unit, progress: bool) -> None:
    from medsynth.evaluation.study import run_study

    fdir = run / fraction_dir(u.fraction)
    run_study(
        run / "ingest",
        fdir / "generate",
        run / u.folder,
        unit_evaluation(protocol, plan, u),
        train_fraction=u.fraction,
        fraction_seed=protocol.dataset.fraction_seed,
        progress=progress,
    )
