"""The review dashboard driven in a real headless Chromium: clicks, key presses, reloads.

Each integrity defect of issue 11 has a regression test here (they failed on the dashboard
before the fix). One Streamlit server per test on a fresh copy of a small run; one browser per
module. Skipped cleanly when Debian's chromium is not installed.
"""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests import cdp
from tests.cdp import button, radio_option, select, text_input

pytestmark = [
    pytest.mark.skipif(cdp.chromium() is None, reason="Debian's chromium is not installed"),
    pytest.mark.skipif(
        cdp.address_limit_blocks_chromium() is not None,
        reason=str(cdp.address_limit_blocks_chromium()),
    ),
]

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "dashboards" / "review.py"
DOCS = REPO / "docs"


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """The smoke study (pool ``main``: 10 normal + 10 opacity at 16 px, with memorization audit)
    plus a pool ``xray1024`` of three 1024² synthetic instances for full-resolution viewing."""
    from medsynth.dicom.write import pixel_sha256, synthetic_instance, write_instance
    from medsynth.experiment.runner import run_protocol
    from medsynth.generation.pool import MANIFEST_COLUMNS
    from medsynth.protocol import load_protocol

    run = tmp_path_factory.mktemp("browserrun") / "run"
    proto = load_protocol(REPO / "protocols/smoke.yaml", ["evaluation.seeds=1"])
    run_protocol(proto, run_dir=run, log=lambda s: None, progress=False)
    pool = run / "generate" / "xray1024"
    yy, xx = np.mgrid[-1:1:1024j, -1:1:1024j]
    rows = []
    for i in range(3):
        # Lungs-like ellipses with fine 1-px stripes: readable only at full resolution.
        img = -0.6 + 1.2 * (((xx - 0.45) ** 2 / 0.12 + yy**2 / 0.5) < 1) * 0.6
        img += 1.2 * (((xx + 0.45) ** 2 / 0.12 + yy**2 / 0.5) < 1) * 0.6
        img += 0.15 * ((np.arange(1024) % 2)[None, :] * (np.abs(yy) < 0.05)) + 0.05 * i
        ds = synthetic_instance(np.clip(img, -1, 1), run_id="e" * 64, pool="xray1024",
                                class_name="normal", class_index=0, seed=i, index=i, derivation="test")  # fmt: skip
        path = f"dicom/normal/{i:06d}.dcm"
        import hashlib

        data = write_instance(pool / path, ds)
        rows.append({"path": path, "SOPInstanceUID": ds.SOPInstanceUID, "class_name": "normal",
                     "class_index": "0", "index": str(i), "seed": str(i), "guidance_scale": "1.0",
                     "sampler": "test", "steps": "1", "snapshot_sha256": "x", "protocol_sha256": "x",
                     "pixel_sha256": pixel_sha256(ds), "file_sha256": hashlib.sha256(data).hexdigest(),
                     "medsynth_version": "test"})  # fmt: skip
    with (pool / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return run


@pytest.fixture(scope="module")
def browser():
    with cdp.Browser() as b:
        yield b


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app(base_run, tmp_path):
    """A Streamlit server on a fresh copy of the run; yields (base url, run folder)."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run, symlinks=True)
    port = _port()
    env = dict(os.environ, STREAMLIT_BROWSER_GATHER_USAGE_STATS="false", USER="server-user")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true",
         "--server.address", "127.0.0.1", "--server.port", str(port), "--server.fileWatcherType",
         "none", "--client.toolbarMode", "viewer", "--", str(run)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2):
                    break
            except OSError:
                assert time.time() < deadline and proc.poll() is None, "streamlit did not start"
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/", run
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _db(run: Path, reviewer: str | None = None) -> dict[str, dict]:
    from medsynth.review.db import decisions

    return {d["sample"]: d for d in decisions(run / "review.sqlite", reviewer)}


def _wait_decisions(run: Path, reviewer: str, n: int, timeout: float = 20) -> dict[str, dict]:
    deadline = time.time() + timeout
    while True:
        got = _db(run, reviewer)
        if len(got) >= n or time.time() > deadline:
            return got
        time.sleep(0.2)


def _open(b: cdp.Browser, url: str, view: str | None = None, reviewer: str | None = "alice"):
    b.goto(url + (f"?reviewer={reviewer}" if reviewer else ""))
    b.wait(radio_option("Samples"), 60, "the dashboard")
    if view:
        b.click(radio_option(view))
    b.idle()


def _text(b: cdp.Browser) -> str:
    return b.js(cdp.page_text())


def _decide(b: cdp.Browser, run: Path, key: str, reviewer: str, n: int) -> dict[str, dict]:
    b.press(key)
    got = _wait_decisions(run, reviewer, n)
    b.idle()
    return got


# ---------------------------------------------------------------- integrity defects (1-8)


def test_label_and_note_do_not_carry_over(browser, app):
    url, run = app
    _open(browser, url, "Review")
    select(browser, "Corrected label", "opacity")
    browser.idle()
    browser.type(text_input("Note"), "bright corner")
    browser.idle()
    _decide(browser, run, "a", "alice", 1)
    for i, key in enumerate("axu"):
        got = _decide(browser, run, key, "alice", i + 2)
    first = got.pop("main/dicom/normal/000000.dcm")
    assert (first["corrected_label"], first["note"]) == ("opacity", "bright corner")
    assert len(got) == 3
    assert all(d["corrected_label"] is None and d["note"] == "" for d in got.values()), got
    assert "Saved:" in _text(browser)  # the visible confirmation


def test_relabel_changes_every_place_the_label_lives(browser, app):
    import pydicom

    url, run = app
    _open(browser, url, "Review")
    select(browser, "Corrected label", "opacity")
    browser.idle()
    _decide(browser, run, "a", "alice", 1)
    browser.click(radio_option("Export"))
    browser.idle()
    assert "Relabelled (1)" in _text(browser)  # the preview says so before writing
    browser.click(button("Export 1 samples"))
    browser.wait("document.body.innerText.includes('Exported 1')", 30)
    out = run / "generate" / "main-accepted"
    (row,) = list(csv.DictReader((out / "manifest.csv").open()))
    assert (row["class_name"], row["class_index"], row["original_class"]) == (
        "opacity",
        "1",
        "normal",
    )
    assert row["path"].startswith("dicom/opacity/")
    ds = pydicom.dcmread(out / row["path"])
    assert ds.SeriesDescription == "SYNTHETIC opacity"
    block = ds.private_block(0x0011, "MEDSYNTH 1")
    assert (block[0x01].value, str(block[0x02].value)) == ("opacity", "1")
    assert ds.SOPInstanceUID == row["SOPInstanceUID"] != _manifest(run)[0]["SOPInstanceUID"]
    src = pydicom.dcmread(run / "generate/main/dicom/normal/000000.dcm")
    assert ds.PixelData == src.PixelData


def _manifest(run: Path, pool: str = "main") -> list[dict]:
    return list(csv.DictReader((run / "generate" / pool / "manifest.csv").open()))


def test_keys_act_only_on_the_review_view(browser, app):
    url, run = app
    for view in ("Samples", "Compare", "Export"):
        _open(browser, url, view)
        browser.press("a")
        time.sleep(1.5)
        assert _db(run) == {}, f"a key on {view} recorded a decision"
    browser.click(radio_option("Review"))
    browser.idle()
    assert list(_decide(browser, run, "a", "alice", 1)) == ["main/dicom/normal/000000.dcm"]


def test_unreviewed_filter_keeps_the_sample_and_skips_none(browser, app):
    url, run = app
    _open(browser, url, "Review")
    for i in range(8):
        _decide(browser, run, "a", "alice", i + 1)
    select(browser, "Review status", "unreviewed")
    browser.idle()
    assert "#8 class normal" in _text(browser)
    got = _decide(browser, run, "x", "alice", 9)
    assert got["main/dicom/normal/000008.dcm"]["decision"] == "reject"
    got = _decide(browser, run, "u", "alice", 10)
    assert got["main/dicom/normal/000009.dcm"]["decision"] == "unsure"
    assert "#0 class opacity" in _text(browser)


def test_blank_reviewer_is_asked_for_not_a_traceback(browser, app):
    url, run = app
    _open(browser, url, "Review", reviewer=None)
    text = _text(browser)
    assert "Enter your name" in text and "server-user" not in text  # not the server's $USER
    browser.press("a")
    time.sleep(1.5)
    browser.js(f"({button('Accept')}).click()")  # a disabled button ignores the click
    time.sleep(1.0)
    text = _text(browser)
    assert "ValueError" not in text and "Traceback" not in text
    assert _db(run) == {}


def test_reviewer_name_survives_reload_and_is_per_browser(browser, app):
    url, run = app
    _open(browser, url, "Review", reviewer=None)
    browser.type(text_input("Reviewer"), "dr-bob")
    browser.wait("location.search.includes('reviewer=dr-bob')", 20, "the name in the URL")
    here = browser.js("location.href")
    browser.goto(here)
    browser.wait(radio_option("Review"), 60)
    browser.idle()
    assert browser.js(f"({text_input('Reviewer')}).value") == "dr-bob"
    browser.click(radio_option("Review"))
    browser.idle()
    assert list(_decide(browser, run, "a", "dr-bob", 1)) == ["main/dicom/normal/000000.dcm"]
    _open(browser, url, "Review", reviewer=None)  # another reviewer's fresh page
    assert browser.js(f"({text_input('Reviewer')}).value") == ""


def test_export_never_wipes_an_earlier_export(browser, app):
    from medsynth.review.db import decide
    from medsynth.review.export import export_accepted

    url, run = app
    for r in _manifest(run)[:5]:
        decide(run / "review.sqlite", f"main/{r['path']}", "team", "accept", r["pixel_sha256"])
    export_accepted(run, "main")
    team = (run / "generate/main-accepted/manifest.csv").read_bytes()
    _open(browser, url, "Export", reviewer="carol")  # carol decided nothing
    browser.click(
        "Array.from(document.querySelectorAll('label')).find(l => l.innerText.includes('Only my decisions'))"
    )
    browser.idle()
    assert "nothing to export" in _text(browser)
    browser.js(f"({button('Export 0 samples')}).click()")
    time.sleep(1.0)
    assert (run / "generate/main-accepted/manifest.csv").read_bytes() == team
    browser.click(
        "Array.from(document.querySelectorAll('label')).find(l => l.innerText.includes('Only my decisions'))"
    )
    browser.idle()
    browser.click(button("Export 5 samples"))
    browser.wait("document.body.innerText.includes('Exported 5')", 30)
    assert (run / "generate/main-accepted/manifest.csv").read_bytes() == team
    assert len(_manifest(run, "main-accepted-2")) == 5
    # Export folders are not offered as pools to review.
    browser.click(cdp.select_open("Pool"))
    options = browser.wait(cdp.options())
    assert options == ["main", "xray1024"]


def test_an_empty_database_file_is_no_traceback(browser, app):
    url, run = app
    (run / "review.sqlite").write_bytes(b"")  # `: > RUN/review.sqlite`
    _open(browser, url, "Review")
    text = _text(browser)
    assert "OperationalError" not in text and "no such table" not in text
    assert list(_decide(browser, run, "a", "alice", 1)) == ["main/dicom/normal/000000.dcm"]
