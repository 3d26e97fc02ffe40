"""The views of the review dashboard (``review.py`` holds the state and the Review view)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import streamlit as st

from medsynth.dicom.read import header_table
from medsynth.review import agreement
from medsynth.review.db import DECISIONS, adjudicate, adjudications, decisions
from medsynth.review.edits import edit_panels
from medsynth.review.export import export_accepted, next_export_dir, plan_export
from medsynth.review.thumbs import array_thumbnail, to_png
from medsynth.review.viewer import full_png, tile_png, windowed
from medsynth.utils.csvsafe import read_rows

COMPARE_PX = 256  # every image in Compare is shown at this size
Window = tuple[float, float]


def class_index(rows: list[dict], name: str) -> int:
    return next(int(r["class_index"]) for r in rows if r["class_name"] == name)


@st.cache_data(show_spinner=False, max_entries=20)
def full_png_cached(path: str, center: float, width: float, marker: str = "SYNTHETIC") -> bytes:
    return full_png(path, center, width, marker)


@st.cache_data(show_spinner=False, max_entries=3000)
def tile(
    path: str, center: float, width: float, status: str, size: int = 112, marker: str = "SYNTHETIC"
) -> bytes:
    return tile_png(windowed(path, center, width), status, size, marker)


def marker_of(row: dict) -> str:
    """EDITED for an edit of a patient's image (its pixels are not 'no patient'), else SYNTHETIC."""
    return "EDITED" if row.get("edit") else "SYNTHETIC"


@st.cache_resource(show_spinner=False)
def real_cache(ingest_dir: str):
    return np.load(Path(ingest_dir) / "images.npy", mmap_mode="r")


@st.cache_data(show_spinner=False)
def index_rows(ingest_dir: str) -> dict[int, dict]:
    return {int(r["row"]): r for r in read_rows(Path(ingest_dir) / "index.csv")}


@st.cache_data(show_spinner=False)
def memorization(path: str, mtime: float) -> dict:
    return json.loads(Path(path).read_text())


def disagreement_keys(db: Path, pixel: dict[str, str]) -> set[str]:
    rows = [d for d in decisions(db) if pixel.get(d["sample"]) == d["pixel_sha256"]]
    return set(agreement.disagreements(rows))


def samples(pool_dir: Path, rows, shown, by_key, state_of, win: Window, go: Callable) -> None:
    """Paginated grid, one section per class, tiles coloured by status; Open → Review."""
    c1, c2 = st.columns(2)
    per_page = c1.select_slider("Per page", [12, 24, 48, 96], value=24)
    pages = max(1, -(-len(shown) // per_page))
    page = c2.number_input(f"Page (of {pages})", 1, pages, 1)
    kind = (
        "EDITED from a training patient's image (derived, not synthetic from noise)"
        if any(r.get("edit") for r in rows)
        else "SYNTHETIC"
    )
    st.caption(
        f"{len(shown)} of {len(rows)} samples match. Every tile is {kind}; the strip "
        "below it is the review status (green accept, red reject, amber unsure, grey none)."
    )
    chunk = shown[(page - 1) * per_page : page * per_page]
    for cls in dict.fromkeys(by_key[k]["class_name"] for k in chunk):
        group = [k for k in chunk if by_key[k]["class_name"] == cls]
        st.subheader(f"{cls} ({sum(by_key[k]['class_name'] == cls for k in shown)} samples)")
        cols = st.columns(8)
        for i, k in enumerate(group):
            r = by_key[k]
            with cols[i % 8]:
                st.image(
                    tile(str(pool_dir / r["path"]), *win, state_of(k), marker=marker_of(r)),
                    output_format="PNG",
                    caption=f"#{r['index']}",
                )
                st.button("Open", key=f"open-{k}", on_click=go, args=(k, "Review"))


def decisions_of_others(key: str, status: dict) -> None:
    st.markdown("**All decisions on this sample**")
    s = status.get(key)
    if not s or not s["decisions"]:
        st.caption("none yet")
        return
    st.dataframe(
        [
            {
                "reviewer": d["reviewer"],
                "decision": d["decision"],
                "corrected label": d["corrected_label"] or "",
                "note": d["note"],
            }
            for d in s["decisions"]
        ],
        hide_index=True,
    )
    if s.get("adjudicated"):
        a = s["adjudicated"]
        st.caption(
            f"Adjudicated by {a['adjudicator']}: {a['decision']}"
            + (f" as {a['corrected_label']}" if a["corrected_label"] else "")
        )


def progress(rows, keys, classes, status, db, pixel) -> None:
    st.subheader("Progress per class")
    prog = []
    for c in classes:
        ks = [k for k, r in zip(keys, rows, strict=True) if r["class_name"] == c]
        done = [status[k]["status"] for k in ks if k in status]
        prog.append(
            {
                "class": c,
                "samples": len(ks),
                "reviewed": len(done),
                "accepted": done.count("accept"),
                "rejected": done.count("reject"),
                "unsure": done.count("unsure"),
            }
        )
    st.dataframe(prog, hide_index=True, key="progress_class")
    st.subheader("Progress per reviewer")
    per: dict[str, dict] = {}
    for d in decisions(db):
        if pixel.get(d["sample"]) != d["pixel_sha256"]:
            continue
        p = per.setdefault(
            d["reviewer"], {"reviewer": d["reviewer"], "reviewed": 0, **dict.fromkeys(DECISIONS, 0)}
        )
        p["reviewed"] += 1
        p[d["decision"]] += 1
    for p in per.values():
        p["done"] = f"{100 * p['reviewed'] / len(keys):.0f} %"
    st.dataframe(list(per.values()), hide_index=True, key="progress_reviewer")


def _real_image(cache, row: int, win_unit: Window) -> bytes:
    # The ingest cache is [-1, 1]; the synthetic window is in the same training scale.
    c, w = win_unit
    return array_thumbnail(cache[row], (c + 1) / 2, w / 2, size=COMPARE_PX)  # all channels


def compare(run: Path, pool: str, pool_dir: Path, r: dict | None, win: Window, state: str) -> None:
    memo_path = run / "evaluate" / "memorization.json"
    if r is None or not memo_path.exists():
        st.info("Run `medsynth evaluate` to compare samples with their nearest training images.")
        return
    memo = memorization(str(memo_path), memo_path.stat().st_mtime).get(pool)
    if memo is None or r["path"] not in memo["synthetic_paths"]:
        st.info("This pool has no memorization audit.")
        return
    i = memo["synthetic_paths"].index(r["path"])
    ps = memo["per_sample"]
    cache = real_cache(str(run / "ingest"))
    index = index_rows(str(run / "ingest"))
    flag = "⚑ FLAGGED as a possible copy" if ps["flagged"][i] else "not flagged"
    if not memo.get("informative", True):  # a blind audit's "not flagged" means nothing
        st.warning(f"Memorization audit not informative: {memo['not_informative_reason']}.")
        flag += " (audit not informative)"
    st.markdown(
        f"Sample #{r['index']} ({r['class_name']}). Memorization: **{flag}** (pixel "
        f"threshold {memo['pixel_threshold']:.3f}, feature threshold {memo['feature_threshold']:.3f})"
    )
    c1, c2, c3 = st.columns(3)
    c1.image(
        tile(str(pool_dir / r["path"]), *win, state, COMPARE_PX, marker_of(r)),
        width=COMPARE_PX,
        output_format="PNG",
        caption=f"{marker_of(r)} · {r['class_name']}",
    )
    root = _dataset_root(run)
    for col, kind in ((c2, "pixel"), (c3, "feature")):
        row = memo["train_cache_rows"][ps[f"{kind}_nn"][i]]
        real = index.get(row, {})
        col.image(
            _real_image(cache, row, win),
            width=COMPARE_PX,
            output_format="PNG",
            caption=f"nearest by {kind}: class {real.get('label', '?')}, "
            f"similarity {ps[f'{kind}_similarity'][i]:.3f}",
        )
        path = root / real["path"] if root and real.get("path") else None
        if path and path.exists():
            with col.expander("Header (identifying values masked)"):
                st.dataframe(header_table(path, mask=True), hide_index=True)
    st.subheader(f"Real training exemplars of class {r['class_name']}")
    ex = [k for k, x in index.items() if x["split"] == "train" and x["label"] == r["class_name"]][
        :6
    ]
    cols = st.columns(6)
    for col, row in zip(cols, ex, strict=False):
        col.image(
            _real_image(cache, row, win),
            width=COMPARE_PX // 2,
            output_format="PNG",
            caption=f"real · {r['class_name']}",
        )


def edit_strip(run: Path, pool_dir: Path, r: dict) -> None:
    """Source | edit | difference | mask of an edited sample, side by side at one size.

    Each panel fills its own column (``stretch``): with a fixed 256-px width the panels
    overlapped one another in Chromium at a 1400-px window with the sidebar open.
    """
    p = edit_panels(run, pool_dir, r)
    captions = {
        "source": f"REAL source · cache row {r['source_row']} · {r['source_class']}",
        "edit": f"EDITED ({r['edit']}) · {r['class_name']}",
        "difference": f"|edit − source| (max {float(p['difference_max']):.3f})",
        "mask": f"mask · {r['mask']}",
    }
    names = [n for n in ("source", "edit", "difference", "mask") if n in p]
    for col, name in zip(st.columns(len(names)), names, strict=True):
        marker = {"edit": "EDITED", "source": "REAL"}.get(name)
        col.image(
            to_png(p[name], COMPARE_PX, marker),
            width="stretch",
            output_format="PNG",
            caption=captions[name],
        )


def _dataset_root(run: Path) -> Path | None:
    proto = run / "protocol.yaml"
    if not proto.exists():
        return None
    import yaml

    return Path(yaml.safe_load(proto.read_text())["dataset"].get("root") or run / "phantoms")


def disagreements(db, pool, by_key, pixel, classes, reviewer: str, go: Callable) -> None:
    rows = [d for d in decisions(db) if pixel.get(d["sample"]) == d["pixel_sha256"]]
    dis = agreement.disagreements(rows)
    adj = {a["sample"]: a for a in adjudications(db)}
    st.subheader(f"Samples where reviewers differ ({len(dis)})")
    if not dis:
        st.info("No disagreements: every sample rated by several reviewers got the same call.")
        return
    table = []
    for k, ratings in sorted(dis.items()):
        a = adj.get(k)
        table.append(
            {
                "sample": f"#{by_key[k]['index']} {by_key[k]['class_name']}",
                **{f"{rv}": v for rv, v in sorted(ratings.items())},
                "adjudication": (
                    a["decision"] + (f"→{a['corrected_label']}" if a["corrected_label"] else "")
                )
                if a
                else "",
            }
        )
    st.table(table)  # static HTML: every decision readable (and in a screenshot)
    st.subheader("Adjudicate")
    labels = {f"#{by_key[k]['index']} {by_key[k]['class_name']}": k for k in sorted(dis)}
    pick = st.selectbox("Sample", list(labels), key="adj_sample")
    k = labels[pick]
    c1, c2 = st.columns(2)
    decision = c1.selectbox("Decision", DECISIONS, key="adj_decision")
    label = c2.selectbox("Label", ["(keep)", *classes], key="adj_label")
    if st.button("Open in Review", key="adj_open"):
        go(k, "Review")
        st.rerun()
    if st.button("Adjudicate", key="adjudicate", disabled=not reviewer, type="primary"):
        new = None if label in ("(keep)", by_key[k]["class_name"]) else label
        adjudicate(db, k, reviewer, decision, pixel[k], corrected_label=new)
        st.session_state.saved = f"Saved: adjudication {decision} on {pick} by {reviewer}"
        st.rerun()
    if st.session_state.get("saved", "").startswith("Saved: adjudication"):
        st.success(st.session_state.saved, icon="✅")


def _rounded(rows: list[dict]) -> list[dict]:
    """Numbers for people: a column whose values are all numbers (or blank) becomes floats
    rounded to 3 decimals (blank = None); other columns stay text."""

    def num(v) -> float | None:
        return None if v in ("", None) else float(v)

    cols = list(rows[0]) if rows else []
    numeric = set()
    for c in cols:
        try:
            [num(r[c]) for r in rows]
            numeric.add(c)
        except (TypeError, ValueError):
            pass
    return [
        {
            c: (None if num(r[c]) is None else round(num(r[c]), 3)) if c in numeric else r[c]
            for c in cols
        }
        for r in rows
    ]


def metrics(run: Path, db: Path, pixel) -> None:
    rows = [d for d in decisions(db) if pixel.get(d["sample"]) == d["pixel_sha256"]]
    st.subheader("Inter-rater agreement")
    ag = agreement.agreement_table(rows)
    fk = ag["fleiss_kappa"]
    st.markdown(
        f"Fleiss' κ = **{'n/a' if fk != fk else f'{fk:.2f}'}** over {ag['samples']} "
        "samples rated by two or more reviewers."
    )
    for p in ag["pairs"]:
        k = "n/a" if p["kappa"] != p["kappa"] else f"{p['kappa']:.2f}"
        st.markdown(f"Cohen's κ {p['reviewers']}: **{k}** over {p['samples']} samples")
    ev = run / "evaluate"
    if (ev / "uplift.csv").exists():
        st.subheader("Uplift (test AUC; paired bootstrap 95 % CIs)")
        st.dataframe(_rounded(read_rows(ev / "uplift.csv")), hide_index=True)
        fid = json.loads((ev / "fidelity.json").read_text())
        st.subheader("Fidelity and diversity (features of the real-only classifier: *_clf)")
        st.dataframe(
            _rounded(
                [{"set": a, "class": c, **m} for a, per in fid.items() for c, m in per.items()]
            ),
            hide_index=True,
        )
    else:
        st.info("No evaluation results yet (`medsynth evaluate`).")
    for png in ("uplift.png", "diversity_uplift.png", "training_curve.png"):
        if (run / "report" / png).exists():
            st.image(str(run / "report" / png))


def dicom(run: Path, pool_dir: Path, r: dict | None) -> None:
    if r is not None:
        if r.get("edit"):
            what = f"EDITED instance #{r['index']} ({r['class_name']}, derived from a patient image"
        else:
            what = f"Synthetic instance #{r['index']} ({r['class_name']}"
        st.subheader(f"{what}, as written)")
        st.dataframe(header_table(pool_dir / r["path"]), hide_index=True)
    root = _dataset_root(run)
    idx = run / "ingest" / "index.csv"
    if root and idx.exists():
        first = [x for x in index_rows(str(run / "ingest")).values() if x["split"] == "train"][:1]
        if first and (root / first[0]["path"]).exists():
            st.subheader("A real training instance (identifying values masked)")
            st.dataframe(header_table(root / first[0]["path"], mask=True), hide_index=True)


def export(run: Path, pool: str, reviewer: str) -> None:
    st.write(
        "Export the accepted samples as a pool of their own (manifest + DICOM), usable by "
        "`medsynth evaluate` (in `evaluation.pools`) and by outside pipelines. An export "
        "never replaces an earlier one: each goes to the next free folder."
    )
    only_me = st.checkbox("Only my decisions", value=False, disabled=not reviewer)
    link = st.checkbox("Symlink instead of copying DICOM files", value=False)
    who = reviewer if only_me and reviewer else None
    probe = plan_export(run, pool, reviewer=who)
    exclude = st.checkbox(
        f"Exclude memorization-flagged samples ({len(probe.flagged_included)} accepted)",
        value=bool(probe.flagged_included),
        key="exclude_flagged",
    )
    try:
        plan = plan_export(run, pool, reviewer=who, exclude_flagged=exclude)
    except ValueError as exc:
        st.error(str(exc))
        return
    dest = next_export_dir(run, pool)
    st.subheader("Preview")
    st.markdown(
        f"**{len(plan.rows)}** samples to `{dest}`"
        + (f" (decisions of {who} only)" if who else " (all reviewers)")
    )
    st.dataframe(
        [{"class": c, "samples": n} for c, n in plan.per_class().items()],
        hide_index=True,
        key="export_counts",
    )
    if plan.relabels:
        st.markdown(f"Relabelled ({len(plan.relabels)}): manifest, folder and DICOM header change")
        st.dataframe(plan.relabels, hide_index=True, key="export_relabels")
    if plan.flagged_excluded:
        st.caption(f"Left out as possible copies: {', '.join(plan.flagged_excluded)}")
    if st.button(f"Export {len(plan.rows)} samples", key="export", disabled=not plan.rows):
        try:
            out, n = export_accepted(run, pool, reviewer=who, link=link, exclude_flagged=exclude)
        except ValueError as exc:
            st.error(str(exc))
        else:
            st.success(f"Exported {n} accepted samples to {out}")
    if not plan.rows:
        st.warning("Nothing is accepted" + (f" by {who}" if who else "") + ": nothing to export.")
