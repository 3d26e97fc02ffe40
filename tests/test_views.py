"""Within-view metrics (the AP/PA shortcut) and view-stratified splits, against planted cases."""

import numpy as np
import pytest

from medsynth.data.index import IngestError, assign_splits
from medsynth.evaluation.study import within_view_report
from medsynth.evaluation.views import (
    gap_difference,
    usable_views,
    view_aucs,
    within_view_uplift,
)


def _shortcut_data(n=400, seed=0):
    """Labels tied to the view as in RSNA: 60 % of AP cases positive, 10 % of PA cases."""
    rng = np.random.default_rng(seed)
    views = np.where(rng.random(n) < 0.5, "AP", "PA")
    y = (rng.random(n) < np.where(views == "AP", 0.6, 0.1)).astype(int)
    return y, views, rng


def _probas(score):
    p1 = 1 / (1 + np.exp(-score))
    return np.stack([1 - p1, p1], -1)


def test_a_view_shortcut_scores_overall_but_not_within_a_view():
    from medsynth.evaluation.stats import auc_score

    y, views, rng = _shortcut_data()
    seeds = 4
    shortcut = np.stack([_probas(2.0 * (views == "AP") + rng.normal(0, 0.3, len(y)))] * seeds)
    disease = np.stack([_probas(2.0 * y + rng.normal(0, 1, len(y))) for _ in range(seeds)])
    assert auc_score(y, shortcut[0], 2) > 0.75  # the shortcut looks good overall
    vl = usable_views(y, views)
    assert vl == ["AP", "PA"]
    sc, dz = view_aucs(y, shortcut, views, vl), view_aucs(y, disease, views, vl)
    for v in vl:
        assert abs(sc["views"][v]["auc_mean"] - 0.5) < 0.1  # no signal within a view
        assert dz["views"][v]["auc_mean"] > 0.8
    assert sc["views"]["AP"]["n"] + sc["views"]["PA"]["n"] == len(y)
    # A classifier that works on AP only shows a large AP - PA gap; the disease one does not.
    ap_only = np.stack(
        [_probas(np.where(views == "AP", 3.0 * y, 0) + rng.normal(0, 1, len(y)))] * seeds
    )
    assert view_aucs(y, ap_only, views, vl)["gap"]["mean"] > 0.3
    assert abs(dz["gap"]["mean"]) < 0.1 and dz["gap"]["views"] == "AP - PA"


def test_within_view_uplift_finds_a_planted_effect_and_not_a_null():
    y, views, rng = _shortcut_data(600, seed=1)
    base = np.stack([_probas(1.0 * y + rng.normal(0, 1, len(y))) for _ in range(5)])
    same = np.stack([_probas(1.0 * y + rng.normal(0, 1, len(y))) for _ in range(5)])
    # Better within PA only (the view the shortcut cannot help).
    better = np.stack(
        [
            _probas(np.where(views == "PA", 3.0, 1.0) * y + rng.normal(0, 1, len(y)))
            for _ in range(5)
        ]
    )
    hit = within_view_uplift(y, better, base, views, "PA", n_boot=300)
    miss = within_view_uplift(y, better, base, views, "AP", n_boot=300)
    null = within_view_uplift(y, same, base, views, "PA", n_boot=300)
    assert hit["diff"] > 0.1 and hit["ci_low"] > 0
    assert miss["ci_low"] < 0 < miss["ci_high"] and null["ci_low"] < 0 < null["ci_high"]
    assert hit["n"] == (views == "PA").sum()


def test_gap_change_finds_a_planted_narrowing_and_not_a_null():
    y, views, rng = _shortcut_data(600, seed=5)

    def arm(pa_signal):
        # AP is read well (signal 3); PA as well as pa_signal allows: the AP - PA gap.
        return np.stack(
            [
                _probas(np.where(views == "AP", 3.0, pa_signal) * y + rng.normal(0, 1, len(y)))
                for _ in range(5)
            ]
        )

    control, same, narrower = arm(0.5), arm(0.5), arm(3.0)
    assert view_aucs(y, control, views, ["AP", "PA"])["gap"]["mean"] > 0.2
    hit = gap_difference(y, narrower, control, views, ("AP", "PA"), n_boot=300)
    null = gap_difference(y, same, control, views, ("AP", "PA"), n_boot=300)
    assert hit["diff"] < -0.15 and hit["ci_high"] < 0  # the arm narrows the gap
    assert null["ci_low"] < 0 < null["ci_high"]
    # Reversing the pair flips the sign, not the size.
    flip = gap_difference(y, narrower, control, views, ("PA", "AP"), n_boot=0)
    assert flip["diff"] == pytest.approx(-hit["diff"]) and np.isnan(flip["ci_low"])


def test_edit_arms_are_compared_with_their_own_control_within_views():
    y, views, rng = _shortcut_data(300, seed=6)

    def arm():
        return [_probas(1.5 * y + rng.normal(0, 1, len(y))) for _ in range(3)]

    cf, own = "counterfactual@0.5:vary@1", "duplicate_control:counterfactual@0.5:vary@1"
    probas = {"real_only": arm(), "duplicate_control@1": arm(), cf: arm(), own: arm()}
    rep = within_view_report(y, probas, views, 100, dup_of={cf: own})
    want = gap_difference(y, np.stack(probas[cf]), np.stack(probas[own]), views, ("AP", "PA"), 100)
    assert rep["arms"][cf]["gap"]["vs_dup"] == want
    assert "auc_vs_dup" in rep["arms"][cf]["views"]["AP"]
    assert "vs_dup" not in rep["arms"]["duplicate_control@1"]["gap"]


def test_views_without_both_classes_or_a_second_view_are_not_compared():
    y = np.array([0, 1, 0, 1, 0, 0, 0])
    assert usable_views(y, np.array(["AP"] * 4 + ["PA"] * 3)) == []  # PA has no positive
    assert usable_views(y, np.array(["PA"] * 7)) == []
    assert usable_views(y, np.array([""] * 7)) == []  # unknown is never a view
    probas = {"real_only": [np.tile([0.5, 0.5], (7, 1))]}
    assert within_view_report(y, probas, np.array(["PA"] * 7), 100) == {}


def test_within_view_report_pairs_synthetic_arms_with_real_and_their_control():
    y, views, rng = _shortcut_data(300, seed=2)

    def arm():
        return [_probas(1.5 * y + rng.normal(0, 1, len(y))) for _ in range(3)]

    probas = {"real_only": arm(), "duplicate_control@1": arm(), "synthetic:p:random@1": arm()}
    rep = within_view_report(y, probas, views, 200)
    assert rep["attribute"] == "ViewPosition" and rep["views"] == ["AP", "PA"]
    syn = rep["arms"]["synthetic:p:random@1"]
    assert {"auc_vs_real", "auc_vs_dup"} <= set(syn["views"]["PA"])
    assert {"vs_real", "vs_dup"} <= set(syn["gap"])
    assert "auc_vs_dup" not in rep["arms"]["duplicate_control@1"]["views"]["AP"]
    assert "auc_vs_real" not in rep["arms"]["real_only"]["views"]["AP"]


def _rows(n_patients=200, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        view = "AP" if rng.random() < 0.4 else "PA"
        label = int(rng.random() < (0.7 if view == "AP" else 0.15))
        rows.append(
            {"path": f"{p}.dcm", "PatientID": f"P{p}", "label_index": label, "ViewPosition": view}
        )
    return rows


def _cells(rows, split):
    return {
        (lab, v): sum(
            r["split"] == split and r["label_index"] == lab and r["ViewPosition"] == v for r in rows
        )
        for lab in (0, 1)
        for v in ("AP", "PA")
    }


def test_view_stratified_split_keeps_every_label_view_cell_in_proportion():
    rows = _rows()
    fr = {"train": 0.5, "val": 0.2, "test": 0.3}
    assign_splits(rows, fractions=fr, seed=3, stratify=["ViewPosition"])
    total = {c: sum(_cells(rows, s)[c] for s in fr) for c in _cells(rows, "train")}
    for s, f in fr.items():
        for cell, n in _cells(rows, s).items():
            assert abs(n - f * total[cell]) <= 1, (s, cell, n, total[cell])
    # Without stratify the split is the label-stratified one it always was.
    a, b = _rows(), _rows()
    assign_splits(a, fractions=fr, seed=3)
    assign_splits(b, fractions=fr, seed=3, stratify=[])
    assert [r["split"] for r in a] == [r["split"] for r in b]


def test_view_stratify_errors_name_the_problem():
    with pytest.raises(IngestError, match=r"split_stratify names \['Laterality'\].*ViewPosition"):
        assign_splits(_rows(10), stratify=["Laterality"])
    rows = [dict(r, table_split="train") for r in _rows(10)]
    with pytest.raises(IngestError, match="applies to computed splits"):
        assign_splits(rows, stratify=["ViewPosition"])


def test_sweep_rows_and_reports_carry_the_within_view_figures(tmp_path):
    import json

    from medsynth.experiment.report import _views_section
    from medsynth.experiment.sweep_analysis import view_fields
    from medsynth.experiment.sweep_report import _views_table

    y, views, rng = _shortcut_data(300, seed=4)

    def arm(signal_pa):
        return np.stack(
            [
                _probas(np.where(views == "PA", signal_pa, 1.0) * y + rng.normal(0, 1, len(y)))
                for _ in range(3)
            ]
        )

    real, dup, syn = arm(1.0), arm(1.0), arm(3.0)
    f = view_fields(y, views, syn, dup, real, n_boot=200)
    assert f["auc_PA"] > f["real_auc_PA"] and f["view_gap"] < 0 < f["auc_PA_vs_dup_ci_low"]
    assert f["auc_AP_vs_dup_ci_low"] < 0 < f["auc_AP_vs_dup_ci_high"]
    assert view_fields(y, np.array([""] * len(y)), syn, dup, real) == {}
    page = "".join(_views_table([dict(f, config="g1|random|x1|proportional")]))
    assert "AUC PA" in page and "gap AP − PA" in page and "vs control in PA" in page
    assert f["view_gap_vs_dup"] < 0 and "gap change vs control" in page
    # The single-study report reads evaluate/views.json.
    probas = {"real_only": list(real), "duplicate_control@1": list(dup)}
    probas["synthetic:p:random@1"] = list(syn)
    (tmp_path / "views.json").write_text(json.dumps(within_view_report(y, probas, views, 100)))
    html = "".join(_views_section(tmp_path))
    assert "Within ViewPosition" in html and "AUC AP" in html and "ΔAUC vs control in PA" in html
    assert "gap change vs control" in html
    assert _views_section(tmp_path / "absent") == []


def test_config_rows_read_views_and_validation_from_the_unit_files(tmp_path):
    import json

    from medsynth.experiment.sweep import PoolSpec, SweepPlan, Unit, baseline_dir
    from medsynth.experiment.sweep_analysis import config_rows

    y, views, rng = _shortcut_data(200, seed=5)
    yv = rng.integers(0, 2, 80)

    def arm(n_seeds=3, signal=1.0):
        t = np.stack([_probas(signal * y + rng.normal(0, 1, len(y))) for _ in range(n_seeds)])
        v = np.stack([_probas(signal * yv + rng.normal(0, 1, len(yv))) for _ in range(n_seeds)])
        return t, v

    def write(folder, arms):
        folder.mkdir(parents=True)
        names = list(arms)
        np.savez(
            folder / "probas.npz",
            y_test=y,
            y_val=yv,
            test_views=views,
            arms=np.array(names),
            **{f"arm_{i}": arms[a][0] for i, a in enumerate(names)},
            **{f"val_arm_{i}": arms[a][1] for i, a in enumerate(names)},
        )
        (folder / "fidelity.json").write_text(json.dumps({}))

    pool = PoolSpec(1.0, "ddim", 10, 0.0, 2.0)
    unit = Unit(0.5, "proportional", pool, ("random",))
    plan = SweepPlan([0.5], [pool], ["proportional"], ["random"], [1.0])
    real = arm()
    write(
        tmp_path / baseline_dir(0.5, "proportional"),
        {"real_only": real, "duplicate_control@1": arm()},
    )
    write(
        tmp_path / unit.folder,
        {"real_only": real, f"synthetic:{pool.name}:random@1": arm(signal=3.0)},
    )
    rows, _ = config_rows(tmp_path, plan, n_boot=100)
    (row,) = rows
    assert row["val_auc_vs_dup"] > 0.1 and row["auc_vs_dup"] > 0.1
    assert {"auc_AP", "auc_PA", "view_gap", "auc_PA_vs_dup_ci_low", "real_auc_AP"} <= set(row)


def test_split_stratify_default_keeps_older_hashes():
    from medsynth.protocol import parse_protocol
    from medsynth.runfolder import stage_inputs

    plain = parse_protocol("dataset: {kind: phantoms}\n")
    assert "split_stratify" not in plain.dump()["dataset"]
    strat = parse_protocol("dataset: {kind: phantoms, split_stratify: [ViewPosition]}\n")
    assert strat.sha256() != plain.sha256()
    assert stage_inputs(strat)["ingest"] != stage_inputs(plain)["ingest"]
