"""The sweep report: ``RUN/report/index.html`` (self-contained) from ``RUN/sweep/`` files only.

Sections: the recommendation per train fraction, the adjusted table (uplift vs real-only and vs
the duplicate control, Holm and BH p-values, MDE beside every "no effect"), diversity against
uplift with CI bars and (partial) Spearman rho, and the low-data curve.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from medsynth import __version__
from medsynth.experiment.report import CSS, _fmt, _png, _table, _warning_cards, plt
from medsynth.experiment.sweep_analysis import DIVERSITY
from medsynth.utils.csvsafe import read_rows


def _scatter(rows: list[dict], div: dict, path: Path) -> str:
    fig, axes = plt.subplots(1, len(DIVERSITY), figsize=(3.2 * len(DIVERSITY), 3.1), squeeze=False)
    y = np.array([r["auc_vs_dup"] for r in rows])
    err = np.array(
        [
            [r["auc_vs_dup"] - r["auc_vs_dup_ci_low"] for r in rows],
            [r["auc_vs_dup_ci_high"] - r["auc_vs_dup"] for r in rows],
        ]
    )
    for ax, m in zip(axes[0], DIVERSITY, strict=True):
        x = np.array([r.get(m, np.nan) for r in rows], float)
        ax.errorbar(x, y, yerr=np.abs(err), fmt="o", ms=4, capsize=2, alpha=0.8)
        ax.axhline(0, color="grey", lw=0.8)
        s = div.get(m, {}).get("spearman", {})
        pt = div.get(m, {}).get("partial", {})
        ax.set_title(
            f"{m}\nρ={_fmt(s.get('rho'), 2)} [{_fmt(s.get('ci_low'), 2)}, "
            f"{_fmt(s.get('ci_high'), 2)}]; partial {_fmt(pt.get('rho'), 2)}",
            fontsize=8,
        )
        ax.set_xlabel(m, fontsize=8)
    axes[0][0].set_ylabel("AUC uplift vs duplicate control")
    fig.tight_layout()
    return _png(fig, path)


def _curve(curve: dict, path: Path) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, title in (
        (axes[0], "auc_vs_real", "vs real-only"),
        (axes[1], "auc_vs_dup", "vs duplicate control"),
    ):
        for tag, line in curve["lines"].items():
            pts = line["points"]
            f = [p["fraction"] * 100 for p in pts]
            d = np.array([p[key] for p in pts])
            lo, hi = (
                np.array([p[key + "_ci_low"] for p in pts]),
                np.array([p[key + "_ci_high"] for p in pts]),
            )
            ax.errorbar(
                f,
                d,
                yerr=np.abs([d - lo, hi - d]),
                marker="o",
                capsize=3,
                label=f"{tag}: {line['config']}",
            )
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        # Ticks at the measured fractions only: a log axis's default 2x10^0, 3x10^0, ... minor
        # labels overlap when the curve spans less than a decade.
        percents = [f * 100 for f in curve["fractions"]]
        ax.set_xticks(percents, [f"{p:g} %" for p in percents])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("real training data (% of train split)")
        ax.set_ylabel("AUC uplift")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _png(fig, path)


def write_sweep_report(run: str | Path, protocol) -> Path:
    """Write the self-contained HTML sweep report; returns its path."""
    run = Path(run)
    out = run / "report"
    out.mkdir(exist_ok=True)
    stats = json.loads((run / "sweep" / "stats.json").read_text())
    rows = [{k: _num(v) for k, v in r.items()} for r in read_rows(run / "sweep" / "configs.csv")]
    parts = [
        f"<h1>Sweep report: {html.escape(protocol.name)}</h1>",
        f"<p class='muted'>medsynth {__version__}. {html.escape(protocol.description)} "
        "Research use only. Not for clinical use.</p>",
        f"<p class='muted'>{html.escape(stats['note'])}</p>",
        "<h2>Recommendation</h2>",
    ]
    for fr in stats["fractions"].values():
        parts.append(f"<div class='card'>{html.escape(fr['recommendation'])}</div>")
        title = f"Check the classifier (train fraction {fr['fraction']:g})."
        parts += _warning_cards(fr.get("warnings", []), title)
    for key, fr in stats["fractions"].items():
        mine = sorted(
            (r for r in rows if f"{r['fraction']:g}" == key), key=lambda r: -r["auc_vs_dup"]
        )
        parts.append(f"<h2>Train fraction {key}: {len(mine)} configurations</h2>")
        parts += _knob_table(fr.get("knob_effects", []))
        parts.append("<h3>Every configuration</h3>")
        table = [
            [
                html.escape(r["config"]),
                _diff(r, "auc_vs_real"),
                _fmt(r["auc_vs_real_p_holm"]),
                _diff(r, "auc_vs_dup"),
                _fmt(r["auc_vs_dup_p_holm"]),
                _fmt(r["auc_vs_dup_p_bh"]),
                html.escape(r["auc_vs_dup_verdict"]),
                _collapsed(r),
            ]
            for r in mine
        ]
        parts.append(
            _table(
                table,
                [
                    "configuration",
                    "vs real-only (95 % CI)",
                    "Holm p",
                    "vs duplicate control (95 % CI)",
                    "Holm p",
                    "BH p",
                    "verdict vs control",
                    "collapsed classes",
                ],
            )
        )
        parts += _views_table(mine)
        if len(mine) >= 3:
            parts.append("<h3>Diversity against uplift</h3>")
            parts.append(
                _scatter(mine, fr["diversity_vs_uplift_dup"], out / f"sweep_scatter_{key}.png")
            )
            corr = [
                [m, _rho(d["spearman"]), _rho(d["partial"]), ", ".join(d["held_fixed"])]
                for m, d in fr["diversity_vs_uplift_dup"].items()
            ]
            parts.append(
                _table(
                    corr, ["metric", "Spearman ρ [95 % CI]", "partial ρ [95 % CI]", "held fixed"]
                )
            )
    curve = stats["low_data_curve"]
    if len(curve["fractions"]) >= 2 and curve["lines"]:
        parts.append("<h2>Low-data curve</h2>")
        parts.append(
            "<p class='muted'>Best and worst configuration by mean <em>validation</em> uplift "
            "over the duplicate control across fractions; the points are test uplift.</p>"
        )
        parts.append(_curve(curve, out / "sweep_low_data_curve.png"))
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(protocol.name)}"
        f"</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>"
    )
    (out / "index.html").write_text(page)
    return out / "index.html"


def _knob_table(effects: list[dict]) -> list[str]:
    """Which settings help: each knob value against the knob's first value (test AUC)."""
    if not effects:
        return []
    rows = [
        [
            html.escape(f"{e['knob']}: {e['value']} vs {e['reference']}"),
            str(e["pairs"]),
            f"{e['diff']:+.3f} [{e['ci_low']:+.3f}, {e['ci_high']:+.3f}]",
            _fmt(e["p_holm"]),
            html.escape(e["verdict"]),
        ]
        for e in effects
    ]
    return [
        "<h3>Which settings help</h3>",
        "<p class='muted'>Each setting against its knob's first value: the test-AUC uplift over "
        "the duplicate control with it minus without it, averaged over the configuration pairs "
        "that differ in that knob alone (so the other settings are averaged over); Holm across "
        "these effects. Descriptive: the recommendation is chosen on validation.</p>",
        _table(rows, ["setting", "pairs", "effect on uplift (95 % CI)", "Holm p", "verdict"]),
    ]


def _collapsed(r: dict) -> str:
    """Classes flagged collapsed in this configuration (per-class FD_clf / MS-SSIM), in red."""
    names = r.get("collapsed_classes")
    if names in (None, ""):
        return "—"
    return f"<span class='neg'>{html.escape(str(names).replace(';', ', '))}</span>"


def _views_table(mine: list[dict]) -> list[str]:
    """Within-view AUC, the view gap and uplift over the control within each view, if present."""
    if not mine or "view_gap" not in mine[0]:
        return []
    vl = [
        k[4:-7]
        for k in mine[0]
        if k.startswith("auc_") and k.endswith("_vs_dup") and k != "auc_vs_dup"
    ]
    r0 = mine[0]
    rows = [
        [html.escape(r["config"])]
        + [_fmt(r[f"auc_{v}"]) for v in vl]
        + [_fmt(r["view_gap"])]
        + [_diff(r, "view_gap_vs_dup") if "view_gap_vs_dup" in r else "—"]
        + [_diff(r, f"auc_{v}_vs_dup") for v in vl]
        for r in mine
    ]
    real = ", ".join(f"{v} {_fmt(r0[f'real_auc_{v}'])}" for v in vl)
    return [
        "<h3>Within each view (shortcut control)</h3>",
        f"<p class='muted'>AUC among the test cases of one view only; real-only: {real}, gap "
        f"{_fmt(r0['real_view_gap'])}. A view shortcut cannot raise these.</p>",
        _table(
            rows,
            ["configuration"]
            + [f"AUC {v}" for v in vl]
            + [f"gap {vl[0]} − {vl[1]}", "gap change vs control (95 % CI)"]
            + [f"vs control in {v} (95 % CI)" for v in vl],
        ),
    ]


def _num(v: str):
    try:
        return float(v)
    except ValueError:
        return v


def _diff(r: dict, key: str) -> str:
    lo, hi = r[key + "_ci_low"], r[key + "_ci_high"]
    cls = "pos" if lo > 0 else "neg" if hi < 0 else ""
    return f"<span class='{cls}'>{r[key]:+.3f} [{lo:+.3f}, {hi:+.3f}]</span>"


def _rho(d: dict) -> str:
    return f"{_fmt(d.get('rho'), 2)} [{_fmt(d.get('ci_low'), 2)}, {_fmt(d.get('ci_high'), 2)}]"
