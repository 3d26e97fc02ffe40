"""Sweep statistics against known cases: Holm/BH references, planted effects, partial rho, MDE."""

import numpy as np
import pytest

from medsynth.evaluation.sweep_stats import (
    benjamini_hochberg,
    diversity_vs_uplift,
    holm,
    minimal_detectable_effect,
    paired_bootstrap_test,
    partial_spearman,
)


def test_holm_matches_a_hand_computed_reference():
    # p sorted: 0.01, 0.02, 0.03, 0.04 (m = 4) -> 4*0.01=0.04, 3*0.02=0.06, 2*0.03=0.06,
    # 1*0.04=0.04 -> running max 0.04, 0.06, 0.06, 0.06; given back in the input order.
    p = np.array([0.03, 0.01, 0.04, 0.02])
    assert np.allclose(holm(p), [0.06, 0.04, 0.06, 0.06])
    assert np.allclose(holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1
    out = holm([0.01, np.nan, 0.02])  # NaN kept out of the family (m = 2)
    assert np.isnan(out[1]) and np.allclose(out[[0, 2]], [0.02, 0.02])


def test_bh_matches_a_hand_computed_reference():
    # sorted 0.01, 0.02, 0.03, 0.2 (m = 4): 0.04, 0.04, 0.04, 0.2 after the running minimum.
    p = np.array([0.2, 0.01, 0.03, 0.02])
    assert np.allclose(benjamini_hochberg(p), [0.2, 0.04, 0.04, 0.04])


def _probas(y, signal, seeds, rng):
    """(seeds, N, 2) probabilities whose score separates the classes by ``signal``."""
    out = []
    for _ in range(seeds):
        score = y * signal + rng.normal(0, 1, len(y))
        p1 = 1 / (1 + np.exp(-score))
        out.append(np.stack([1 - p1, p1], 1))
    return np.stack(out)


def test_a_planted_effect_is_found_and_a_null_is_not():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 200)
    base = _probas(y, 1.0, 5, rng)
    better = _probas(y, 2.0, 5, rng)  # AUC ~0.76 -> ~0.92
    same = _probas(y, 1.0, 5, rng)
    hit = paired_bootstrap_test(y, better, base, n_boot=1000)  # p floor 1/1001
    null = paired_bootstrap_test(y, same, base, n_boot=300)
    assert hit["diff"] > 0.1 and hit["ci_low"] > 0 and hit["p"] < 0.01
    assert null["ci_low"] < 0 < null["ci_high"] and null["p"] > 0.05
    # Twenty null configurations and one real one: after Holm only the real one survives.
    ps = [
        paired_bootstrap_test(y, _probas(y, 1.0, 3, rng), base[:3], n_boot=200, seed=i)["p"]
        for i in range(20)
    ] + [hit["p"]]
    assert np.flatnonzero(holm(ps) < 0.05).tolist() == [20]
    # The MDE is a multiple of the SE; with Bonferroni over more comparisons it grows.
    mde = minimal_detectable_effect(null["se"])
    assert mde == pytest.approx(2.8016 * null["se"], rel=1e-3)
    assert minimal_detectable_effect(null["se"], comparisons=20) > mde


def test_partial_spearman_separates_diversity_from_fidelity():
    rng = np.random.default_rng(1)
    fidelity = rng.normal(size=60)
    diversity = fidelity + 0.3 * rng.normal(size=60)  # moves with fidelity (guidance)
    uplift = fidelity + 0.3 * rng.normal(size=60)  # driven by fidelity only
    rows = [
        {"vendi_clf": d, "FD_clf": -f, "precision_clf": f, "auc_vs_dup": u}
        for d, f, u in zip(diversity, fidelity, uplift, strict=True)
    ]
    res = diversity_vs_uplift(rows, ("vendi_clf",), n_boot=300)["vendi_clf"]
    assert res["spearman"]["rho"] > 0.7  # raw rho is confounded
    assert (
        abs(res["partial"]["rho"]) < 0.3
        and res["partial"]["ci_low"] < 0 < res["partial"]["ci_high"]
    )
    # Where diversity itself drives uplift, holding fidelity fixed keeps the correlation.
    direct = [dict(r, auc_vs_dup=r["vendi_clf"] - r["precision_clf"]) for r in rows]
    assert (
        diversity_vs_uplift(direct, ("vendi_clf",), n_boot=100)["vendi_clf"]["partial"]["rho"] > 0.5
    )
    assert partial_spearman(diversity, uplift, np.zeros((60, 1))) == pytest.approx(
        np.corrcoef(np.argsort(np.argsort(diversity)), np.argsort(np.argsort(uplift)))[0, 1]
    )


def test_verdict_names_the_adjustment_and_the_mde():
    from medsynth.evaluation.sweep_stats import verdict

    assert verdict(0.05, 0.02, 0.08, 0.01, 0.03).startswith("helps (+0.050")
    assert verdict(-0.05, -0.08, -0.02, 0.01, 0.03).startswith("hurts")
    assert "not significant after adjustment" in verdict(0.05, 0.01, 0.09, 0.2, 0.04)
    assert (
        verdict(0.0, -0.03, 0.03, 1.0, 0.042)
        == "no effect detected (MDE 0.042; CI [-0.030, +0.030])"
    )


def _curve_row(config, fraction, test_dup, val_dup):
    keys = ("auc_vs_real", "auc_vs_dup")
    row = {"config": config, "fraction": fraction, "val_auc_vs_dup": val_dup}
    for k in keys:
        d = test_dup if k == "auc_vs_dup" else test_dup + 0.01
        row |= {k: d, f"{k}_ci_low": d - 0.02, f"{k}_ci_high": d + 0.02}
    return row | {"auc_vs_dup_mde": 0.03}


def test_low_data_curve_picks_best_and_worst_on_validation_not_test():
    from medsynth.experiment.sweep_analysis import low_data_curve

    # "a" looks best on test but worst on validation; "c" the reverse. Test must not choose.
    rows = [
        _curve_row(c, f, test, val)
        for f in (0.1, 1.0)
        for c, test, val in (("a", 0.05, -0.04), ("b", 0.0, 0.0), ("c", -0.05, 0.04))
    ]
    curve = low_data_curve(rows)
    assert curve["lines"]["best"]["config"] == "c"
    assert curve["lines"]["worst"]["config"] == "a"
    assert curve["selected_on"] == "validation"
    # Without validation figures nothing is chosen (never silently fall back to test).
    blind = [{k: v for k, v in r.items() if k != "val_auc_vs_dup"} for r in rows]
    assert low_data_curve(blind)["lines"] == {}


def test_validation_uplift_is_the_mean_paired_seed_difference():
    from medsynth.experiment.sweep_analysis import validation_uplift

    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], 100)
    base = _probas(y, 1.0, 5, rng)
    better = _probas(y, 2.5, 5, rng)
    assert validation_uplift(y, better, base) > 0.1
    assert abs(validation_uplift(y, _probas(y, 1.0, 5, rng), base)) < 0.05
    assert np.isnan(validation_uplift(None, better, base))


def _probs(y: np.ndarray, rng: np.random.Generator, signal: float) -> np.ndarray:
    """(N, 2) probabilities whose AUC grows with ``signal`` in [0, 1]."""
    p = 1 / (1 + np.exp(-(4 * signal * (2 * y - 1) + rng.normal(size=len(y)))))
    return np.stack([1 - p, p], 1)


def test_knob_effects_pair_configurations_that_differ_in_one_knob():
    from medsynth.evaluation.stats import auc_score
    from medsynth.experiment.sweep_analysis import knob_effects

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)

    def arm(signal: float) -> np.ndarray:
        return np.stack([_probs(y, rng, signal) for _ in range(3)])

    def auc(a: np.ndarray) -> float:
        return float(np.mean([auc_score(y, p, 2) for p in a]))

    base = dict(fraction=0.5, guidance_scale=1.0, guidance_rescale=0.0, guidance_interval="0-1")
    base |= dict(sampler="dpmpp", steps=10, ddim_eta=0.0, pool_size=2.0, class_mix="proportional")
    # One duplicate control per ratio, shared by every configuration at it (as in a sweep).
    dup = {0.5: arm(0.1), 1.0: arm(0.3)}
    rows, probas = [], {}
    for cg, sel, ratio, signal in (
        ("", "random", 0.5, 0.1),
        ("", "fidelity", 0.5, 0.1),
        ("normal:2", "random", 0.5, 0.8),
        ("normal:2", "fidelity", 0.5, 0.8),
        ("", "random", 1.0, 0.3),  # no guided partner at ratio 1: an incomplete grid
    ):
        cid = f"{cg}|{sel}|{ratio}"
        rows.append(base | dict(class_guidance=cg, selector=sel, ratio=ratio, config=cid))
        probas[(0.5, cid)] = (y, arm(signal), dup[ratio])
    effects = knob_effects(rows, probas, 0.5, n_boot=200)
    by = {e["knob"]: e for e in effects}
    assert set(by) == {"class_guidance", "selector", "ratio"}
    cg = by["class_guidance"]
    assert (cg["value"], cg["reference"], cg["pairs"]) == ("normal:2", "none", 2)
    # The point estimate by hand: the shared control cancels, the mean over the pairs remains.
    arms = {r["config"]: probas[(0.5, r["config"])][1] for r in rows}
    hand = np.mean(
        [auc(arms[f"normal:2|{s}|0.5"]) - auc(arms[f"|{s}|0.5"]) for s in ("random", "fidelity")]
    )
    assert cg["diff"] == pytest.approx(hand, abs=1e-9)
    assert cg["diff"] > 0.2 and cg["verdict"].startswith("helps")
    sel = by["selector"]  # the same probabilities in distribution: nothing to find
    assert sel["pairs"] == 2 and abs(sel["diff"]) < 0.05 and "MDE" in sel["verdict"]
    # The ratio pairs only where both ratios exist; its controls differ and enter the contrast.
    ratio = by["ratio"]
    assert ratio["pairs"] == 1
    d = dup[1.0], dup[0.5]
    hand = (auc(arms["|random|1.0"]) - auc(d[0])) - (auc(arms["|random|0.5"]) - auc(d[1]))
    assert ratio["diff"] == pytest.approx(hand, abs=1e-9)
    assert all(e["p_holm"] >= e["p"] for e in effects)
    # Twice the images make an arm sharper, and its duplicate control as much: the ratio's
    # effect on the uplift over the control is nil, though the arms' own AUC rises ~0.3.
    rows, probas = [], {}
    for ratio, signal in ((0.5, 0.1), (1.0, 0.5)):
        for sel in ("random", "fidelity"):
            cid = f"{sel}|{ratio}"
            rows.append(base | dict(class_guidance="", selector=sel, ratio=ratio, config=cid))
            probas[(0.5, cid)] = (y, arm(signal), arm(signal))
    ratio = next(e for e in knob_effects(rows, probas, 0.5, n_boot=200) if e["knob"] == "ratio")
    assert ratio["pairs"] == 2 and abs(ratio["diff"]) < 0.05 and "MDE" in ratio["verdict"]


def test_contrast_test_is_the_paired_test_for_two_terms():
    from medsynth.evaluation.sweep_stats import contrast_test

    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 50)
    a = np.stack([_probs(y, rng, 0.6) for _ in range(4)])
    b = np.stack([_probs(y, rng, 0.3) for _ in range(4)])
    two = contrast_test(y, [(1.0, a), (-1.0, b)], n_boot=100)
    ref = paired_bootstrap_test(y, a, b, n_boot=100)
    assert two.keys() == ref.keys()
    assert all(two[k] == pytest.approx(ref[k], abs=1e-12) for k in ref)
    with pytest.raises(ValueError, match="one \\(seeds, cases, classes\\) shape"):
        contrast_test(y, [(1.0, a), (-1.0, b[:2])])
