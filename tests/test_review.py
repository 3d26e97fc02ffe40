"""Review database, export and the Streamlit dashboard (AppTest; real Chromium when present)."""

import csv
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
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
        at = AppTest.from_file(str(APP), default_timeout=60).run()
        assert not at.exception
        # The smoke run's held-out set is too small to calibrate: the Compare tab says so.
        assert any("audit not informative" in w.value for w in at.warning)
        assert [t.label for t in at.tabs] == [
            "Samples",
            "Review",
            "Compare",
            "Metrics",
            "DICOM",
            "Export",
        ]
        at.button(key="accept").click().run()
        assert not at.exception
        rows = decisions(run / "review.sqlite")
        assert [(r["sample"], r["decision"]) for r in rows] == [
            ("main/dicom/normal/000000.dcm", "accept")
        ]
        at.button(key="reject").click().run()  # the cursor moved on to the next sample
        # A fresh session (a reload) shows the stored decisions.
        again = AppTest.from_file(str(APP), default_timeout=60).run()
        progress = again.dataframe[0].value
        assert int(progress.loc[progress["class"] == "normal", "accepted"].iloc[0]) == 1
        assert int(progress.loc[progress["class"] == "normal", "rejected"].iloc[0]) == 1
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


def test_export_applies_corrected_label_and_cli(run, tmp_path):
    from typer.testing import CliRunner

    from medsynth.cli import app
    from medsynth.generation.dataset import load_pool

    manifest = _rows(run / "generate/main/manifest.csv")
    r = manifest[-1]
    decide(
        run / "review.sqlite",
        f"main/{r['path']}",
        "other",
        "accept",
        r["pixel_sha256"],
        corrected_label="normal",
    )
    out, n = export_accepted(run, "main", tmp_path / "exp", reviewer="other", link=True)
    assert n == 1 and (out / r["path"]).is_symlink()
    row = _rows(out / "manifest.csv")[0]
    assert row["class_name"] == "normal" and row["original_class"] == r["class_name"]
    assert load_pool(out, ["normal", "opacity"]).labels.tolist() == [0]  # usable as a pool
    res = CliRunner().invoke(app, ["review", "export", str(run), "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0 and "exported" in res.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_real_browser_screenshot(run, tmp_path):
    from tests.cdp import screenshot_when_images_loaded

    port = _free_port()
    env = dict(os.environ, STREAMLIT_BROWSER_GATHER_USAGE_STATS="false")
    app = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true", "--server.address",
         "127.0.0.1", "--server.port", str(port), "--client.toolbarMode", "viewer", "--", str(run)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline and app.poll() is None, "streamlit did not start"
                time.sleep(0.3)
        shot = tmp_path / "dashboard.png"
        n_images = screenshot_when_images_loaded(
            f"http://127.0.0.1:{port}/", shot, min_images=12, timeout=90
        )
        assert n_images >= 12 and shot.stat().st_size > 20_000
        keep = os.environ.get("MEDSYNTH_SCREENSHOT_DIR")
        if keep:
            shutil.copy(shot, Path(keep) / "dashboard.png")
    finally:
        app.terminate()
        app.wait(timeout=10)
