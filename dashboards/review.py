"""Review synthetic samples of a medsynth run: look, compare, decide, export.

    streamlit run dashboards/review.py -- RUN_FOLDER

Reads the run folder; writes only RUN/review.sqlite (and exports on request). Thumbnails are
PNG rendered on the server (never JPEG), cached, and paginated, so large pools stay responsive.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import streamlit as st

from medsynth.dicom.read import header_table
from medsynth.generation.dataset import read_manifest
from medsynth.review.db import DECISIONS, db_path, decide, status_by_sample
from medsynth.review.export import export_accepted, sample_key
from medsynth.review.thumbs import array_thumbnail, dicom_thumbnail
from medsynth.utils.csvsafe import read_rows

st.set_page_config(page_title="medsynth review", layout="wide")


def run_folder() -> Path | None:
    # `streamlit run review.py -- RUN` sets argv to [review.py, RUN]; tests set MEDSYNTH_RUN.
    from_argv = len(sys.argv) > 1 and sys.argv[0].endswith("review.py")
    arg = sys.argv[1] if from_argv else os.environ.get("MEDSYNTH_RUN", "")
    value = st.sidebar.text_input("Run folder", value=arg)
    return Path(value) if value else None


@st.cache_data(show_spinner=False)
def manifest(pool_dir: str, mtime: float) -> list[dict]:
    return read_manifest(pool_dir)


@st.cache_data(show_spinner=False, max_entries=3000)
def thumb(path: str, level: float, width: float) -> bytes:
    return dicom_thumbnail(path, level, width)


@st.cache_resource(show_spinner=False)
def real_cache(ingest_dir: str):
    return np.load(Path(ingest_dir) / "images.npy", mmap_mode="r")


@st.cache_data(show_spinner=False)
def train_rows(ingest_dir: str) -> list[dict]:
    return [r for r in read_rows(Path(ingest_dir) / "index.csv") if r["split"] == "train"]


@st.cache_data(show_spinner=False)
def memorization(path: str, mtime: float) -> dict:
    return json.loads(Path(path).read_text())


run = run_folder()
if run is None or not (run / "generate").is_dir():
    st.title("medsynth review")
    st.info(
        "Give a run folder with generated pools: `streamlit run dashboards/review.py -- runs/<run>`."
    )
    st.stop()

pools = sorted(p.name for p in (run / "generate").iterdir() if (p / "manifest.csv").exists())
if not pools:
    st.warning(f"No generated pool in {run / 'generate'}.")
    st.stop()
pool = st.sidebar.selectbox("Pool", pools)
pool_dir = run / "generate" / pool
rows = manifest(str(pool_dir), (pool_dir / "manifest.csv").stat().st_mtime)
reviewer = st.sidebar.text_input("Reviewer", value=os.environ.get("USER", "reviewer") or "reviewer")
level = st.sidebar.slider("Window level", 0.0, 1.0, 0.5, 0.01)
width = st.sidebar.slider("Window width", 0.05, 1.0, 1.0, 0.01)
classes = sorted({r["class_name"] for r in rows})
db = db_path(run)
pixel = {sample_key(pool, r): r["pixel_sha256"] for r in rows}
status = status_by_sample(db, pixel)
mine = status_by_sample(db, pixel, reviewer)

with st.sidebar.expander("Filter", expanded=True):
    want_classes = st.multiselect("Class", classes, default=classes)
    want_status = st.selectbox("Review status", ["all", "unreviewed", *DECISIONS])
    seed_text = st.text_input("Seed contains", "")
    guidance = sorted({r["guidance_scale"] for r in rows})
    want_guidance = st.multiselect("Guidance", guidance, default=guidance)


def state_of(r: dict) -> str:
    s = status.get(sample_key(pool, r))
    return s["status"] if s else "unreviewed"


shown = [
    r for r in rows
    if r["class_name"] in want_classes and r["guidance_scale"] in want_guidance
    and (want_status == "all" or state_of(r) == want_status) and seed_text in r["seed"]
]  # fmt: skip

tab_samples, tab_review, tab_compare, tab_metrics, tab_dicom, tab_export = st.tabs(
    ["Samples", "Review", "Compare", "Metrics", "DICOM", "Export"]
)

with tab_samples:
    per_page = st.select_slider("Per page", [12, 24, 48, 96], value=24)
    pages = max(1, -(-len(shown) // per_page))
    page = st.number_input(f"Page (of {pages})", 1, pages, 1)
    st.caption(f"{len(shown)} of {len(rows)} samples match. Every tile is SYNTHETIC.")
    chunk = shown[(page - 1) * per_page : page * per_page]
    cols = st.columns(6)
    for i, r in enumerate(chunk):
        with cols[i % 6]:
            st.image(thumb(str(pool_dir / r["path"]), level, width), output_format="PNG",
                     caption=f"SYNTHETIC · {r['class_name']} · #{r['index']} · {state_of(r)}")  # fmt: skip

# The sample under review: position in the filtered list, kept across reruns.
if "cursor" not in st.session_state:
    st.session_state.cursor = 0
cursor = min(st.session_state.cursor, max(0, len(shown) - 1))
current = shown[cursor] if shown else None


def record(decision: str) -> None:
    r = shown[min(st.session_state.cursor, len(shown) - 1)]
    label = st.session_state.get("corrected") or None
    decide(db, sample_key(pool, r), reviewer, decision, r["pixel_sha256"],
           corrected_label=None if label in (None, "(keep)") else label,
           note=st.session_state.get("note", ""))  # fmt: skip
    st.session_state.cursor = min(st.session_state.cursor + 1, len(shown) - 1)


with tab_review:
    if current is None:
        st.info("No sample matches the filter.")
    else:
        left, right = st.columns([1, 2])
        with left:
            st.image(
                thumb(str(pool_dir / current["path"]), level, width), output_format="PNG", width=280
            )
        with right:
            st.markdown(f"**SYNTHETIC** sample {cursor + 1} / {len(shown)} — class **{current['class_name']}**, "
                        f"seed {current['seed']}, {current['sampler']}-{current['steps']}, "
                        f"guidance {current['guidance_scale']}")  # fmt: skip
            mine_now = mine.get(sample_key(pool, current))
            st.caption(f"Your decision: {mine_now['status'] if mine_now else 'none yet'}")
            st.selectbox("Corrected label", ["(keep)", *classes], key="corrected")
            st.text_input("Note", key="note")
            b1, b2, b3, b4, b5 = st.columns(5)
            b1.button(
                "Accept",
                on_click=record,
                args=("accept",),
                shortcut="a",
                type="primary",
                key="accept",
            )
            b2.button("Reject", on_click=record, args=("reject",), shortcut="x", key="reject")
            b3.button("Unsure", on_click=record, args=("unsure",), shortcut="u", key="unsure")
            b4.button(
                "◀ Prev",
                on_click=lambda: st.session_state.update(cursor=max(0, cursor - 1)),
                shortcut="k",
            )
            b5.button("Next ▶", on_click=lambda: st.session_state.update(cursor=min(len(shown) - 1, cursor + 1)),
                      shortcut="j")  # fmt: skip
            st.caption("Keys: a accept · x reject · u unsure · j next · k previous")
    st.subheader("Progress per class")
    prog = []
    for c in classes:
        keys = [sample_key(pool, r) for r in rows if r["class_name"] == c]
        done = [status[k]["status"] for k in keys if k in status]
        prog.append({"class": c, "samples": len(keys), "reviewed": len(done), "accepted": done.count("accept"),
                     "rejected": done.count("reject"), "unsure": done.count("unsure")})  # fmt: skip
    st.dataframe(prog, hide_index=True)

with tab_compare:
    memo_path = run / "evaluate" / "memorization.json"
    if current is None or not memo_path.exists():
        st.info("Run `medsynth evaluate` to compare samples with their nearest training images.")
    else:
        memo = memorization(str(memo_path), memo_path.stat().st_mtime).get(pool)
        if memo is None or current["path"] not in memo["synthetic_paths"]:
            st.info("This pool has no memorization audit.")
        else:
            i = memo["synthetic_paths"].index(current["path"])
            ps = memo["per_sample"]
            cache = real_cache(str(run / "ingest"))
            flag = "⚑ FLAGGED as a possible copy" if ps["flagged"][i] else "not flagged"
            if not memo.get("informative", True):  # a blind audit's "not flagged" means nothing
                st.warning(f"Memorization audit not informative: {memo['not_informative_reason']}.")
                flag += " (audit not informative)"
            st.markdown(f"Memorization: **{flag}** (pixel threshold {memo['pixel_threshold']:.3f}, "
                        f"feature threshold {memo['feature_threshold']:.3f})")  # fmt: skip
            c1, c2, c3 = st.columns(3)
            c1.image(
                thumb(str(pool_dir / current["path"]), level, width),
                output_format="PNG",
                caption="SYNTHETIC",
            )
            for col, kind in ((c2, "pixel"), (c3, "feature")):
                row = memo["train_cache_rows"][ps[f"{kind}_nn"][i]]
                col.image(array_thumbnail(cache[row, 0], level, width), output_format="PNG",
                          caption=f"nearest by {kind}: similarity {ps[f'{kind}_similarity'][i]:.3f}")  # fmt: skip
            st.subheader(f"Real training exemplars of class {current['class_name']}")
            ex = [
                int(r["row"])
                for r in train_rows(str(run / "ingest"))
                if r["label"] == current["class_name"]
            ][:6]
            cols = st.columns(6)
            for col, row in zip(cols, ex, strict=False):
                col.image(
                    array_thumbnail(cache[row, 0], level, width),
                    output_format="PNG",
                    caption="real",
                )

with tab_metrics:
    ev = run / "evaluate"
    if (ev / "uplift.csv").exists():
        st.subheader("Uplift (test AUC; paired bootstrap 95 % CIs)")
        st.dataframe(list(csv.DictReader((ev / "uplift.csv").open())), hide_index=True)
        fid = json.loads((ev / "fidelity.json").read_text())
        st.subheader("Fidelity and diversity (features of the real-only classifier: *_clf)")
        st.dataframe(
            [{"set": a, "class": c, **m} for a, per in fid.items() for c, m in per.items()],
            hide_index=True,
        )
    else:
        st.info("No evaluation results yet (`medsynth evaluate`).")
    for png in ("uplift.png", "diversity_uplift.png", "training_curve.png"):
        if (run / "report" / png).exists():
            st.image(str(run / "report" / png))
    log = run / "train" / "log.jsonl"
    if log.exists():
        st.subheader("Training loss")
        st.line_chart({"loss": [json.loads(x)["loss"] for x in log.read_text().splitlines()]})

with tab_dicom:
    if current is not None:
        st.subheader("Synthetic instance (as written)")
        st.dataframe(header_table(pool_dir / current["path"]), hide_index=True)
    idx = run / "ingest" / "index.csv"
    proto = run / "protocol.yaml"
    if idx.exists() and proto.exists():
        import yaml

        root = yaml.safe_load(proto.read_text())["dataset"].get("root") or str(run / "phantoms")
        first = train_rows(str(run / "ingest"))[:1]
        if first and (Path(root) / first[0]["path"]).exists():
            st.subheader("A real training instance (identifying values masked)")
            st.dataframe(header_table(Path(root) / first[0]["path"], mask=True), hide_index=True)

with tab_export:
    st.write("Export the accepted samples as a pool of their own (manifest + DICOM), usable by "
             "`medsynth evaluate` (as `evaluation.pools: [<pool>-accepted]`) and by outside pipelines.")  # fmt: skip
    only_me = st.checkbox("Only my decisions", value=False)
    link = st.checkbox("Symlink instead of copying DICOM files", value=False)
    if st.button("Export accepted", key="export"):
        out, n = export_accepted(run, pool, reviewer=reviewer if only_me else None, link=link)
        st.success(f"Exported {n} accepted samples to {out}")
