"""Review synthetic samples of a medsynth run: look, compare, decide, adjudicate, export.

    streamlit run dashboards/review.py -- RUN_FOLDER

Reads the run folder; writes only RUN/review.sqlite (and exports on request). One view is
rendered at a time (a radio, not tabs), so keyboard shortcuts exist only on the Review view and
act on the sample it shows. The current sample is kept as a key, not a list position; the
reviewer's name lives in the URL (``?reviewer=``) so it survives reloads and is per person.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

import review_views as views  # noqa: E402

from medsynth.generation.dataset import read_manifest  # noqa: E402
from medsynth.review import navigation  # noqa: E402
from medsynth.review.db import DECISIONS, clear, db_path, decide, status_by_sample  # noqa: E402
from medsynth.review.export import is_export, sample_key  # noqa: E402
from medsynth.review.viewer import presets as presets_of  # noqa: E402
from medsynth.review.viewer import value_range, zoom_pan_html  # noqa: E402

st.set_page_config(page_title="medsynth review", layout="wide")
VIEWS = ["Samples", "Review", "Compare", "Disagreements", "Metrics", "DICOM", "Export"]
KEYS_HELP = "a accept · x reject · u unsure · z clear my decision · j next · k previous"


def run_folder() -> Path | None:
    # `streamlit run review.py -- RUN` sets argv to [review.py, RUN]; tests set MEDSYNTH_RUN.
    from_argv = len(sys.argv) > 1 and sys.argv[0].endswith("review.py")
    arg = sys.argv[1] if from_argv else os.environ.get("MEDSYNTH_RUN", "")
    value = st.sidebar.text_input("Run folder", value=arg)
    return Path(value) if value else None


@st.cache_data(show_spinner=False)
def manifest(pool_dir: str, mtime: float) -> list[dict]:
    rows = read_manifest(pool_dir)
    # Display order: grouped by class (in class-index order), then pool order.
    return sorted(rows, key=lambda r: (int(r["class_index"]), int(r["index"]), r["path"]))


@st.cache_data(show_spinner=False, max_entries=200)
def auto_window(path: str) -> tuple[float, float]:
    """(center, width) covering the 1st-99th percentile of this image, in modality units."""
    return presets_of(path)["auto (1–99 %)"]


@st.cache_data(show_spinner=False)
def window_range(path: str) -> tuple[float, float, float, float]:
    vr = value_range(path)
    return vr.low, vr.high, vr.center, vr.width


run = run_folder()
if run is None or not (run / "generate").is_dir():
    st.title("medsynth review")
    st.info(
        "Give a run folder with generated pools: `streamlit run dashboards/review.py -- runs/<run>`."
    )
    st.stop()

# Export folders are results, not pools to review.
pools = sorted(
    p.name
    for p in (run / "generate").iterdir()
    if (p / "manifest.csv").exists() and not is_export(p)
)
if not pools:
    st.warning(f"No generated pool in {run / 'generate'}.")
    st.stop()
pool = st.sidebar.selectbox("Pool", pools)
pool_dir = run / "generate" / pool
rows = manifest(str(pool_dir), (pool_dir / "manifest.csv").stat().st_mtime)
# Guided away from a weaker model (autoguidance) or from the null class: the request says which,
# and for which classes when not for all of them.
request_path = pool_dir / "request.json"
request = json.loads(request_path.read_text()) if request_path.exists() else {}
autoguided = "guide_snapshot_sha256" in request
autoguided_classes = request.get("autoguided_classes")  # None: every guided class
if not rows:
    st.warning(f"Pool {pool} has no samples.")
    st.stop()

# Reviewer: from the URL on a fresh session, written back to the URL when it changes.
if "reviewer" not in st.session_state:
    st.session_state.reviewer = st.query_params.get("reviewer", "")
reviewer = st.sidebar.text_input("Reviewer", key="reviewer", help="Kept in the page URL").strip()
if reviewer and st.query_params.get("reviewer") != reviewer:
    st.query_params["reviewer"] = reviewer
elif not reviewer and "reviewer" in st.query_params:
    del st.query_params["reviewer"]
if not reviewer:
    st.sidebar.warning("Enter your name to record decisions (they are stored under it).")

classes = sorted({r["class_name"] for r in rows}, key=lambda c: views.class_index(rows, c))
db = db_path(run)
keys = [sample_key(pool, r) for r in rows]
by_key = dict(zip(keys, rows, strict=True))
order = {k: i for i, k in enumerate(keys)}
pixel = {k: r["pixel_sha256"] for k, r in by_key.items()}
status = status_by_sample(db, pixel)
mine = status_by_sample(db, pixel, reviewer) if reviewer else {}

# Window/level in the image's own (modality) units, shared by every image view.
low, high, stored_c, stored_w = window_range(str(pool_dir / rows[0]["path"]))
presets = {
    "Stored": (stored_c, stored_w),
    "Full": ((low + high) / 2, high - low),
    "Narrow": ((low + high) / 2, (high - low) / 2),
    "Reset": (stored_c, stored_w),
}
if st.session_state.get("wl_pool") != pool:  # another pool may have other units
    st.session_state.update(wl_pool=pool, wl_center=stored_c, wl_width=stored_w)


def set_window(center: float, width: float) -> None:
    st.session_state.update(wl_center=center, wl_width=width)


with st.sidebar.expander("Window / level (image units)", expanded=False):
    step_ = (high - low) / 200
    st.caption(f"Modality values of this pool: {low:.4g} to {high:.4g}")
    st.number_input("Center", low, high, key="wl_center", step=step_, format="%.3f")
    st.number_input("Width", step_, 2 * (high - low), key="wl_width", step=step_, format="%.3f")
    pcols = st.columns(2)
    for i, (name, cw) in enumerate(presets.items()):
        pcols[i % 2].button(name, on_click=set_window, args=cw, key=f"wl_{name}", width="stretch")
center, width = float(st.session_state.wl_center), float(st.session_state.wl_width)

FILTERS = ["all", "unreviewed", "unreviewed by me", "disagreement", *DECISIONS]
with st.sidebar.expander("Filter", expanded=True):
    want_classes = st.multiselect("Class", classes, default=classes)
    want_status = st.selectbox("Review status", FILTERS, key="status_filter")
    seed_text = st.text_input("Seed contains", "")
    guidance = sorted({r["guidance_scale"] for r in rows})
    want_guidance = st.multiselect("Guidance", guidance, default=guidance)
disagree = views.disagreement_keys(db, pixel)


def state_of(k: str) -> str:
    s = status.get(k)
    return s["status"] if s else "unreviewed"


def matches(k: str) -> bool:
    if want_status == "all":
        return True
    if want_status == "unreviewed by me":
        return k not in mine
    if want_status == "disagreement":
        return k in disagree
    return state_of(k) == want_status


shown = [
    k
    for k in keys
    if by_key[k]["class_name"] in want_classes
    and by_key[k]["guidance_scale"] in want_guidance
    and seed_text in by_key[k]["seed"]
    and matches(k)
]
pos = navigation.resolve(shown, order, st.session_state.get("current"))
current = shown[pos] if pos >= 0 else None


def go(key: str | None, view: str | None = None) -> None:
    st.session_state.current = key
    if view:
        st.session_state.view = view


def record(decision: str, key: str) -> None:
    """Store the reviewer's decision on ``key`` (label and note from that sample's own widgets)."""
    r = by_key[key]
    label = st.session_state.get(f"label-{key}", "(keep)")
    label = None if label in (None, "(keep)", r["class_name"]) else label
    note = st.session_state.get(f"note-{key}", "")
    decide(db, key, reviewer, decision, r["pixel_sha256"], corrected_label=label, note=note)
    relabel = f" as {label}" if label else ""
    st.session_state.saved = (
        f"Saved: {decision}{relabel} on sample #{r['index']} ({r['class_name']}) by {reviewer}"
    )
    st.session_state.last_decided = key
    st.session_state.current = navigation.step(shown, order, key, +1)


def undo(key: str) -> None:
    clear(db, key, reviewer)
    st.session_state.saved = f"Cleared your decision on sample #{by_key[key]['index']}"
    st.session_state.current = key


view = st.radio("View", VIEWS, horizontal=True, key="view", label_visibility="collapsed")

if view == "Samples":
    views.samples(pool_dir, rows, shown, by_key, state_of, (center, width), go)

elif view == "Review":
    if current is None:
        st.info("No sample matches the filter.")
    else:
        r = by_key[current]
        left, right = st.columns([3, 2])
        with left:
            marker = "EDITED" if r.get("edit") else "SYNTHETIC"
            png = views.full_png_cached(str(pool_dir / r["path"]), center, width, marker)
            st.iframe(zoom_pan_html(png, 620), height=660)
            st.button(
                "Auto window for this image (1–99 %)",
                key="wl_auto",
                on_click=set_window,
                args=auto_window(str(pool_dir / r["path"])),
            )
        with right:
            if r.get("edit"):
                st.markdown(
                    f"**EDITED (derived from a patient image)** sample {pos + 1} / {len(shown)} "
                    f"— #{r['index']} class **{r['class_name']}** from a **{r['source_class']}** "
                    f"source, {r['edit']} strength {r['strength']}, seed {r['seed']}"
                )
            else:
                # The guide is never called for a row drawn at scale 1 (a class left unguided).
                by_guide = autoguided and float(r["guidance_scale"]) != 1
                if autoguided_classes is not None:
                    by_guide = by_guide and r["class_name"] in autoguided_classes
                guide = "autoguidance" if by_guide else None
                st.markdown(
                    f"**SYNTHETIC** sample {pos + 1} / {len(shown)} — #{r['index']} class "
                    f"**{r['class_name']}**, seed {r['seed']}, {r['sampler']}-{r['steps']}, "
                    f"{guide or 'guidance'} {r['guidance_scale']}"
                )
            my = mine.get(current)
            st.caption(
                f"Your decision: {my['status'] if my else 'none yet'} · "
                f"all reviewers: {state_of(current)}"
            )
            if f"label-{current}" not in st.session_state:  # start from my stored decision
                st.session_state[f"label-{current}"] = (my or {}).get("corrected_label") or "(keep)"
                st.session_state[f"note-{current}"] = (my or {}).get("note", "")
            st.selectbox("Corrected label", ["(keep)", *classes], key=f"label-{current}")
            st.text_input("Note", key=f"note-{current}")
            off = not reviewer
            b = st.columns(3)
            b[0].button(
                "Accept",
                on_click=record,
                args=("accept", current),
                shortcut="a",
                type="primary",
                key="accept",
                disabled=off,
                width="stretch",
            )
            b[1].button(
                "Reject",
                on_click=record,
                args=("reject", current),
                shortcut="x",
                key="reject",
                disabled=off,
                width="stretch",
            )
            b[2].button(
                "Unsure",
                on_click=record,
                args=("unsure", current),
                shortcut="u",
                key="unsure",
                disabled=off,
                width="stretch",
            )
            b[0].button(
                "◀ Prev",
                on_click=go,
                args=(navigation.step(shown, order, current, -1),),
                shortcut="k",
                key="prev",
                width="stretch",
            )
            b[1].button(
                "Next ▶",
                on_click=go,
                args=(navigation.step(shown, order, current, +1),),
                shortcut="j",
                key="next",
                width="stretch",
            )
            b[2].button(
                "Clear mine",
                on_click=undo,
                args=(current,),
                shortcut="z",
                key="clear",
                disabled=off or not my,
                width="stretch",
            )
            if st.session_state.get("saved"):
                st.success(st.session_state.saved, icon="✅")
            last = st.session_state.get("last_decided")
            if reviewer and last and last in mine:
                st.button(
                    f"Undo last decision (#{by_key[last]['index']})",
                    on_click=undo,
                    args=(last,),
                    key="undo",
                )
            with st.expander("Keyboard shortcuts"):
                st.markdown(
                    f"{KEYS_HELP}. Keys work on this view only, and not while typing in a field."
                )
            views.decisions_of_others(current, status)
        if r.get("edit"):
            views.edit_strip(run, pool_dir, r)
    views.progress(rows, keys, classes, status, db, pixel)

elif view == "Compare":
    views.compare(
        run,
        pool,
        pool_dir,
        by_key.get(current),
        (center, width),
        state_of(current) if current else "unreviewed",
    )

elif view == "Disagreements":
    views.disagreements(db, pool, by_key, pixel, classes, reviewer, go)

elif view == "Metrics":
    views.metrics(run, db, pixel)

elif view == "DICOM":
    views.dicom(run, pool_dir, by_key.get(current))

elif view == "Export":
    views.export(run, pool, reviewer)
