"""Review database, export and the Streamlit dashboard (AppTest; real Chromium when present)."""

import csv
import os
import shutil
import threading
from pathlib import Path

import pytest

from medsynth.experiment.runner import run_protocol
from medsynth.protocol import load_protocol
from medsynth.review.db import audit_log, decide, decisions, status_by_sample
from medsynth.review.export import export_accepted

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "dashboards" / "review.py"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("reviewrun")
    proto = load_protocol(REPO / "protocols/smoke.yaml", ["evaluation.seeds=1"])
    run_protocol(proto, run_dir=run, log=lambda s: None, progress=False)
    return run


def _rows(path):
    return list(csv.DictReader(open(path)))


def test_eight_threads_lose_no_decision(tmp_path):
    db = tmp_path / "review.sqlite"
    errors = []

    def work(t):
        try:
            for i in range(25):
                decide(
                    db,
                    f"pool/s{i:03d}",
                    f"rev{t}",
                    ("accept", "reject", "unsure")[(i + t) % 3],
                    "sha",
                    note=str(i),
                )
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert len(decisions(db)) == 8 * 25 and len(audit_log(db)) == 8 * 25
    decide(db, "pool/s000", "rev0", "reject", "sha")  # an upsert changes, the audit appends
    assert len(decisions(db)) == 200 and len(audit_log(db)) == 201


def test_decision_does_not_attach_to_regenerated_pixels(tmp_path):
    db = tmp_path / "r.sqlite"
    decide(db, "p/a", "me", "accept", "old-sha")
    assert status_by_sample(db, {"p/a": "old-sha"})["p/a"]["status"] == "accept"
    assert status_by_sample(db, {"p/a": "new-sha"}) == {}
    with pytest.raises(ValueError, match="valid choices"):
        decide(db, "p/a", "me", "maybe", "x")


def test_apptest_accept_persists_reload_and_export(run):
    from streamlit.testing.v1 import AppTest

    os.environ["MEDSYNTH_RUN"] = str(run)
    try:
        at = AppTest.from_file(str(APP), default_timeout=60)
        at.query_params["reviewer"] = "me"
        at.run()
        assert not at.exception
        assert at.radio(key="view").options == [
            "Samples",
            "Review",
            "Compare",
            "Disagreements",
            "Metrics",
            "DICOM",
            "Export",
        ]
        at.radio(key="view").set_value("Review").run()
        # The smoke run's held-out set is too small to calibrate: Compare says so.
        at.radio(key="view").set_value("Compare").run()
        assert any("audit not informative" in w.value for w in at.warning)
        at.radio(key="view").set_value("Review").run()
        at.button(key="accept").click().run()
        assert not at.exception
        rows = decisions(run / "review.sqlite")
        assert [(r["sample"], r["decision"], r["reviewer"]) for r in rows] == [
            ("main/dicom/normal/000000.dcm", "accept", "me")
        ]
        at.button(key="reject").click().run()  # the current sample moved on to the next one
        # A fresh session (a reload) shows the stored decisions.
        again = AppTest.from_file(str(APP), default_timeout=60)
        again.query_params["reviewer"] = "me"
        again.run()
        again.radio(key="view").set_value("Review").run()
        progress = next(d.value for d in again.dataframe if "class" in d.value.columns)
        assert int(progress.loc[progress["class"] == "normal", "accepted"].iloc[0]) == 1
        assert int(progress.loc[progress["class"] == "normal", "rejected"].iloc[0]) == 1
        again.radio(key="view").set_value("Export").run()
        again.button(key="export").click().run()
        assert not again.exception
    finally:
        del os.environ["MEDSYNTH_RUN"]
    exported = run / "generate/main-accepted"
    rows = _rows(exported / "manifest.csv")
    assert [r["path"] for r in rows] == ["dicom/normal/000000.dcm"]
    assert (exported / rows[0]["path"]).read_bytes() == (
        run / "generate/main" / rows[0]["path"]
    ).read_bytes()


def test_export_applies_corrected_label_everywhere_and_cli(run, tmp_path):
    import pydicom
    from typer.testing import CliRunner

    from medsynth.cli import app
    from medsynth.generation.dataset import load_pool

    manifest = _rows(run / "generate/main/manifest.csv")
    r = manifest[-1]  # an opacity sample, accepted as normal
    decide(
        run / "review.sqlite",
        f"main/{r['path']}",
        "other",
        "accept",
        r["pixel_sha256"],
        corrected_label="normal",
    )
    out, n = export_accepted(run, "main", tmp_path / "exp", reviewer="other", link=True)
    row = _rows(out / "manifest.csv")[0]
    assert n == 1 and not (out / row["path"]).is_symlink()  # a relabelled file is rewritten
    assert (row["class_name"], row["class_index"], row["original_class"]) == (
        "normal",
        "0",
        "opacity",
    )
    assert row["path"].startswith("dicom/normal/")
    ds = pydicom.dcmread(out / row["path"])
    assert ds.SeriesDescription == "SYNTHETIC normal" and ds.SOPInstanceUID == row["SOPInstanceUID"]
    assert ds.private_block(0x0011, "MEDSYNTH 1")[0x01].value == "normal"
    assert load_pool(out, ["normal", "opacity"]).labels.tolist() == [0]  # usable as a pool
    with pytest.raises(ValueError, match="already exists"):  # never overwrites an export
        export_accepted(run, "main", out, reviewer="other")
    with pytest.raises(ValueError, match="nothing to export"):
        export_accepted(run, "main", tmp_path / "none", reviewer="nobody")
    assert not (tmp_path / "none").exists()
    res = CliRunner().invoke(app, ["review", "export", str(run), "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0 and "exported" in res.output


def test_default_exports_are_versioned(tmp_path, run):
    from medsynth.review.export import is_export, next_export_dir

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "generate/main-accepted", ignore_errors=True)
    (copy / "review.sqlite").unlink(missing_ok=True)
    r = _rows(copy / "generate/main/manifest.csv")[0]
    decide(copy / "review.sqlite", f"main/{r['path']}", "a", "accept", r["pixel_sha256"])
    first, _ = export_accepted(copy, "main")
    second, _ = export_accepted(copy, "main")
    assert (first.name, second.name) == ("main-accepted", "main-accepted-2")
    assert is_export(first) and is_export(second) and not is_export(copy / "generate/main")
    assert next_export_dir(copy, "main").name == "main-accepted-3"


def test_empty_database_file_and_concurrent_readers(tmp_path, run):
    """`: > RUN/review.sqlite` then an export or a read: no `no such table`; 16 writers and a
    polling reader on a fresh database: the reader never meets a file without tables."""
    from typer.testing import CliRunner

    from medsynth.cli import app

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "review.sqlite").write_bytes(b"")
    assert decisions(copy / "review.sqlite") == [] and audit_log(copy / "review.sqlite") == []
    res = CliRunner().invoke(app, ["review", "export", str(copy), "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "nothing to export" in res.output
    assert "OperationalError" not in res.output
    db = tmp_path / "fresh.sqlite"
    errors: list[Exception] = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                audit_log(db), decisions(db)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    def writer(t):
        try:
            for i in range(5):
                decide(db, f"p/{i}", f"r{t}", "accept", "sha")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    rd = threading.Thread(target=reader)
    rd.start()
    ws = [threading.Thread(target=writer, args=(t,)) for t in range(16)]
    for w in ws:
        w.start()
    for w in ws:
        w.join()
    stop.set()
    rd.join()
    assert not errors, errors[:3]
    assert len(decisions(db)) == 80


def test_clear_adjudicate_and_status(tmp_path):
    from medsynth.review.db import adjudicate, clear

    db = tmp_path / "r.sqlite"
    decide(db, "p/a", "ann", "accept", "s")
    decide(db, "p/a", "ben", "accept", "s", corrected_label="opacity")
    st = status_by_sample(db, {"p/a": "s"})["p/a"]
    assert st["status"] == "unsure"  # accepted under two different labels
    adjudicate(db, "p/a", "cat", "accept", "s", corrected_label="opacity")
    st = status_by_sample(db, {"p/a": "s"})["p/a"]
    assert (st["status"], st["corrected_label"]) == ("accept", "opacity")
    assert clear(db, "p/a", "ann") and not clear(db, "p/a", "ann")
    assert [d["reviewer"] for d in decisions(db)] == ["ben"]
    assert [a["decision"] for a in audit_log(db)] == ["accept", "accept", "accept", "clear"]


def test_agreement_kappas():
    from medsynth.review.agreement import agreement_table, cohen_kappa, disagreements, fleiss_kappa

    assert cohen_kappa(["a", "b", "a", "b"], ["a", "b", "a", "b"]) == 1.0
    # Textbook example (Cohen 1960 style): 0.7 observed, 0.5 chance -> 0.4.
    a = ["y"] * 5 + ["n"] * 5
    b = ["y"] * 4 + ["n"] + ["y"] * 2 + ["n"] * 3
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    # Fleiss (1971) worked example reduced: identical ratings -> 1, all split evenly -> negative.
    assert fleiss_kappa([["a", "a", "a"], ["b", "b", "b"]]) == 1.0
    assert fleiss_kappa([["a", "b"], ["a", "b"]]) < 0
    rows = [
        {"sample": "s1", "reviewer": "x", "decision": "accept", "corrected_label": None},
        {"sample": "s1", "reviewer": "y", "decision": "accept", "corrected_label": "opacity"},
        {"sample": "s2", "reviewer": "x", "decision": "reject", "corrected_label": None},
        {"sample": "s2", "reviewer": "y", "decision": "reject", "corrected_label": None},
    ]
    assert disagreements(rows) == {"s1": {"x": "accept", "y": "accept→opacity"}}
    table = agreement_table(rows)
    assert table["samples"] == 2 and table["pairs"][0]["reviewers"] == "x / y"


def test_navigation_keeps_the_sample_not_the_position():
    from medsynth.review.navigation import resolve, step

    order = {f"s{i}": i for i in range(20)}
    unreviewed = [f"s{i}" for i in range(8, 20)]
    assert unreviewed[resolve(unreviewed, order, "s8")] == "s8"  # not s16
    assert step(unreviewed, order, "s8", +1) == "s9"
    after = [k for k in unreviewed if k != "s8"]  # s8 was decided and left the filter
    assert after[resolve(after, order, "s9")] == "s9"
    assert after[resolve(after, order, "s8")] == "s9"  # a filtered-out current -> the next one
    assert step(after, order, "s8", +1) == "s9" and step(after, order, "s9", -1) == "s9"
    assert resolve([], order, "s1") == -1 and step([], order, None, 1) is None


def test_banner_and_status_strip_sit_outside_the_image(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from medsynth.review.viewer import BANNER_PX, banner_px, tile_png

    img = np.full((32, 32), 0.5, dtype=np.float32)
    im = np.asarray(Image.open(io.BytesIO(tile_png(img, "accept", size=64))))
    assert im.shape[:2] == (64 + 2 * BANNER_PX, 64)
    assert (im[BANNER_PX : BANNER_PX + 64] == 128).all()  # the image itself is untouched
    assert tuple(im[-1, -1]) == (46, 160, 67)  # green strip: accepted
    assert banner_px(1024) > BANNER_PX  # readable on a full-resolution image


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
@pytest.mark.skipif(
    __import__("tests.cdp").cdp.address_limit_blocks_chromium() is not None,
    reason="hard address-space limit too low for chromium (use `ulimit -S -v`)",
)
def test_real_browser_screenshot(run, tmp_path):
    from tests.cdp import screenshot_when_images_loaded, streamlit_server

    with streamlit_server(APP, run) as url:
        shot = tmp_path / "dashboard.png"
        n_images = screenshot_when_images_loaded(url, shot, min_images=12, timeout=90)
        assert n_images >= 12 and shot.stat().st_size > 20_000
        keep = os.environ.get("MEDSYNTH_SCREENSHOT_DIR")
        if keep:
            shutil.copy(shot, Path(keep) / "dashboard.png")
