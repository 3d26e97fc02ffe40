"""Sweeps: protocol validation, plan expansion, dry run, end to end on phantoms, kill -9 resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medsynth.experiment.runner import StudyError
from medsynth.experiment.sweep import describe, expand, run_sweep
from medsynth.protocol import ProtocolError, load_protocol, parse_protocol

ROOT = Path(__file__).resolve().parents[1]
SMOKE_SWEEP = ROOT / "protocols" / "smoke_sweep.yaml"
PNEUMONIA_SWEEP = ROOT / "protocols" / "pneumoniamnist_sweep.yaml"


def _markers(run: Path) -> dict[str, float]:
    """Folder -> finish time of every finished sweep unit (train, pool, evaluation)."""
    return {
        str(m.parent.relative_to(run)): json.loads(m.read_text())["finished"]
        for m in (run / "sweep").rglob(".stage.json")
    }


def test_sweep_section_is_validated_with_clear_errors():
    base = "dataset: {kind: phantoms}\nsweep:\n"
    with pytest.raises(ProtocolError, match="unknown key 'sweep.guidance'.*guidance_scale"):
        parse_protocol(base + "  guidance: [1, 2]\n")
    with pytest.raises(ProtocolError, match="train_fractions must lie in"):
        parse_protocol(base + "  train_fractions: [0.1, 1.5]\n")
    with pytest.raises(ProtocolError, match="ddim_eta applies to sampler 'ddim' only"):
        parse_protocol(base + "  samplers: [{sampler: dpmpp, steps: 10, ddim_eta: 0.5}]\n")
    with pytest.raises(ProtocolError, match="lists a value twice"):
        parse_protocol(base + "  ratios: [1, 1]\n")
    with pytest.raises(ProtocolError, match="sweep.selectors.0"):
        parse_protocol(base + "  selectors: [kmeans]\n")
    # A protocol without a sweep keeps its hash (the key is left out of the dump).
    assert "sweep" not in parse_protocol("dataset: {kind: phantoms}\n").dump()


def test_expand_names_pools_by_their_generation_settings():
    plan = expand(load_protocol(SMOKE_SWEEP))
    assert plan.fractions == [0.5, 1.0]
    assert [p.name for p in plan.pools] == ["g2-ddim3-eta0-p1", "g2-ddim3-eta1-p1", "g2-dpmpp3-p1"]
    assert plan.n_configs == 6 and len(plan.units) == 6
    again = expand(load_protocol(SMOKE_SWEEP, ["sweep.selectors=[kcenter]"]))
    assert [p.name for p in again.pools] == [p.name for p in plan.pools]  # eval knobs: same pools


def test_pneumoniamnist_sweep_validates_and_dry_runs(tmp_path):
    proto = load_protocol(PNEUMONIA_SWEEP)
    plan = expand(proto)
    assert plan.n_configs >= 20
    assert {0.01, 0.02, 0.05, 0.1, 0.25, 1.0} <= set(plan.fractions)
    if Path(proto.dataset.labels_csv).exists():  # the shared data may be absent
        text = describe(proto, tmp_path / "r")
        assert "estimated time" in text and "g1-ddim" in text


@pytest.fixture(scope="module")
def resumed_sweep(tmp_path_factory):
    """The smoke sweep killed with SIGKILL after its first pool, then resumed to the end."""
    run = tmp_path_factory.mktemp("sweep")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "medsynth.cli", "run", str(SMOKE_SWEEP), "--run-dir", str(run)]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = run / "sweep/f0.5/generate/g2-ddim3-eta0-p1/.stage.json"
    deadline = time.time() + 300
    while not first.exists():
        assert p.poll() is None and time.time() < deadline, "the sweep ended before its first pool"
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = _markers(run)
    log: list[str] = []
    run_sweep(load_protocol(SMOKE_SWEEP), run_dir=run, log=log.append, progress=False)
    return run, before, log


def test_killed_sweep_resumes_without_redoing_finished_units(resumed_sweep):
    run, before, log = resumed_sweep
    assert "sweep/f0.5/train" in before and "sweep/f0.5/generate/g2-ddim3-eta0-p1" in before
    after = _markers(run)
    for folder, finished in before.items():
        assert after[folder] == finished, f"{folder} was redone"
        assert not any(line.startswith(f"[{folder}]") for line in log), folder
    assert len(after) == 2 + 6 + 2 + 6  # 2 generators, 6 pools, 2 baseline + 6 pool units
    # A second rerun does nothing but the analysis.
    log2: list[str] = []
    run_sweep(load_protocol(SMOKE_SWEEP), run_dir=run, log=log2.append, progress=False)
    assert not any(line.startswith("[sweep/") for line in log2) and _markers(run) == after
    assert "skip (done)" in describe(load_protocol(SMOKE_SWEEP), run)
    from medsynth.experiment.runner import show

    assert "sweep: 16 finished units" in show(run) and "duplicate control" in show(run)


def test_sweep_outputs_table_statistics_and_report(resumed_sweep):
    import csv

    run = resumed_sweep[0]
    rows = list(csv.DictReader((run / "sweep/configs.csv").open()))
    assert len(rows) == 12 and {r["fraction"] for r in rows} == {"0.5", "1.0"}
    for key in ("auc_vs_real_p_holm", "auc_vs_dup_p_bh", "auc_vs_dup_mde", "vendi_clf", "FD_clf"):
        assert key in rows[0]
    stats = json.loads((run / "sweep/stats.json").read_text())
    assert set(stats["fractions"]) == {"0.5", "1"}
    assert stats["low_data_curve"]["fractions"] == [0.5, 1.0]
    assert set(stats["low_data_curve"]["lines"]) == {"best", "worst"}
    # Choices are made on validation figures, which every configuration now carries.
    assert stats["low_data_curve"]["selected_on"] == "validation"
    assert all(r["val_auc_vs_dup"] not in ("", "nan") for r in rows)
    assert "val_auc_vs_dup" in stats["fractions"]["0.5"]["best"]
    # Which settings help: each knob value against its first, over the pairs differing in it.
    effects = {(e["knob"], e["value"]): e for e in stats["fractions"]["0.5"]["knob_effects"]}
    assert set(effects) == {
        ("sampler", "ddim-3 eta 1"),
        ("sampler", "dpmpp-3"),
        ("selector", "kcenter"),
    }
    assert effects[("selector", "kcenter")]["pairs"] == 3
    assert effects[("sampler", "dpmpp-3")]["reference"] == "ddim-3 eta 0"
    for e in effects.values():  # a bootstrap CI around its point, Holm never below raw p
        assert e["ci_low"] <= e["diff"] <= e["ci_high"] and e["p"] <= e["p_holm"] <= 1
        assert 0 < e["mde"] < 1 and e["n_boot"] > 0
    page = (run / "report/index.html").read_text()
    for text in (
        "Recommendation",
        "Which settings help",
        "Holm p",
        "Low-data curve",
        "partial ρ",
        "MDE",
        "data:image/png",
    ):
        assert text in page, text
    assert all(isinstance(fr["warnings"], list) for fr in stats["fractions"].values())
    # Each generator and its classifiers saw only their fraction of the real training images.
    pools = ["g2-ddim3-eta0-p1", "g2-dpmpp3-p1"]
    n = {
        f: {
            json.loads((run / f"sweep/f{f}/evaluate/proportional/{p}/summary.json").read_text())[
                "n_real_train"
            ]
            for p in pools
        }
        for f in ("0.5", "1")
    }
    assert len(n["0.5"]) == len(n["1"]) == 1 and 0 < min(n["0.5"]) < min(n["1"])


def test_a_baseline_warning_reaches_stats_report_and_show(resumed_sweep, tmp_path):
    import shutil

    from medsynth.experiment.runner import show

    # The invalid fundus sweep's symptom, planted in a copy of the finished sweep's baselines:
    # the rerun (analysis only) must carry it to stats.json, the report and `medsynth show`.
    run = tmp_path / "run"
    shutil.copytree(resumed_sweep[0], run)
    path = run / "sweep/f0.5/evaluate/proportional/_baselines/summary.json"
    summary = json.loads(path.read_text())
    summary["warnings"] = ["The real-only classifier is near chance (planted)."]  # replaces
    path.write_text(json.dumps(summary))
    run_sweep(load_protocol(SMOKE_SWEEP), run_dir=run, log=lambda _: None, progress=False)
    stats = json.loads((run / "sweep/stats.json").read_text())
    assert stats["fractions"]["0.5"]["warnings"] == summary["warnings"]
    # The other fraction keeps its own findings (the smoke classifier is tiny: near chance).
    other = run / "sweep/f1/evaluate/proportional/_baselines/summary.json"
    assert stats["fractions"]["1"]["warnings"] == json.loads(other.read_text())["warnings"]
    page = (run / "report/index.html").read_text()
    assert "Check the classifier (train fraction 0.5).</b> The real-only classifier is near" in page
    assert "WARNING: The real-only classifier is near chance (planted)." in show(run)


def test_units_of_one_fraction_share_baselines_and_extractor(resumed_sweep):
    import numpy as np

    # Every evaluation unit refits real-only (seed 0 is the feature extractor): deterministic CPU
    # fits make them identical, so diversity metrics of different pools share one feature space.
    run = resumed_sweep[0]
    units = sorted((run / "sweep/f0.5/evaluate/proportional").iterdir())
    assert units[0].name == "_baselines"
    a, b = (np.load(u / "probas.npz") for u in units[:2])
    assert [str(x) for x in a["arms"]] == ["real_only", "duplicate_control@1"]
    assert str(b["arms"][0]) == "real_only" and np.array_equal(a["arm_0"], b["arm_0"])
    fa, fb = (np.load(u / "features.npz")["real_train"] for u in units[:2])
    assert np.array_equal(fa, fb)


def test_a_pool_too_small_for_a_ratio_fails_before_any_work():
    from medsynth.experiment.runner import StudyError
    from medsynth.experiment.sweep import _check_pool_sizes

    plan = expand(
        load_protocol(SMOKE_SWEEP, ["sweep.class_mix=[minority_topup]", "sweep.ratios=[2.0]"])
    )
    with pytest.raises(
        StudyError, match=r"holds 30 images per class but ratio 2 .*needs 50.*sweep.pool_size"
    ):
        _check_pool_sizes(plan, [10, 30], 0.5)
    _check_pool_sizes(expand(load_protocol(SMOKE_SWEEP)), [10, 30], 0.5)  # ratio 1 fits


def test_adding_a_value_plans_only_the_new_units(resumed_sweep):
    run = resumed_sweep[0]
    more = load_protocol(SMOKE_SWEEP, ["sweep.guidance_scale=[2.0, 1.0]"])
    lines = [ln for ln in describe(more, run).splitlines() if "sweep/f" in ln]
    new = [ln for ln in lines if "/g1-" in ln]
    assert len(lines) == 2 * (1 + 6) and len(new) == 6
    assert all("run/run (train/generate/evaluate)" in ln and "skip/" in ln for ln in new)
    assert all(ln.rstrip().endswith("skip (done)") for ln in lines if ln not in new)
    # Guidance per class as an axis: {} is the sweep's pools as they were (done), the rest new.
    per_class = load_protocol(SMOKE_SWEEP, ["sweep.class_guidance=[{}, {opacity: 1}]"])
    lines = [ln for ln in describe(per_class, run).splitlines() if "sweep/f" in ln]
    new = [ln for ln in lines if "-c.opacity_1-" in ln]
    assert len(lines) == 2 * (1 + 6) and len(new) == 6
    assert all(ln.rstrip().endswith("skip (done)") for ln in lines if ln not in new)


def test_a_class_guidance_typo_fails_before_training(tmp_path):
    # Phantom protocols list no dataset.classes, so the names are checked once ingested.
    proto = load_protocol(SMOKE_SWEEP, ["sweep.class_guidance=[{Opacity: 3}]"])
    with pytest.raises(StudyError, match=r"unknown classes \['Opacity'\]; the ingested classes"):
        run_sweep(proto, run_dir=tmp_path / "run", log=lambda _: None, progress=False)
    assert (tmp_path / "run" / "ingest").exists()
    assert not list((tmp_path / "run").glob("sweep/f*/train"))


def test_class_guidance_sweep_validates():
    proto = load_protocol(ROOT / "protocols" / "class_guidance_sweep.yaml")
    plan = expand(proto)
    assert plan.n_configs == 40 and proto.evaluation.seeds >= 5
    assert [p.class_guidance for p in plan.pools][:3] == [
        (),
        (("normal", 1.5),),
        (("normal", 2.0),),
    ]


def test_rsna_and_fundus_sweeps_validate_with_their_controls(tmp_path):
    from medsynth.experiment.sweep import estimate

    rsna = load_protocol(ROOT / "protocols" / "rsna_sweep.yaml")
    assert rsna.dataset.spatial_size == 64 and rsna.dataset.split_stratify == ["ViewPosition"]
    assert expand(rsna).n_configs >= 20 and rsna.evaluation.seeds >= 5
    cpu = load_protocol(ROOT / "protocols" / "rsna_sweep_cpu.yaml")
    assert cpu.dataset.spatial_size == 64 and cpu.dataset.split_stratify == ["ViewPosition"]
    if Path(cpu.dataset.labels_csv).exists():  # the estimate counts labels; shared data optional
        assert estimate(cpu, expand(cpu), tmp_path)["total"] <= 45 * 60  # sized for 2 CPU cores
    fundus = load_protocol(ROOT / "protocols" / "fundus_sweep.yaml")
    plan = expand(fundus)
    assert fundus.dataset.phantoms.body_part == "fundus" and plan.n_configs >= 20
    assert estimate(fundus, plan, tmp_path)["total"] <= 30 * 60  # ran in 21 min on this CPU


def test_pneumoniamnist_one_hour_sweep_fits_the_hour(tmp_path):
    from medsynth.experiment.sweep import estimate

    proto = load_protocol(ROOT / "protocols" / "pneumoniamnist_sweep_1h.yaml")
    plan = expand(proto)
    assert plan.n_configs >= 20 and proto.evaluation.seeds >= 5
    if not Path(proto.dataset.labels_csv).exists():
        pytest.skip("shared PneumoniaMNIST data absent")
    assert estimate(proto, plan, tmp_path / "r")["total"] <= 60 * 60
