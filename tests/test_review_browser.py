"""The review dashboard driven in a real headless Chromium: clicks, key presses, reloads.

Each integrity defect of issue 11 has a regression test here (they failed on the dashboard
before the fix). One Streamlit server per test on a fresh copy of a small run; one browser per
module. Skipped cleanly when Debian's chromium is not installed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import time
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
    from medsynth.data.phantoms import draw_anatomy, render

    rows = []
    for i in range(3):
        # A phantom chest radiograph at 1024 px (fine texture is readable only at full size).
        rng = np.random.default_rng(i)
        img = render(draw_anatomy(rng), "opacity" if i else "normal", 0.3, 1024, rng) * 2 - 1
        ds = synthetic_instance(
            np.clip(img, -1, 1),
            run_id="e" * 64,
            pool="xray1024",
            class_name="normal",
            class_index=0,
            seed=i,
            index=i,
            derivation="test",
        )
        path = f"dicom/normal/{i:06d}.dcm"
        import hashlib

        data = write_instance(pool / path, ds)
        rows.append(
            {
                "path": path,
                "SOPInstanceUID": ds.SOPInstanceUID,
                "class_name": "normal",
                "class_index": "0",
                "index": str(i),
                "seed": str(i),
                "guidance_scale": "1.0",
                "sampler": "test",
                "steps": "1",
                "snapshot_sha256": "x",
                "protocol_sha256": "x",
                "pixel_sha256": pixel_sha256(ds),
                "file_sha256": hashlib.sha256(data).hexdigest(),
                "medsynth_version": "test",
            }
        )
    with (pool / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return run


@pytest.fixture(scope="module")
def browser():
    with cdp.Browser() as b:
        yield b


@pytest.fixture(scope="module")
def server(base_run, tmp_path_factory):
    """One Streamlit server for the module on a copy of the run; yields (base url, run folder)."""
    run = tmp_path_factory.mktemp("served") / "run"
    shutil.copytree(base_run, run, symlinks=True)
    with cdp.streamlit_server(APP, run, USER="server-user") as url:
        yield url, run


@pytest.fixture
def app(server, base_run, browser):
    """The served run as the smoke study left it: no decisions, no exports, the original audit.
    Each test opens a new page, i.e. a new Streamlit session."""
    url, run = server
    browser.goto("about:blank")
    for p in (run / "review.sqlite", *(run / "generate").glob("*-accepted*")):
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    shutil.copy(base_run / "evaluate/memorization.json", run / "evaluate/memorization.json")
    return url, run


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


def _see(b: cdp.Browser, *texts: str, timeout: float = 20) -> str:
    """Wait until the page shows every one of ``texts``; returns the page text."""
    js = " && ".join(f"document.body.innerText.includes({json.dumps(t)})" for t in texts)
    try:
        b.wait(js, timeout, f"{texts} on the page")
    except TimeoutError:
        pass  # the assertion below shows the page text
    text = _text(b)
    for t in texts:
        assert t in text, f"{t!r} not on the page: {text[-1500:]!r}"
    return text


def _click_then_see(b: cdp.Browser, label: str, text: str, timeout: float = 15) -> None:
    """Click a button and wait for ``text``; a click that fell between two renders (nothing
    happened) is repeated once."""
    b.idle()
    b.click(button(label))
    try:
        b.wait(f"document.body.innerText.includes({json.dumps(text)})", timeout, text)
    except TimeoutError:
        b.idle()
        if b.js(f"!!({button(label)})"):
            b.click(button(label))
        b.wait(f"document.body.innerText.includes({json.dumps(text)})", 30, text)


SAVED_LINE = (
    "(document.body.innerText.split('\\n').find(l => l.startsWith('Saved:') || "
    "l.startsWith('Cleared')) || '')"
)


def _decide(b: cdp.Browser, run: Path, key: str, reviewer: str, n: int) -> dict[str, dict]:
    """Press a decision key and wait until it is stored and the page has re-rendered after it
    (a key pressed while the page is still being replaced can be lost: press it again then)."""
    before = b.js(SAVED_LINE)
    b.press(key)
    got = _wait_decisions(run, reviewer, n, timeout=8)
    if len(got) < n:  # the press fell between two renders: nothing was stored, try once more
        b.idle()
        b.press(key)
        got = _wait_decisions(run, reviewer, n)
    b.wait(f"{SAVED_LINE} !== {json.dumps(before)}", 20, "the saved confirmation")
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
    _see(browser, "Relabelled (1)")  # the preview says so before writing
    _click_then_see(browser, "Export 1 samples", "Exported 1")
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
    _see(browser, "#8 class normal")
    got = _decide(browser, run, "x", "alice", 9)
    assert got["main/dicom/normal/000008.dcm"]["decision"] == "reject"
    got = _decide(browser, run, "u", "alice", 10)
    assert got["main/dicom/normal/000009.dcm"]["decision"] == "unsure"
    _see(browser, "#0 class opacity")


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
    _click_then_see(browser, "Export 5 samples", "Exported 5")
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


# ---------------------------------------------------------------- a reviewer's tool


def _small_png(src: Path, name: str, limit: int = 300_000) -> None:
    """Save a screenshot for the docs under ``limit`` bytes (palette PNG, shrunk if still too
    big), only when ``MEDSYNTH_SCREENSHOT_DIR`` names a folder (e.g. docs/): tests never write
    into the repository by themselves."""
    from PIL import Image

    keep = os.environ.get("MEDSYNTH_SCREENSHOT_DIR")
    if not keep:
        return
    dst = Path(keep) / name

    im = Image.open(src).convert("RGB")
    while True:
        im.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(dst, optimize=True)
        if dst.stat().st_size < limit:
            return
        im = im.resize((im.width * 4 // 5, im.height * 4 // 5), Image.Resampling.LANCZOS)


from medsynth.review.viewer import banner_px  # noqa: E402

FULLRES_IMG = "document.querySelector('iframe').contentDocument.getElementById('fullres')"


def test_full_resolution_view_zooms_and_windows(browser, app, tmp_path):
    url, run = app
    _open(browser, url, None)
    select(browser, "Pool", "xray1024")
    browser.idle()
    browser.click(radio_option("Review"))
    browser.idle()
    browser.wait(f"{FULLRES_IMG} && {FULLRES_IMG}.complete && {FULLRES_IMG}.naturalWidth", 30)
    # Native resolution: 1024 px wide, plus the SYNTHETIC banner above (not over) the image.
    size = browser.js(f"[{FULLRES_IMG}.naturalWidth, {FULLRES_IMG}.naturalHeight]")
    assert size == [1024, 1024 + banner_px(1024)]
    frame = "document.querySelector('iframe').contentDocument"
    zoom = f"{frame}.getElementById('zl').innerText"
    fit = browser.js(zoom)
    browser.js(f"{frame}.getElementById('one').click()")
    assert browser.js(zoom) == "100 %" != fit
    before = browser.js(f"{FULLRES_IMG}.src.length")
    browser.js(f"{frame}.getElementById('fit').click()")
    # Window/level in the image's own units: the stored window of a medsynth file is 0 / 2.
    browser.click(
        "Array.from(document.querySelectorAll('summary')).find(s => s.innerText.includes('Window'))"
    )
    browser.idle()
    assert browser.js(f"({text_input('Center')}).value") == "0.000"
    assert browser.js(f"({text_input('Width')}).value") == "2.000"
    browser.click(button("Narrow"))
    browser.idle()
    assert browser.js(f"({text_input('Width')}).value") == "1.000"
    browser.wait(
        f"{FULLRES_IMG} && {FULLRES_IMG}.src.length !== {before}", 30, "a re-windowed image"
    )
    shot = tmp_path / "full.png"
    browser.screenshot(shot)
    _small_png(shot, "review_fullres.png")
    browser.click(button("Reset"))
    browser.idle()
    assert browser.js(f"({text_input('Width')}).value") == "2.000"


def test_disagreements_adjudication_and_agreement(browser, app, tmp_path):
    from medsynth.review.db import adjudications, decide

    url, run = app
    rows = _manifest(run)
    db = run / "review.sqlite"
    for i, r in enumerate(rows[:6]):
        k = f"main/{r['path']}"
        decide(db, k, "alice", "accept", r["pixel_sha256"])
        other = ("reject", "accept", "unsure")[i % 3]
        decide(db, k, "bob", other, r["pixel_sha256"], note="edge artefact" if i == 0 else "")
    _open(browser, url, "Disagreements", reviewer="carol")
    _see(browser, "Samples where reviewers differ (4)", "alice", "bob")
    shot = tmp_path / "dis.png"
    browser.screenshot(shot)
    _small_png(shot, "review_disagreements.png")
    browser.click(button("Adjudicate"))
    browser.wait("document.body.innerText.includes('Saved: adjudication')", 30)
    (adj,) = adjudications(db)
    assert (adj["sample"], adj["adjudicator"], adj["decision"]) == (
        f"main/{rows[0]['path']}",
        "carol",
        "accept",
    )
    browser.click(radio_option("Metrics"))
    browser.idle()
    from medsynth.review.agreement import cohen_kappa, fleiss_kappa

    alice, bob = ["accept"] * 6, ["reject", "accept", "unsure"] * 2
    k, f = cohen_kappa(alice, bob), fleiss_kappa([list(x) for x in zip(alice, bob, strict=True)])
    _see(browser, f"Fleiss' κ = {f:.2f} over 6 samples", f"Cohen's κ alice / bob: {k:.2f} over 6")


def test_tile_opens_review_and_every_view_follows_it(browser, app):
    url, run = app
    _open(browser, url, "Samples")
    _see(browser, "normal (10 samples)", "opacity (10 samples)")
    # Open opacity #3 (Streamlit names a widget's container after its key).
    browser.click("document.querySelector('.st-key-open-main-dicom-opacity-000003-dcm button')")
    browser.idle()
    _see(browser, "#3 class opacity")
    browser.click(radio_option("Compare"))
    browser.idle()
    _see(browser, "Sample #3 (opacity)", "nearest by pixel: class")
    browser.click(radio_option("DICOM"))
    browser.idle()
    _see(browser, "Synthetic instance #3 (opacity")


def test_unreviewed_by_me_clear_undo_and_keyboard_help(browser, app):
    from medsynth.review.db import decide

    url, run = app
    first = _manifest(run)[0]
    decide(run / "review.sqlite", f"main/{first['path']}", "bob", "reject", first["pixel_sha256"])
    _open(browser, url, "Review")
    select(browser, "Review status", "unreviewed by me")
    browser.idle()
    _see(browser, "#0 class normal")  # bob's decision does not hide it from alice
    _decide(browser, run, "a", "alice", 1)
    _see(browser, "Saved: accept on sample #0")
    browser.click(button("Undo last decision (#0)"))
    browser.idle()
    _see(browser, "Cleared your decision", "#0 class normal")
    assert _db(run, "alice") == {}  # back on the sample whose decision was undone
    browser.click(
        "Array.from(document.querySelectorAll('summary')).find(s => s.innerText.includes('Keyboard'))"
    )
    _see(browser, "a accept · x reject · u unsure")


def test_export_preview_offers_to_exclude_flagged(browser, app):
    import json

    from medsynth.review.db import decide

    url, run = app
    rows = _manifest(run)
    memo_path = run / "evaluate" / "memorization.json"
    memo = json.loads(memo_path.read_text())
    paths = memo["main"]["synthetic_paths"]
    flags = [False] * len(paths)
    flags[paths.index(rows[1]["path"])] = True  # pretend the audit flagged sample #1
    memo["main"]["per_sample"]["flagged"] = flags
    memo_path.write_text(json.dumps(memo))
    for r in rows[:3]:
        decide(run / "review.sqlite", f"main/{r['path']}", "alice", "accept", r["pixel_sha256"])
    _open(browser, url, "Export")
    _see(
        browser,
        "Exclude memorization-flagged samples (1 accepted)",
        "Left out as possible copies: dicom/normal/000001.dcm",
    )
    _click_then_see(browser, "Export 2 samples", "Exported 2")
    assert [r["path"] for r in _manifest(run, "main-accepted")] == [
        rows[0]["path"],
        rows[2]["path"],
    ]


def test_review_names_autoguidance_when_the_pool_was_autoguided(browser, app):
    url, run = app
    _open(browser, url, "Review")
    _see(browser, "SYNTHETIC sample 1", "guidance 1")
    assert "autoguidance" not in _text(browser)
    pool = run / "generate" / "main"
    request, manifest = pool / "request.json", pool / "manifest.csv"
    plain, listed = request.read_text(), manifest.read_text()
    try:
        request.write_text(json.dumps(json.loads(plain) | {"guide_snapshot_sha256": "f" * 64}))
        # A class left at scale 1 in an autoguided pool was drawn without the guide.
        _open(browser, url, "Review")
        _see(browser, "SYNTHETIC sample 1", "guidance 1")
        assert "autoguidance" not in _text(browser)
        rows = list(csv.DictReader(io.StringIO(listed)))
        with manifest.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(r | {"guidance_scale": "1.5"} for r in rows)
        _open(browser, url, "Review")
        _see(browser, "SYNTHETIC sample 1", "autoguidance 1.5")
        # Autoguidance for the other classes only: this class was guided from the null class.
        first = rows[0]["class_name"]
        others = sorted({r["class_name"] for r in rows} - {first})
        request.write_text(
            json.dumps(
                json.loads(plain)
                | {"guide_snapshot_sha256": "f" * 64, "autoguided_classes": others}
            )
        )
        _open(browser, url, "Review")
        _see(browser, "SYNTHETIC sample 1", f"class {first}", "guidance 1.5")
        assert "autoguidance" not in _text(browser)
    finally:
        request.write_text(plain)
        manifest.write_text(listed)
