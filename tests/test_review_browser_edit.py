"""Edited pools in the review dashboard, driven in a real headless Chromium (issue 14).

What a reviewer of an edited pool sees and does: source | edit | difference | mask side by side
as images, the EDITED (derived from a patient image) notice in every view, Next and a decision
that survive a reload; and a plain pool shows no edit panels. One tiny run (16 px phantoms,
a few steps) is built once for the module and served by one Streamlit server; each test opens
a new page (a new Streamlit session) with an empty review database. Skipped cleanly when
Debian's chromium is not installed (helpers shared with ``tests/test_review_browser.py``).
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest

from tests import cdp
from tests.cdp import button, radio_option, select
from tests.test_review_browser import _see as _see_within
from tests.test_review_browser import _text, _wait_decisions

pytestmark = [
    pytest.mark.skipif(cdp.chromium() is None, reason="Debian's chromium is not installed"),
    pytest.mark.skipif(
        cdp.address_limit_blocks_chromium() is not None,
        reason=str(cdp.address_limit_blocks_chromium()),
    ),
]

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "dashboards" / "review.py"

# Like tests/test_edit.py, smaller: 3 sources per edit pool, 2 plain samples per class.
YAML = """\
name: editbrowser
dataset:
  kind: phantoms
  spatial_size: 16
  workers: 1
  phantoms: {n_patients: 20, size_px: 32}
model:
  channels: [16, 32]
  attention_levels: [false, true]
  num_head_channels: 16
training: {max_steps: 10, batch_size: 8, checkpoint_every_steps: 10, warmup_steps: 5}
generation: {per_class: 2, steps: 3, batch_size: 4}
edit:
  max_sources: 3
  steps: 4
  batch_size: 3
  inpaint: {mask: "rect:4,3,12,10", jump_length: 2, resamplings: 1}
  vary: {strength: 0.4}
"""
MASK = (slice(3, 10), slice(4, 12))  # rows, columns of rect:4,3,12,10 at 16 px
PANEL_PX = 256  # dashboards/review_views.COMPARE_PX

# Every st.image on the page (the full-resolution view is an iframe, not one of these).
IMAGES = """Array.from(document.querySelectorAll('[data-testid="stImageContainer"]')).map(c => {
  const i = c.querySelector('img'), cap = c.querySelector('[data-testid="stImageCaption"]');
  const r = i ? i.getBoundingClientRect() : {x: 0, y: 0, width: 0};
  const col = c.closest('[data-testid="stColumn"]'), k = col ? col.getBoundingClientRect() : null;
  return {loaded: !!(i && i.complete && i.naturalWidth > 0), w: i ? i.naturalWidth : 0,
          h: i ? i.naturalHeight : 0, x: r.x, y: r.y, shown: r.width,
          column: k ? [k.x, k.x + k.width] : null, caption: cap ? cap.innerText.trim() : ''};
})"""
FULLRES_IMG = "document.querySelector('iframe').contentDocument.getElementById('fullres')"
# Seconds to wait for a render: the 2-core machine these tests share can take a minute to show
# the first page (measured 50-60 s under load), so the shared helpers' 20-60 s are too short.
SLOW = 90


@pytest.fixture(scope="module")
def edit_run(tmp_path_factory) -> Path:
    """Ingest + 10 training steps + pool ``main`` (2 per class) + edited pools ``inpaint``
    (counterfactual, rect mask) and ``vary`` (SDEdit s=0.4, same class), 3 sources each."""
    from medsynth.data.ingest import ingest_dataset
    from medsynth.generation.api import edit_from_protocol, generate_from_protocol
    from medsynth.protocol import parse_protocol
    from medsynth.training.api import train_from_sections

    run = tmp_path_factory.mktemp("editbrowser") / "run"
    proto = parse_protocol(YAML)
    ingest_dataset(proto.dataset, run)
    train_from_sections(
        run / "ingest", run / "train", proto.model, proto.schedule, proto.training, progress=False
    )
    generate_from_protocol(proto, run, progress=False)
    for kind in ("inpaint", "vary"):
        assert edit_from_protocol(proto, run, kind, progress=False)["pool_complete"]
    return run


@pytest.fixture(scope="module")
def browser():
    with cdp.Browser() as b:
        yield b


@pytest.fixture(scope="module")
def server(edit_run):
    """One Streamlit server for the module on the run; yields its base URL."""
    with cdp.streamlit_server(APP, edit_run, USER="server-user") as url:
        yield url


@pytest.fixture
def app(server, edit_run, browser):
    """A new page on the served run with no review decisions yet; yields (url, run)."""
    browser.goto("about:blank")
    (edit_run / "review.sqlite").unlink(missing_ok=True)
    return server, edit_run


def _open(b: cdp.Browser, url: str, view: str) -> None:
    """A new page (a new Streamlit session) as reviewer alice, on ``view``."""
    b.goto(url + "?reviewer=alice")
    b.wait(radio_option("Samples"), 4 * SLOW, "the dashboard")
    b.idle(timeout=SLOW)
    b.click(radio_option(view))
    b.idle(timeout=SLOW)


def _see(b: cdp.Browser, *texts: str) -> str:
    return _see_within(b, *texts, timeout=SLOW)


def _click_then_see(b: cdp.Browser, label: str, text: str) -> None:
    """Click a button once the page is idle and wait for ``text`` (no second click: under load
    a late first click and a retry would step two samples)."""
    b.idle(timeout=SLOW)
    b.click(button(label))
    b.wait(f"document.body.innerText.includes({json.dumps(text)})", SLOW, text)


def _rows(run: Path, pool: str) -> list[dict]:
    """The pool's manifest in the dashboard's order (class index, then pool index)."""
    from medsynth.generation.dataset import read_manifest

    rows = read_manifest(run / "generate" / pool)
    return sorted(rows, key=lambda r: (int(r["class_index"]), int(r["index"]), r["path"]))


def _images(b: cdp.Browser, n: int, what: str) -> list[dict]:
    """Wait until exactly ``n`` st.image elements have loaded; returns them left to right."""
    js = f"(() => {{ const p = {IMAGES}; return p.length === {n} && p.every(x => x.loaded) ? p : null; }})()"
    try:
        got = b.wait(js, SLOW, what)
    except TimeoutError:
        got = b.js(IMAGES)
        raise AssertionError(f"{what}: want {n} loaded images, the page has {got}") from None
    return sorted(got, key=lambda p: (round(p["y"]), p["x"]))


def _png(b: cdp.Browser, img_js: str) -> np.ndarray:
    """The pixels the browser received for the image ``img_js``: (H, W, 3) uint8."""
    from PIL import Image

    data = b.js(
        f"(async () => {{ const r = await fetch(({img_js}).src);"
        " const a = new Uint8Array(await r.arrayBuffer()); let s = '';"
        " for (let i = 0; i < a.length; i++) s += String.fromCharCode(a[i]); return btoa(s); })()"
    )
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def _banner_says(pixels: np.ndarray) -> str:
    """Which marker the red banner above an image carries (EDITED, SYNTHETIC or '?')."""
    from PIL import Image

    from medsynth.review.viewer import _banner, banner_px

    h, w = banner_px(pixels.shape[1]), pixels.shape[1]
    for text in ("EDITED", "SYNTHETIC"):
        ref = np.asarray(_banner(Image.new("RGB", (w, 1)), text, (200, 30, 30)))[:h]
        if np.array_equal(pixels[:h], ref):
            return text
    return "?"


def _panel_img(caption_start: str) -> str:
    return (
        "Array.from(document.querySelectorAll('[data-testid=\"stImageContainer\"]')).find(c => "
        "(c.querySelector('[data-testid=\"stImageCaption\"]') || {innerText: ''}).innerText"
        f".trim().startsWith({json.dumps(caption_start)})).querySelector('img')"
    )


def test_edited_sample_shows_source_edit_difference_mask(browser, app):
    from medsynth.review.viewer import banner_px

    url, run = app
    _open(browser, url, "Review")
    select(browser, "Pool", "inpaint")
    browser.idle(timeout=SLOW)
    r = _rows(run, "inpaint")[0]
    text = _see(browser, "EDITED (derived from a patient image) sample 1 / 3")
    assert (
        f"#{r['index']} class {r['class_name']} from a {r['source_class']} source, "
        f"inpaint strength {r['strength']}, seed {r['seed']}"
    ) in text
    assert "SYNTHETIC sample" not in text
    # Four images side by side on one row, at one size, in this order.
    panels = _images(browser, 4, "source | edit | difference | mask")
    assert [p["caption"] for p in panels] == [
        f"REAL source · cache row {r['source_row']} · {r['source_class']}",
        f"EDITED (inpaint) · {r['class_name']}",
        panels[2]["caption"],
        f"mask · {r['mask']}",
    ]
    assert panels[2]["caption"].startswith("|edit − source| (max ")
    assert max(p["y"] for p in panels) - min(p["y"] for p in panels) < 2
    assert {(p["w"], p["h"]) for p in panels} == {(PANEL_PX, PANEL_PX)}
    shown = [p["shown"] for p in panels]
    assert max(shown) - min(shown) < 1.5 and min(shown) > 100, panels
    # Each panel stays inside its own column: none covers part of its neighbour (at 1400 px
    # with the sidebar open, fixed 256-px images overlapped one another).
    for p in panels:
        assert p["column"][0] - 0.5 <= p["x"] and p["x"] + p["shown"] <= p["column"][1] + 0.5, p
    # The mask panel is this rectangle; the difference is inside it (12-bit rounding outside).
    k = PANEL_PX // 16
    inside = np.zeros((PANEL_PX, PANEL_PX), bool)
    inside[MASK[0].start * k : MASK[0].stop * k, MASK[1].start * k : MASK[1].stop * k] = True
    mask = _png(browser, _panel_img("mask"))[..., 0]
    assert np.array_equal(mask > 127, inside)
    diff = _png(browser, _panel_img("|edit"))[..., 0]
    assert diff[inside].max() == 255 and diff[~inside].max() <= 8
    # The full-resolution view shows the edit at native size under an EDITED banner.
    browser.wait(f"{FULLRES_IMG} && {FULLRES_IMG}.complete && {FULLRES_IMG}.naturalWidth", SLOW)
    size = browser.js(f"[{FULLRES_IMG}.naturalWidth, {FULLRES_IMG}.naturalHeight]")
    assert size == [16, 16 + banner_px(16)]
    full = _png(browser, FULLRES_IMG)
    assert _banner_says(full) == "EDITED"


def test_next_and_decisions_on_edits_survive_a_reload(browser, app):
    url, run = app
    rows = _rows(run, "inpaint")
    _open(browser, url, "Review")
    _see(browser, "EDITED (derived from a patient image) sample 1 / 3")
    _click_then_see(browser, "Next ▶", "sample 2 / 3")
    _see(browser, f"#{rows[1]['index']} class {rows[1]['class_name']}")
    _images(browser, 4, "the second edit's panels")
    _see(browser, f"REAL source · cache row {rows[1]['source_row']}")
    # Accept with the button, reject the next one (shown after the accept) with its key.
    browser.idle(timeout=SLOW)
    browser.click(button("Accept"))
    assert len(_wait_decisions(run, "alice", 1, timeout=SLOW)) == 1
    _see(browser, f"Saved: accept on sample #{rows[1]['index']}", "sample 3 / 3")
    browser.idle(timeout=SLOW)
    browser.press("x")
    got = _wait_decisions(run, "alice", 2, timeout=SLOW)
    assert {k: (d["decision"], d["pixel_sha256"]) for k, d in got.items()} == {
        f"inpaint/{rows[1]['path']}": ("accept", rows[1]["pixel_sha256"]),
        f"inpaint/{rows[2]['path']}": ("reject", rows[2]["pixel_sha256"]),
    }
    # A reload starts a new session on the first sample; the decisions are still there.
    browser.js("window.beforeReload = true")
    browser.call("Page.reload")
    browser.wait(f"!window.beforeReload && {radio_option('Review')}", 4 * SLOW, "the reloaded page")
    browser.idle(timeout=SLOW)
    browser.click(radio_option("Review"))
    browser.idle(timeout=SLOW)
    _see(browser, "sample 1 / 3", "Your decision: none yet")
    _click_then_see(browser, "Next ▶", "sample 2 / 3")
    _see(browser, "Your decision: accept · all reviewers: accept")
    _click_then_see(browser, "Next ▶", "sample 3 / 3")
    _see(browser, "Your decision: reject · all reviewers: reject")
    _images(browser, 4, "the third edit's panels")


def test_variation_has_no_mask_panel_and_a_plain_pool_no_edit_panels(browser, app):
    url, run = app
    _open(browser, url, "Review")
    select(browser, "Pool", "vary")
    browser.idle(timeout=SLOW)
    r = _rows(run, "vary")[0]
    _see(browser, "EDITED (derived from a patient image) sample 1 / 3", "vary strength 0.4")
    panels = _images(browser, 3, "source | edit | difference of a variation")
    assert [p["caption"].split(" ")[0] for p in panels] == ["REAL", "EDITED", "|edit"]
    assert panels[1]["caption"] == f"EDITED (vary) · {r['class_name']}"
    select(browser, "Pool", "main")
    browser.idle(timeout=SLOW)
    _see(browser, "SYNTHETIC sample 1 / 4")
    browser.wait(f"{FULLRES_IMG} && {FULLRES_IMG}.complete && {FULLRES_IMG}.naturalWidth", SLOW)
    full = _png(browser, FULLRES_IMG)
    assert _banner_says(full) == "SYNTHETIC"
    text = _text(browser)
    for word in ("EDITED", "derived from a patient", "REAL source", "|edit − source|", "mask ·"):
        assert word not in text, f"{word!r} on a plain pool's Review view"
    assert browser.js(IMAGES) == []


def test_samples_and_dicom_views_of_an_edited_pool_say_edited(browser, app):
    url, run = app
    _open(browser, url, "Samples")
    select(browser, "Pool", "inpaint")
    browser.idle(timeout=SLOW)
    text = _see(browser, "3 of 3 samples match")
    tiles = _images(browser, 3, "the edited pool's tiles")
    assert [t["caption"] for t in tiles] == [f"#{r['index']}" for r in _rows(run, "inpaint")]
    # Not "Every tile is SYNTHETIC": these pixels come from training patients' images.
    assert "Every tile is SYNTHETIC" not in text
    assert "Every tile is EDITED from a training patient's image" in text
    first_tile = "document.querySelector('[data-testid=\"stImageContainer\"] img')"
    assert _banner_says(_png(browser, first_tile)) == "EDITED"
    browser.click(radio_option("DICOM"))
    browser.idle(timeout=SLOW)
    r = _rows(run, "inpaint")[0]
    _see(
        browser,
        f"EDITED instance #{r['index']} ({r['class_name']}, derived from a patient image, "
        "as written)",
    )
    # A plain pool keeps the SYNTHETIC wording and banner.
    browser.click(radio_option("Samples"))
    browser.idle(timeout=SLOW)
    select(browser, "Pool", "main")
    browser.idle(timeout=SLOW)
    _see(browser, "4 of 4 samples match", "Every tile is SYNTHETIC")
    _images(browser, 4, "the plain pool's tiles")
    assert _banner_says(_png(browser, first_tile)) == "SYNTHETIC"
    browser.click(radio_option("DICOM"))
    browser.idle(timeout=SLOW)
    first = _rows(run, "main")[0]
    _see(browser, f"Synthetic instance #{first['index']} ({first['class_name']}, as written)")
