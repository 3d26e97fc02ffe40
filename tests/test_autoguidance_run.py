"""Autoguidance in the run (issue 18): the train stage trains the guide beside the model
(``training.guide_fraction``), generation guides with it (``generation.autoguidance``), and the pool,
its DICOM, the hashes, the sweep, the report and a resume all know which guide drew it."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medsynth.experiment.runner import plan_stages, run_protocol, show
from medsynth.experiment.sweep import (
    StudyError,
    SweepPlan,
    _pool_sha,
    estimate,
    expand,
    pool_protocol,
    run_sweep,
)
from medsynth.generation.dataset import load_pool
from medsynth.generation.pool import generate_pool
from medsynth.protocol import ProtocolError, load_protocol, parse_protocol
from medsynth.runfolder import stage_inputs
from medsynth.training.api import guide_dir, guide_snapshot, train_from_sections
from medsynth.training.checkpoint import latest_snapshot, load_guide, snapshot_sha256
from tests.test_generation import _identifying_values, _scan_outputs
from tests.test_quality_knobs import PLAIN_POOL_SHA

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "protocols" / "smoke.yaml"
SMOKE_SWEEP = ROOT / "protocols" / "smoke_sweep.yaml"
AUTO = [
    "training.guide_fraction=0.34",
    "generation.autoguidance=true",
    "generation.guidance_scale=2",
]


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    """The smoke study with a 10-step guide, sampled at autoguidance 2."""
    run = tmp_path_factory.mktemp("auto")
    proto = load_protocol(SMOKE, AUTO)
    run_protocol(proto, run_dir=run, log=lambda s: None, progress=False)
    return run, proto


# --- protocol -----------------------------------------------------------------------------------


def test_protocol_keys_their_hashes_and_refusals():
    q = load_protocol(SMOKE)
    assert q.training.guide_fraction == 0 and q.training.guide_steps == 0
    assert q.generation.autoguidance is False
    # At their defaults the keys leave every hash as it was.
    same = load_protocol(SMOKE, ["training.guide_fraction=0", "generation.autoguidance=false"])
    assert stage_inputs(q) == stage_inputs(same) and q.sha256() == same.sha256()
    # The model does not depend on its guide; a pool drawn with the guide does.
    guide = load_protocol(SMOKE, AUTO[:1])
    assert guide.training.guide_steps == 10  # 0.34 of 30 steps
    auto = load_protocol(SMOKE, AUTO)
    longer = load_protocol(SMOKE, ["training.guide_fraction=0.5", *AUTO[1:]])
    unguided = load_protocol(SMOKE, [*AUTO[:2], "generation.guidance_scale=1"])
    # At guidance 1 the guide is never called: its length is not part of the pool.
    unguided_longer = load_protocol(
        SMOKE, ["training.guide_fraction=0.5", AUTO[1], "generation.guidance_scale=1"]
    )
    assert stage_inputs(unguided)["generate"] == stage_inputs(unguided_longer)["generate"]
    # (Only the report, whose model card describes the guide, changes.)
    assert {k: v for k, v in stage_inputs(guide).items() if k != "report"} == {
        k: v for k, v in stage_inputs(q).items() if k != "report"
    }
    assert stage_inputs(guide)["report"] != stage_inputs(q)["report"]
    assert stage_inputs(auto)["train"] == stage_inputs(q)["train"]
    assert stage_inputs(auto)["generate"] != stage_inputs(guide)["generate"]
    assert stage_inputs(longer)["generate"] != stage_inputs(auto)["generate"]
    with pytest.raises(ProtocolError, match="autoguidance needs a guide: set training.guide"):
        parse_protocol("dataset: {kind: phantoms}\n", ["generation.autoguidance=true"])
    with pytest.raises(ProtocolError, match="0.99 of max_steps 30 gives the guide 30 steps"):
        load_protocol(SMOKE, ["training.guide_fraction=0.99"])
    with pytest.raises(ProtocolError, match="guide_fraction.*less than 1"):
        load_protocol(SMOKE, ["training.guide_fraction=1"])
    with pytest.raises(ProtocolError, match="4 steps, within warmup_steps 5: its learning rate"):
        load_protocol(SMOKE, ["training.guide_fraction=0.15"])
    with pytest.raises(ProtocolError, match="an unconditional model has no use for a guide"):
        load_protocol(SMOKE, [AUTO[0], "training.unconditional=true"])
    with pytest.raises(ProtocolError, match="guidance_scale 0.5 below 1 would move towards"):
        load_protocol(SMOKE, [*AUTO[:2], "generation.guidance_scale=0.5"])
    # A class's own scale below 1 would move that class's rows towards the guide alike.
    with pytest.raises(ProtocolError, match="class_guidance opacity: 0.5 below 1 would move"):
        load_protocol(SMOKE, [*AUTO, "generation.class_guidance={opacity: 0.5}"])
    # ... and so would an autoguided pool of a sweep (each pool is checked when the plan is made).
    for axis in ("sweep.guidance_scale=[0.5, 2]", "sweep.class_guidance=[{}, {opacity: 0.5}]"):
        sweep = load_protocol(SMOKE_SWEEP, [AUTO[0], "sweep.autoguidance=[false, true]", axis])
        with pytest.raises(StudyError, match=r"pool g.*-ag.*0.5 below 1 would move towards"):
            expand(sweep)
    with pytest.raises(ProtocolError, match="autoguidance does not apply to the distilled"):
        load_protocol(SMOKE, [*AUTO[:2], "generation.sampler=distilled"])
    with pytest.raises(ProtocolError, match="autoguidance needs a guide"):
        load_protocol(SMOKE_SWEEP, ["sweep.autoguidance=[false, true]"])


# --- the run ------------------------------------------------------------------------------------


def test_train_stage_trains_the_guide_and_generation_uses_it(auto_run, tmp_path):
    run, proto = auto_run
    guide = latest_snapshot(guide_dir(run / "train"))
    assert guide.name == "snapshot-0000010"
    assert latest_snapshot(run / "train").name == "snapshot-0000030"  # the model, not the guide
    request = json.loads((run / "generate/main/request.json").read_text())
    assert request["guide_snapshot_sha256"] == snapshot_sha256(guide)
    ds = pydicom.dcmread(next((run / "generate/main/dicom/opacity").glob("*.dcm")))
    assert f"autoguide sha256:{snapshot_sha256(guide)[:16]}" in ds.DerivationDescription
    # The guide is what the pixels came from: the same request with the model as its own guide
    # (guide + 2 (model - guide) = model) draws guidance 1's images, with the weaker guide not.
    snap = latest_snapshot(run / "train")
    kw = dict(pool="main", sampler="dpmpp", steps=5, progress=False, device="cpu")
    plan = {"normal": 10, "opacity": 10}
    generate_pool(snap, tmp_path / "self", plan, guidance_scale=2, guide_snapshot=snap, **kw)
    generate_pool(snap, tmp_path / "g1", plan, guidance_scale=1, **kw)
    generate_pool(snap, tmp_path / "cfg", plan, guidance_scale=2, **kw)
    pixels = {k: load_pool(tmp_path / k).images for k in ("self", "g1", "cfg")}
    pixels["auto"] = load_pool(run / "generate/main").images
    assert np.array_equal(pixels["self"], pixels["g1"])
    assert np.abs(pixels["auto"] - pixels["g1"]).max() > 1e-2
    assert np.abs(pixels["auto"] - pixels["cfg"]).max() > 1e-2
    # Unguided, the guide is never called: neither loaded nor recorded.
    generate_pool(snap, tmp_path / "g1auto", plan, guidance_scale=1, guide_snapshot=guide, **kw)
    assert "guide" not in (tmp_path / "g1auto" / "request.json").read_text()
    # A pool drawn with another guide is another request.
    with pytest.raises(ValueError, match="another request"):
        generate_pool(snap, run / "generate/main", plan, guidance_scale=2, **kw)


def test_autoguidance_for_some_classes_only(auto_run, tmp_path):
    """``generation.autoguidance: [opacity]``: opacity's guided images use the guide, the other
    guided classes the null class; each class is drawn as in a pool guided one way for all."""
    from medsynth.experiment.report import _guidance

    run, _ = auto_run
    some = [
        AUTO[0],
        "generation.guidance_scale=2",
        "generation.autoguidance=[opacity]",
        "generation.class_guidance={normal: 3}",
    ]
    q = load_protocol(SMOKE, some)
    assert q.generation.autoguided_classes == ["opacity"] and q.generation.uses_guide
    assert _guidance(q.generation) == (
        "guidance 2 (normal: 3); the null class for the other classes, autoguidance for opacity"
    )
    # Which classes use the guide is part of the pool; a listed class left at 1 never calls it.
    unused = ["generation.autoguidance=[opacity]", "generation.class_guidance={normal: 3}"]
    hashes = {
        (guide, k): stage_inputs(load_protocol(SMOKE, [guide, *extra]))["generate"]
        for guide in (AUTO[0], "training.guide_fraction=0.5")
        for k, extra in {"all": AUTO[1:], "some": some[1:], "unused": unused}.items()
    }
    assert len({hashes[AUTO[0], k] for k in ("all", "some", "unused")}) == 3
    # The guide's length is part of a pool it draws, and not of one it never touches.
    longer = "training.guide_fraction=0.5"
    assert hashes[longer, "some"] != hashes[AUTO[0], "some"]
    assert hashes[longer, "unused"] == hashes[AUTO[0], "unused"]
    assert not load_protocol(SMOKE, [AUTO[0], *unused]).generation.uses_guide
    # The list is a set: its order changes nothing.
    a, b = (
        load_protocol(SMOKE, [*some, f"generation.autoguidance=[{x}]"])
        for x in ("normal, opacity", "opacity, normal")
    )
    assert a.sha256() == b.sha256() and a.generation.autoguided_classes == ["normal", "opacity"]
    named = "dataset.classes=[normal, opacity]"  # where the protocol names them: at load
    with pytest.raises(ProtocolError, match=r"names unknown classes \['nodule'\]; dataset.cl"):
        load_protocol(SMOKE, [*some, named, "generation.autoguidance=[nodule]"])
    bad = {
        "generation.autoguidance=[]": "an empty list autoguides no class: use false",
        "generation.class_guidance={opacity: 0.5}": "opacity at 0.5 below 1 would move towards",
    }
    for extra, why in bad.items():
        with pytest.raises(ProtocolError, match=why):
            load_protocol(SMOKE, [*some, extra])
    # Null-class guidance below 1 (towards the unconditional model) stays allowed elsewhere.
    load_protocol(SMOKE, [*some[:3], "generation.class_guidance={normal: 0.5}"])
    with pytest.raises(ProtocolError, match="a sweep draws autoguided pools by sweep.autoguidance"):
        load_protocol(SMOKE_SWEEP, [AUTO[0], "generation.autoguidance=[opacity]"])

    snap, guide = latest_snapshot(run / "train"), latest_snapshot(guide_dir(run / "train"))
    kw = dict(pool="main", sampler="dpmpp", steps=5, progress=False, device="cpu")
    plan = {"normal": 4, "opacity": 4}
    both = dict(guidance_scale=2, class_guidance={"normal": 3}, guide_snapshot=guide)
    generate_pool(snap, tmp_path / "some", plan, autoguided_classes=["opacity"], **both, **kw)
    generate_pool(snap, tmp_path / "auto", plan, guidance_scale=2, guide_snapshot=guide, **kw)
    generate_pool(snap, tmp_path / "cfg", plan, guidance_scale=3, **kw)
    request = json.loads((tmp_path / "some" / "request.json").read_text())
    assert request["autoguided_classes"] == ["opacity"]
    assert request["guide_snapshot_sha256"] == snapshot_sha256(guide)
    ds = pydicom.dcmread(next((tmp_path / "some/dicom/normal").glob("*.dcm")))
    assert f"autoguide sha256:{snapshot_sha256(guide)[:16]} for=opacity" in ds.DerivationDescription
    pools = {k: load_pool(tmp_path / k) for k in ("some", "auto", "cfg")}
    opacity = pools["some"].labels == pools["some"].classes.index("opacity")
    assert np.array_equal(pools["some"].images[opacity], pools["auto"].images[opacity])
    assert np.array_equal(pools["some"].images[~opacity], pools["cfg"].images[~opacity])
    with pytest.raises(ValueError, match=r"autoguidance names unknown classes \['nodule'\]"):
        generate_pool(snap, tmp_path / "x", plan, autoguided_classes=["nodule"], **both, **kw)


def test_a_class_name_typo_fails_before_the_finished_pool_is_cleared(tmp_path):
    """The smoke protocol does not name its classes, so a typo is found against the ingest:
    before the generate stage clears the pool it would have replaced, by `run` and by a stage
    command alike."""
    from medsynth.experiment.runner import StudyError, run_stage

    run, stages = tmp_path / "run", ["ingest", "train", "generate"]
    quiet = dict(run_dir=run, log=lambda s: None, progress=False, stages=stages)
    run_protocol(load_protocol(SMOKE, AUTO), **quiet)
    pool = run / "generate" / "main"
    before = sorted(p.name for p in pool.rglob("*.dcm"))
    assert before
    for typo in ("generation.autoguidance=[nodule]", "generation.class_guidance={nodule: 2}"):
        bad = load_protocol(SMOKE, [*AUTO, typo])
        with pytest.raises(StudyError, match=r"names unknown classes \['nodule'\]; the ingest's"):
            run_protocol(bad, **quiet)
        with pytest.raises(StudyError, match=r"names unknown classes \['nodule'\]"):
            run_stage(bad, "generate", run, lambda: None, log=lambda s: None)
        assert sorted(p.name for p in pool.rglob("*.dcm")) == before
    assert [p.action for p in plan_stages(load_protocol(SMOKE, AUTO), run, stages)] == ["skip"] * 3


def test_generation_pairs_the_model_with_its_own_finished_guide(auto_run, tmp_path):
    from medsynth.generation.api import generate_from_protocol

    run, proto = auto_run
    other = tmp_path / "snapshot-0000030"
    shutil.copytree(latest_snapshot(run / "train"), other)
    with pytest.raises(ValueError, match="is another model: drop --snapshot"):
        generate_from_protocol(proto, run, snapshot=other, progress=False)
    # A guide of another length (or an interrupted one) is not taken for the asked one.
    longer = load_protocol(SMOKE, ["training.guide_fraction=0.5", *AUTO[1:]])
    with pytest.raises(FileNotFoundError, match="no finished 15-step guide"):
        generate_from_protocol(longer, run, progress=False)


def test_adding_or_changing_a_guide_trains_only_the_guide(tmp_path):
    """A guide added to a finished run, or made longer, trains beside the model without
    retraining it; only pools drawn with the guide are drawn again."""
    run, stages = tmp_path / "run", ["ingest", "train", "generate"]
    quiet = dict(run_dir=run, log=lambda s: None, progress=False, stages=stages)
    run_protocol(load_protocol(SMOKE), **quiet)
    model = latest_snapshot(run / "train") / "ema.safetensors"
    pool = run / "generate" / "main" / ".stage.json"
    before = model.stat().st_mtime_ns, pool.stat().st_mtime_ns

    def actions(proto):
        return [p.action for p in plan_stages(proto, run, stages)]

    guide_only = load_protocol(SMOKE, AUTO[:1])
    assert actions(guide_only) == ["skip", "guide", "skip"]
    run_protocol(guide_only, **quiet)
    short = latest_snapshot(guide_dir(run / "train"))
    assert short.name == "snapshot-0000010"
    short_sha = snapshot_sha256(short)
    assert (model.stat().st_mtime_ns, pool.stat().st_mtime_ns) == before
    assert actions(guide_only) == ["skip", "skip", "skip"]
    assert "guide     snapshot-0000010 (autoguidance)" in show(run)
    # Guiding with it draws the pool again; a longer guide replaces the shorter one.
    assert actions(load_protocol(SMOKE, AUTO)) == ["skip", "skip", "rerun"]
    longer = load_protocol(SMOKE, ["training.guide_fraction=0.5", *AUTO[1:]])
    assert actions(longer) == ["skip", "guide", "rerun"]
    run_protocol(longer, **quiet)
    # Trained anew, not resumed from the shorter guide (whose LR had decayed by step 10).
    assert latest_snapshot(guide_dir(run / "train")).name == "snapshot-0000015"
    assert snapshot_sha256(short) != short_sha
    request = json.loads((run / "generate/main/request.json").read_text())
    assert request["guide_snapshot_sha256"] == snapshot_sha256(
        guide_dir(run / "train") / "snapshot-0000015"
    )
    assert model.stat().st_mtime_ns == before[0]
    # A guide lost (or retrained) under a finished autoguided pool: the pool is drawn again.
    run_protocol(longer, **quiet)
    shutil.rmtree(guide_dir(run / "train"))
    assert actions(longer) == ["skip", "guide", "rerun"]


def test_a_failed_guide_leaves_the_model_done(tmp_path):
    """`medsynth train` on a finished model trains only its guide; if that fails or is killed,
    the model's stage stays done (not "resume", which would redraw everything after it)."""
    from typer.testing import CliRunner

    from medsynth.cli import app
    from medsynth.experiment.runner import run_stage

    run, stages = tmp_path / "run", ["ingest", "train", "generate"]
    run_protocol(
        load_protocol(SMOKE), run_dir=run, log=lambda s: None, progress=False, stages=stages
    )
    guide_only = load_protocol(SMOKE, AUTO[:1])

    def dies():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_stage(guide_only, "train", run, dies, log=lambda s: None)
    assert [p.action for p in plan_stages(guide_only, run, stages)] == ["skip", "guide", "skip"]
    args = ["train", str(SMOKE), "--run-dir", str(run), "--set", AUTO[0]]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert [p.action for p in plan_stages(guide_only, run, stages)] == ["skip"] * 3
    assert guide_snapshot(run / "train", 10) is not None


def test_a_half_cleared_folder_is_not_taken_for_its_inputs(tmp_path):
    from medsynth.training.api import _folder_for, run_guide_steps

    folder = tmp_path / "guide"
    folder.mkdir()
    (folder / "state-0000010.pt").write_bytes(b"left by a kill during the clearing")
    _folder_for(folder, {"guide_steps": 15})
    assert [p.name for p in folder.iterdir()] == [".inputs"]
    # A run folder whose protocol this version cannot read asks for no guide (show says so).
    (tmp_path / "protocol.yaml").write_text("training: {guide_steps: 1000}\n")
    assert run_guide_steps(tmp_path) == 0


def test_report_names_autoguidance_and_its_guide(auto_run):
    run, _ = auto_run
    text = (run / "report/index.html").read_text()
    guide = snapshot_sha256(latest_snapshot(guide_dir(run / "train")))
    assert f"autoguidance 2 away from guide <code>sha256:{guide[:16]}</code>" in text
    assert "a guide for autoguidance: the same recipe and data trained 10 steps" in text


def test_no_source_identifier_in_an_autoguided_run(auto_run):
    run, _ = auto_run
    values = _identifying_values(run / "phantoms")
    assert len(values) > 50
    assert _scan_outputs(run, values) == []  # train/guide and the pool included


def test_a_guide_of_another_task_is_refused(auto_run, tmp_path):
    run, _ = auto_run
    model_cfg = json.loads((latest_snapshot(run / "train") / "config.json").read_text())
    guide = latest_snapshot(guide_dir(run / "train"))
    load_guide(guide, model_cfg)  # the same task
    other = dict(model_cfg, classes=["normal", "nodule"])
    with pytest.raises(ValueError, match=r"models another task \(classes differ"):
        load_guide(guide, other)


def test_an_interrupted_guide_resumes_without_retraining_the_model(auto_run, tmp_path):
    """A kill while the guide trains leaves the model done and the guide's states: the rerun
    resumes the guide to the same weights and leaves the model's snapshot as it was."""
    ref, proto = auto_run
    run = tmp_path / "run"
    shutil.copytree(ref / "ingest", run / "ingest")
    p = load_protocol(SMOKE, [*AUTO, "training.checkpoint_every_steps=5"])
    args = (run / "ingest", run / "train", p.model, p.schedule, p.training)
    train_from_sections(*args, progress=False)
    guide = guide_dir(run / "train")
    want = snapshot_sha256(latest_snapshot(guide))
    model = latest_snapshot(run / "train")
    model_mtime = (model / "ema.safetensors").stat().st_mtime_ns
    # As a kill after step 5 of the guide leaves it: its newest state is step 5, no snapshot 10.
    shutil.rmtree(guide / "snapshot-0000010")
    (guide / "state-0000010.pt").unlink()
    train_from_sections(*args, progress=False)
    assert snapshot_sha256(latest_snapshot(guide)) == want
    assert (model / "ema.safetensors").stat().st_mtime_ns == model_mtime


# --- the sweep ----------------------------------------------------------------------------------


def test_a_sweep_trains_the_guide_and_draws_its_autoguided_pool(tmp_path):
    proto = load_protocol(
        SMOKE_SWEEP,
        [
            "sweep.train_fractions=[1.0]",
            "sweep.samplers=[{sampler: dpmpp, steps: 3}]",
            "sweep.autoguidance=[false, true]",
            "sweep.selectors=[random]",
            "training.guide_fraction=0.3",
        ],
    )
    run = run_sweep(proto, run_dir=tmp_path / "run", log=lambda _: None, progress=False)
    fdir = run / "sweep" / "f1"
    guide = latest_snapshot(guide_dir(fdir / "train"))
    assert guide.name == "snapshot-0000003"
    auto = json.loads((fdir / "generate" / "g2-ag-dpmpp3-p1" / "request.json").read_text())
    plain = json.loads((fdir / "generate" / "g2-dpmpp3-p1" / "request.json").read_text())
    assert auto["guide_snapshot_sha256"] == snapshot_sha256(guide)
    assert "guide_snapshot_sha256" not in plain
    rows = list(csv.DictReader(open(run / "sweep" / "configs.csv")))
    assert sorted(r["autoguidance"] for r in rows) == ["off", "on"]
    stats = json.loads((run / "sweep" / "stats.json").read_text())
    knobs = stats["fractions"]["1"]["knob_effects"]
    assert [(e["knob"], e["value"], e["reference"]) for e in knobs] == [
        ("autoguidance", "on", "off")
    ]


def test_sweep_axis_draws_an_unguided_pool_once(tmp_path):
    sets = [
        "sweep.samplers=[{sampler: dpmpp, steps: 3}]",
        "sweep.guidance_scale=[1]",
    ]
    plain = load_protocol(SMOKE_SWEEP, sets)
    assert _pool_sha(plain, 1.0, expand(plain).pools[0]) == PLAIN_POOL_SHA
    proto = load_protocol(
        SMOKE_SWEEP,
        [
            *sets[:1],
            "sweep.guidance_scale=[1, 2]",
            "sweep.autoguidance=[false, true]",
            "training.guide_fraction=0.3",
        ],
    )
    plan = expand(proto)
    assert [p.name for p in plan.pools] == ["g1-dpmpp3-p1", "g2-dpmpp3-p1", "g2-ag-dpmpp3-p1"]
    gens = [pool_protocol(proto, 1.0, p, 10).generation for p in plan.pools]
    assert [g.autoguidance for g in gens] == [False, False, True]
    assert len({_pool_sha(proto, 1.0, p) for p in plan.pools}) == 3
    # The guide's training is counted; a guided pool costs the same whichever model it guides with.
    one = SweepPlan([1.0], plan.pools[1:2], ["proportional"], ["random"], [1.0])
    two = SweepPlan([1.0], plan.pools[2:3], ["proportional"], ["random"], [1.0])
    a, b = estimate(proto, one, tmp_path), estimate(proto, two, tmp_path)
    assert a["generate"] == b["generate"]
    no_guide = load_protocol(SMOKE_SWEEP, [*sets[:1], "sweep.guidance_scale=[1, 2]"])
    steps = proto.training.max_steps
    assert a["train"] == pytest.approx(
        estimate(no_guide, one, tmp_path)["train"] * (steps + 3) / steps
    )


def test_torchrun_never_clears_a_guide_under_the_other_processes(auto_run, monkeypatch):
    from medsynth.training.api import _guide_inputs, _refuse_clearing_under_torchrun

    run, _ = auto_run
    model = latest_snapshot(run / "train")
    folder = guide_dir(run / "train")
    monkeypatch.setenv("WORLD_SIZE", "2")
    _refuse_clearing_under_torchrun(folder, _guide_inputs(model, 10))  # its own guide: fine
    with pytest.raises(ValueError, match="guide for another model or length; run `medsynth train`"):
        _refuse_clearing_under_torchrun(folder, _guide_inputs(model, 12))
    monkeypatch.setenv("WORLD_SIZE", "1")
    _refuse_clearing_under_torchrun(folder, _guide_inputs(model, 12))  # one process clears it


def test_the_shipped_full_train_default_runs_end_to_end_on_the_smoke_study(tmp_path):
    """pneumoniamnist_full's schedule and per-class guidance (read from the shipped file, so this
    follows the default), carried onto the smoke phantoms (normal / opacity for normal /
    pneumonia): the model trains on that noise floor, the normal rows take the scale their seed
    picks from the set, the finding class is autoguided, and the report says so."""
    from medsynth.diffusion.sampler import pick_scale
    from medsynth.training.checkpoint import load_snapshot

    full = load_protocol(ROOT / "protocols" / "pneumoniamnist_full.yaml")
    g = full.generation
    normal_set = g.class_guidance["normal"]
    assert isinstance(normal_set, list) and g.autoguided_classes == ["pneumonia"]
    sets = [
        f"schedule.beta_start={full.schedule.beta_start}",
        f"generation.guidance_scale={g.guidance_scale}",
        f"generation.class_guidance={{normal: {normal_set}}}",
        "generation.autoguidance=[opacity]",
        f"generation.timestep_spacing={g.timestep_spacing}",
        f"training.class_balance={full.training.class_balance}",
        "training.guide_fraction=0.34",  # the smoke study's 30 steps need a guide past warm-up
    ]
    proto = load_protocol(SMOKE, sets)
    run = tmp_path / "run"
    run_protocol(proto, run_dir=run, log=lambda s: None, progress=False)

    for snap in (latest_snapshot(run / "train"), latest_snapshot(guide_dir(run / "train"))):
        assert load_snapshot(snap, "cpu")[1].beta_start == full.schedule.beta_start
    with open(run / "generate/main/manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    normal = [r for r in rows if r["class_name"] == "normal"]
    assert {float(r["guidance_scale"]) for r in normal} == set(normal_set)  # both ends drawn
    for r in normal:
        assert float(r["guidance_scale"]) == pick_scale(normal_set, int(r["seed"]))
    request = json.loads((run / "generate/main/request.json").read_text())
    assert request["autoguided_classes"] == ["opacity"]
    for r in rows:
        ds = pydicom.dcmread(run / "generate/main" / r["path"])
        assert "for=opacity" in ds.DerivationDescription  # the pool's guide, and whom it guides
        if r["class_name"] == "opacity":
            assert float(r["guidance_scale"]) == g.guidance_scale
    report = (run / "report/index.html").read_text()
    ends = " or ".join(f"{s:g}" for s in normal_set)
    assert f"normal: {ends} by seed" in report and "autoguidance for opacity" in report
