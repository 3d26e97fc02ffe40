"""Sweep analysis: the evaluation units' files -> one table per configuration, adjusted, with
diversity <-> uplift correlations, the low-data curve and a recommendation (``RUN/sweep/``).

A configuration is (pool, selector, ratio, class mix); its id does not contain the train
fraction, so the same configuration can be followed across fractions (the low-data curve).
Multiplicity is handled per train fraction: the family is every configuration of that fraction.
Choices (the best configuration, the low-data curve's best and worst lines) are made on the
validation split (mean paired-seed AUC difference); the test split only reports them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medsynth.evaluation.stats import auc_score
from medsynth.evaluation.sweep_stats import (
    adjust_table,
    contrast_test,
    diversity_vs_uplift,
    holm,
    minimal_detectable_effect,
    paired_bootstrap_test,
    verdict,
)
from medsynth.evaluation.views import (
    gap_difference,
    usable_views,
    view_aucs,
    within_view_uplift,
)
from medsynth.utils.csvsafe import write_rows

DIVERSITY = ("recall_clf", "coverage_clf", "msssim_ratio", "vendi_clf", "vendi_pixels")
FIDELITY = ("FD_clf", "precision_clf")


def _load_unit(folder: Path) -> tuple:
    """``(y_test, test probas per arm, fidelity, (y_val, val probas per arm), test views)``; the
    validation pair is ``(None, {})`` and the views ``None`` for units evaluated before those
    were saved."""
    z = np.load(folder / "probas.npz")
    views = z["test_views"].astype(str) if "test_views" in z.files else None
    arms = [str(a) for a in z["arms"]]
    probas = {a: z[f"arm_{i}"] for i, a in enumerate(arms)}
    val = (None, {})
    if "y_val" in z.files:
        val = (z["y_val"], {a: z[f"val_arm_{i}"] for i, a in enumerate(arms)})
    return z["y_test"], probas, json.loads((folder / "fidelity.json").read_text()), val, views


def view_fields(y, views, proba_arm, proba_dup, proba_real, n_boot: int = 1000) -> dict:
    """Within-view columns of one configuration: ``auc_<view>`` (mean over seeds), ``view_gap``
    (first - second view, e.g. AP - PA), ``auc_<view>_vs_dup`` and ``view_gap_vs_dup`` (the
    gap's change vs the duplicate control) with paired bootstrap CIs, and real-only's
    ``real_auc_<view>``. ``{}`` without two views that hold both classes.
    ``(S, N, K)`` probabilities."""
    vl = usable_views(y, views) if views is not None else []
    if not vl:
        return {}
    rec = view_aucs(y, proba_arm, views, vl)
    real = view_aucs(y, proba_real, views, vl)
    out = {f"auc_{v}": rec["views"][v]["auc_mean"] for v in vl}
    out |= {f"real_auc_{v}": real["views"][v]["auc_mean"] for v in vl}
    out["real_view_gap"] = real["gap"]["mean"]
    out["view_gap"] = rec["gap"]["mean"]
    for v in vl:
        t = within_view_uplift(y, proba_arm, proba_dup, views, v, n_boot)
        out |= {
            f"auc_{v}_vs_dup": t["diff"],
            f"auc_{v}_vs_dup_ci_low": t["ci_low"],
            f"auc_{v}_vs_dup_ci_high": t["ci_high"],
        }
    g = gap_difference(y, proba_arm, proba_dup, views, vl[:2], n_boot)
    out |= {
        "view_gap_vs_dup": g["diff"],
        "view_gap_vs_dup_ci_low": g["ci_low"],
        "view_gap_vs_dup_ci_high": g["ci_high"],
    }
    return out


def validation_uplift(y_val, proba_arm, proba_base) -> float:
    """Mean over classifier seeds of validation AUC(arm, seed s) - AUC(base, seed s).

    ``proba_*``: ``(S, N, K)``; ``y_val``: ``(N,)`` or None (then NaN: no validation figures).
    The criterion configurations are chosen by; a point estimate, no test case involved. Both
    arms picked their epoch on this split, so the level is optimistic, the difference fair.
    """
    if y_val is None or proba_arm is None or proba_base is None:
        return float("nan")
    k = np.asarray(proba_arm).shape[2]
    return float(
        np.mean(
            [
                auc_score(y_val, a, k) - auc_score(y_val, b, k)
                for a, b in zip(proba_arm, proba_base, strict=True)
            ]
        )
    )


def config_rows(run: Path, plan, n_boot: int = 1000) -> tuple[list[dict], dict]:
    """One row per (fraction, configuration): uplift vs real-only and vs the duplicate control
    (paired bootstrap diff, CI, SE, p), the configuration's knobs and its diversity metrics.
    Also returns ``(fraction, config) -> (y_test, probas)`` for later paired comparisons."""
    from medsynth.experiment.sweep import baseline_dir

    rows, probas_of = [], {}
    for u in plan.units:
        y, probas, fid, (yv, vprobas), views = _load_unit(run / u.folder)
        yb, base, _, (yvb, vbase), _ = _load_unit(run / baseline_dir(u.fraction, u.class_mix))
        if not np.array_equal(y, yb):
            raise ValueError(f"{u.folder} and its baselines were tested on different cases")
        if yv is None or yvb is None or not np.array_equal(yv, yvb):
            yv = None  # no (comparable) validation figures: nothing can be chosen on them
        probas = base | probas  # the pool unit's own real-only (identical) pairs with its arms
        vprobas = vbase | vprobas
        for arm, pa in probas.items():
            if not arm.startswith("synthetic:"):
                continue
            _, _pool, rest = arm.split(":", 2)
            selector, ratio = rest.rsplit("@", 1)
            cid = f"{u.pool.name}|{selector}|x{ratio}|{u.class_mix}"
            row = {
                "fraction": u.fraction,
                "config": cid,
                "pool": u.pool.name,
                "guidance_scale": u.pool.guidance_scale,
                "sampler": u.pool.sampler,
                "steps": u.pool.steps,
                "ddim_eta": u.pool.ddim_eta,
                "guidance_rescale": u.pool.guidance_rescale,
                "guidance_interval": "-".join(f"{v:g}" for v in u.pool.guidance_interval),
                "class_guidance": " ".join(f"{c}:{v:g}" for c, v in u.pool.class_guidance),
                "autoguidance": "on" if u.pool.autoguidance else "off",
                "pool_size": u.pool.pool_size,
                "selector": selector,
                "ratio": float(ratio),
                "class_mix": u.class_mix,
                "seeds": len(pa),
                "n_test": len(y),
            }
            for base, key in (
                ("real_only", "auc_vs_real"),
                (f"duplicate_control@{ratio}", "auc_vs_dup"),
            ):
                row[f"val_{key}"] = validation_uplift(yv, vprobas.get(arm), vprobas.get(base))
                t = paired_bootstrap_test(y, pa, probas[base], "auc", n_boot)
                row.update(
                    {
                        key: t["diff"],
                        f"{key}_ci_low": t["ci_low"],
                        f"{key}_ci_high": t["ci_high"],
                        f"{key}_se": t["se"],
                        f"{key}_p": t["p"],
                    }
                )
            row.update(
                {m: fid.get(arm, {}).get("all", {}).get(m, np.nan) for m in DIVERSITY + FIDELITY}
            )
            # An average hides a collapsed class: name the flagged ones (evaluation.per_class).
            per = fid.get(arm, {})
            row["collapsed_classes"] = ";".join(
                c for c, m in per.items() if c != "all" and m.get("collapsed")
            )
            dup = probas[f"duplicate_control@{ratio}"]
            row.update(view_fields(y, views, pa, dup, probas["real_only"], n_boot=n_boot))
            rows.append(row)
            probas_of[(u.fraction, cid)] = (y, pa, dup)
    return rows, probas_of


def analyse_fraction(rows: list[dict], probas_of: dict, fraction: float, n_boot: int) -> dict:
    """Adjust p-values across this fraction's configurations, add MDE and verdicts, correlate
    diversity with uplift and compare the best configuration with the runner-up."""
    mine = [r for r in rows if r["fraction"] == fraction]
    m = len(mine)
    for key in ("auc_vs_real", "auc_vs_dup"):
        adjust_table(mine, key)
        for r in mine:
            r[f"{key}_mde"] = minimal_detectable_effect(r[f"{key}_se"], comparisons=m)
            r[f"{key}_verdict"] = verdict(
                r[key], r[f"{key}_ci_low"], r[f"{key}_ci_high"], r[f"{key}_p_holm"], r[f"{key}_mde"]
            )
    out = {
        "fraction": fraction,
        "configurations": m,
        "diversity_vs_uplift_dup": diversity_vs_uplift(
            mine, DIVERSITY, FIDELITY, "auc_vs_dup", n_boot
        ),
        "diversity_vs_uplift_real": diversity_vs_uplift(
            mine, DIVERSITY, FIDELITY, "auc_vs_real", n_boot
        ),
    }
    # Ranked on validation uplift over the control; configurations without it are not ranked.
    ranked = sorted(
        (r for r in mine if np.isfinite(r.get("val_auc_vs_dup", np.nan))),
        key=lambda r: -r["val_auc_vs_dup"],
    )
    if ranked:
        best = ranked[0]
        out["best"] = {
            k: best[k]
            for k in (
                "config",
                "val_auc_vs_dup",
                "auc_vs_dup",
                "auc_vs_dup_ci_low",
                "auc_vs_dup_ci_high",
                "auc_vs_dup_p_holm",
                "auc_vs_dup_mde",
            )
        }
    if len(ranked) >= 2:
        (y, pa, _), (_, pb, _) = (probas_of[(fraction, r["config"])] for r in ranked[:2])
        t = paired_bootstrap_test(y, pa, pb, "auc", n_boot)
        out["best_vs_runner_up"] = {
            "runner_up": ranked[1]["config"],
            **t,
            "mde": minimal_detectable_effect(t["se"]),
        }
    out["knob_effects"] = knob_effects(rows, probas_of, fraction, n_boot)
    out["recommendation"] = recommendation(out)
    return out


# The settings a configuration is made of (configs.csv columns; the sampler with its steps and
# eta as one). A knob's effect compares configurations that differ in that knob alone.
KNOBS = (
    "guidance_scale",
    "guidance_rescale",
    "guidance_interval",
    "class_guidance",
    "autoguidance",
    "sampler",
    "pool_size",
    "selector",
    "ratio",
    "class_mix",
)


def _knob_value(row: dict, knob: str) -> str:
    if knob == "sampler":
        eta = f" eta {row['ddim_eta']:g}" if row["sampler"] == "ddim" else ""
        return f"{row['sampler']}-{row['steps']}{eta}"
    v = row.get(knob, "")
    if knob == "class_guidance" and not v:
        return "none"
    return f"{v:g}" if isinstance(v, float) else str(v)


def knob_effects(rows: list[dict], probas_of: dict, fraction: float, n_boot: int) -> list[dict]:
    """Each swept setting's effect on the uplift over the duplicate control, against the knob's
    first value, the other settings held fixed.

    For a knob with values v0 (first in the sweep), v1, ...: every configuration with v_i is
    paired with the one that differs from it in that knob alone (v0); the effect is the test
    AUC uplift over the count-matched duplicate control of the first minus that of the second,
    averaged over the pairs and their classifier seeds. For the generation knobs and the
    selector both share one control, so this is the plain AUC difference; for the ratio and the
    class mix it removes what more (or differently mixed) images per epoch give a duplicate
    too. Paired bootstrap over seeds and test cases; Holm across every effect of the fraction,
    MDE at that many comparisons. This answers "which setting helps" with the other settings
    averaged over, at the power of all the pairs rather than of one configuration; an effect
    that reverses with another knob (an interaction) averages out here, so read the table of
    every configuration beside it.
    """
    mine = [r for r in rows if r["fraction"] == fraction]
    out = []
    for knob in KNOBS:
        values = list(dict.fromkeys(_knob_value(r, knob) for r in mine))
        others = [k for k in KNOBS if k != knob]

        def rest(r: dict, others=others) -> tuple:
            return tuple(_knob_value(r, k) for k in others)

        base = {rest(r): r for r in mine if _knob_value(r, knob) == values[0]}
        for v in values[1:]:
            pairs = [
                (r, base[rest(r)]) for r in mine if _knob_value(r, knob) == v and rest(r) in base
            ]
            if pairs:
                t = _uplift_contrast(pairs, probas_of, fraction, n_boot)
                out.append(
                    {"knob": knob, "value": v, "reference": values[0], "pairs": len(pairs), **t}
                )
    for e, p in zip(out, holm([e["p"] for e in out]), strict=True):
        e["p_holm"] = float(p)
        e["mde"] = minimal_detectable_effect(e["se"], comparisons=len(out))
        e["verdict"] = verdict(e["diff"], e["ci_low"], e["ci_high"], e["p_holm"], e["mde"])
    return out


def _uplift_contrast(pairs: list[tuple[dict, dict]], probas_of: dict, fraction: float, n_boot: int):
    """Mean over ``(row, reference row)`` pairs of row's uplift over its duplicate control minus
    the reference's, as one contrast of arms' AUCs (``contrast_test``)."""
    weights: dict[tuple, float] = {}
    arrays: dict[tuple, np.ndarray] = {}

    def add(row: dict, sign: float) -> None:
        y, arm, dup = probas_of[(fraction, row["config"])]
        # Keyed, so a control both sides share cancels instead of being computed twice.
        for key, w, a in (
            (("arm", row["config"]), sign, arm),
            (("dup", row["class_mix"], row["ratio"]), -sign, dup),
        ):
            weights[key] = weights.get(key, 0.0) + w / len(pairs)
            arrays[key] = a

    for row, reference in pairs:
        add(row, 1.0)
        add(reference, -1.0)
    y = probas_of[(fraction, pairs[0][0]["config"])][0]
    terms = [(weights[k], arrays[k]) for k in arrays if abs(weights[k]) > 1e-12]
    return contrast_test(y, terms, "auc", n_boot)


def knob_effect_lines(fr: dict, indent: str = "  ") -> list[str]:
    """One line per knob effect of an analysed fraction (summary text, ``medsynth show``)."""
    return [
        f"{indent}{e['knob']} {e['value']} vs {e['reference']} ({e['pairs']} pairs): {e['verdict']}"
        for e in fr.get("knob_effects", [])
    ]


def recommendation(fr: dict) -> str:
    """A short, honest sentence: which setting helped most and whether it is distinguishable."""
    if "best" not in fr:
        return (
            "No synthetic configuration has validation figures to be chosen on (evaluated "
            "before they were saved, or none evaluated): no recommendation."
        )
    b = fr["best"]
    head = (
        f"At train fraction {fr['fraction']:g}, the largest validation uplift over the "
        f"count-matched duplicate control came from {b['config']} "
        f"({b['val_auc_vs_dup']:+.3f} validation AUC); on test it is {b['auc_vs_dup']:+.3f} AUC "
        f"(95 % CI "
        f"[{b['auc_vs_dup_ci_low']:+.3f}, {b['auc_vs_dup_ci_high']:+.3f}], Holm-adjusted "
        f"p={b['auc_vs_dup_p_holm']:.3g} over {fr['configurations']} configurations)"
    )
    if not b["auc_vs_dup_p_holm"] < 0.05:
        head += (
            f"; that is not distinguishable from the control after adjustment (this design "
            f"detects effects of about {b['auc_vs_dup_mde']:.3f} AUC or more)"
        )
    vs = fr.get("best_vs_runner_up")
    if vs:
        same = not vs["p"] < 0.05
        head += (
            f". Against the runner-up {vs['runner_up']} it is {vs['diff']:+.3f} "
            f"[{vs['ci_low']:+.3f}, {vs['ci_high']:+.3f}] (p={vs['p']:.3g}): "
            + ("not distinguishable" if same else "distinguishable")
        )
    return (
        head + ". Configurations were ranked on the validation split; the test figures only "
        "report the choice."
    )


def low_data_curve(rows: list[dict]) -> dict:
    """Test uplift against train fraction for the best and the worst configuration, chosen by
    mean VALIDATION uplift over the duplicate control across fractions (``val_auc_vs_dup``;
    configurations present, with validation figures, at every fraction only). Without
    validation figures no line is chosen: test figures never pick what they then report."""
    fractions = sorted({r["fraction"] for r in rows})
    by = {}
    for r in rows:
        if np.isfinite(r.get("val_auc_vs_dup", np.nan)):
            by.setdefault(r["config"], {})[r["fraction"]] = r
    full = {c: v for c, v in by.items() if len(v) == len(fractions)}
    if not full:
        return {"fractions": fractions, "lines": {}, "selected_on": "validation"}
    mean = {c: float(np.mean([v[f]["val_auc_vs_dup"] for f in fractions])) for c, v in full.items()}
    picks = {"best": max(mean, key=mean.get), "worst": min(mean, key=mean.get)}
    keys = (
        "auc_vs_real",
        "auc_vs_real_ci_low",
        "auc_vs_real_ci_high",
        "auc_vs_dup",
        "auc_vs_dup_ci_low",
        "auc_vs_dup_ci_high",
        "auc_vs_dup_mde",
    )
    lines = {
        tag: {
            "config": c,
            "mean_val_auc_vs_dup": mean[c],
            "points": [{"fraction": f, **{k: full[c][f][k] for k in keys}} for f in fractions],
        }
        for tag, c in picks.items()
    }
    return {"fractions": fractions, "lines": lines, "selected_on": "validation"}


def analyse_sweep(run: str | Path, plan, n_boot: int = 1000) -> dict:
    """All of the above; writes ``RUN/sweep/configs.csv`` and ``RUN/sweep/stats.json``."""
    run = Path(run)
    rows, probas_of = config_rows(run, plan, n_boot)
    fractions = {f"{f:g}": analyse_fraction(rows, probas_of, f, n_boot) for f in plan.fractions}
    for f in plan.fractions:
        fractions[f"{f:g}"]["warnings"] = baseline_warnings(run, plan, f)
    stats = {
        "fractions": fractions,
        "low_data_curve": low_data_curve(rows),
        "note": "uplift = test AUC difference (paired bootstrap over seeds and test cases); "
        "p-values adjusted per train fraction across its configurations; MDE at "
        "80 % power and alpha 0.05 / configurations; best configuration and curve lines "
        "chosen on validation AUC uplift over the duplicate control (val_auc_vs_dup); "
        "knob_effects: each swept setting's effect on that uplift over the duplicate control, "
        "against its knob's first value, averaged over the configuration pairs that differ in "
        "that knob alone, Holm across the fraction's effects",
    }
    out = run / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(c for r in rows for c in r))
    with (out / "configs.csv").open("w", newline="") as fh:
        write_rows(fh, cols, rows)
    (out / "stats.json").write_text(json.dumps(stats, indent=2, default=float))
    return {"rows": rows, **stats}


def baseline_warnings(run: Path, plan, fraction: float) -> list[str]:
    """Classifier-health warnings (evaluation.health) of this fraction's baseline studies."""
    from medsynth.experiment.sweep import baseline_dir

    out = []
    for mix in dict.fromkeys(u.class_mix for u in plan.units if u.fraction == fraction):
        path = run / baseline_dir(fraction, mix) / "summary.json"
        if path.exists():
            out += json.loads(path.read_text()).get("warnings", [])
    return list(dict.fromkeys(out))


def summary_text(result: dict) -> str:
    """Plain-text result of ``analyse_sweep``: per fraction the recommendation and each
    configuration's uplift over the duplicate control with its verdict (MDE beside no effect)."""
    lines = []
    for key, fr in result["fractions"].items():
        lines.append(f"train fraction {key}: {fr['configurations']} configurations")
        mine = sorted(
            (r for r in result["rows"] if f"{r['fraction']:g}" == key),
            key=lambda r: -r["auc_vs_dup"],
        )
        for r in mine:
            lines.append(
                f"  {r['config']:<48} vs real {r['auc_vs_real']:+.3f}  vs control "
                f"{r['auc_vs_dup_verdict']}"
            )
        lines.append("  " + fr["recommendation"])
        lines += knob_effect_lines(fr)
        lines += [f"  WARNING: {w}" for w in fr.get("warnings", [])]
    return "\n".join(lines)
