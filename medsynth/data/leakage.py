"""Split hygiene at ingest: duplicates within/across splits, grouping, and the leak policy.

Writes ``ingest/duplicates.csv`` (one row per duplicate pair: cache rows, similarity, exact,
splits, patients, labels) and, under ``duplicate_policy: drop``, ``ingest/excluded.csv`` (the
validation/test rows that later stages leave out of evaluation). Returns the figures that the
ingest summary, ``medsynth show`` and the report print.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from medsynth.data.duplicates import DuplicatePairs, find_duplicates
from medsynth.data.index import IngestError, _patient_key, assign_splits
from medsynth.utils.csvsafe import neutralise

DUPLICATE_COLUMNS = (
    "row_a",
    "row_b",
    "similarity",
    "exact",
    "split_a",
    "split_b",
    "cross_split",
    "PatientID_a",
    "PatientID_b",
    "same_patient",
    "label_a",
    "label_b",
)
EXCLUDED_FILE = "excluded.csv"


def _merged_patients(rows: list[dict], pairs: DuplicatePairs) -> dict[str, str]:
    """Union-find of patient keys joined by any duplicate pair: patient key -> group key."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        parent.setdefault(a, a)
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for i, j in zip(pairs.i.tolist(), pairs.j.tolist(), strict=True):
        a, b = find(_patient_key(rows[i])), find(_patient_key(rows[j]))
        if a != b:
            parent[max(a, b)] = min(a, b)  # smallest key names the group: deterministic
    return {p: find(p) for p in parent}


def leak_summary(rows: list[dict], pairs: DuplicatePairs) -> dict:
    """Counts of duplicate pairs by split pair, and held-out images with a duplicate in train."""
    split = np.array([r["split"] for r in rows])
    si, sj = split[pairs.i], split[pairs.j]
    by_splits: dict[str, dict[str, int]] = {}
    for a, b, e in zip(si.tolist(), sj.tolist(), pairs.exact.tolist(), strict=True):
        k = "-".join(sorted((a, b)))
        d = by_splits.setdefault(k, {"pairs": 0, "exact": 0})
        d["pairs"] += 1
        d["exact"] += int(e)
    leaking: dict[str, set[int]] = {"val": set(), "test": set()}
    leaking_exact: dict[str, set[int]] = {"val": set(), "test": set()}
    for i, j, e in zip(pairs.i.tolist(), pairs.j.tolist(), pairs.exact.tolist(), strict=True):
        for held, other in ((i, j), (j, i)):
            if split[held] in leaking and split[other] == "train":
                leaking[split[held]].add(held)
                if e:
                    leaking_exact[split[held]].add(held)
    n_held = int(np.isin(split, ("val", "test")).sum())
    return {
        "pairs": len(pairs),
        "exact_pairs": int(pairs.exact.sum()),
        "near_pairs": int((~pairs.exact).sum()),
        "by_splits": dict(sorted(by_splits.items())),
        "heldout_images": n_held,
        "heldout_with_train_duplicate": {s: len(v) for s, v in leaking.items()},
        "heldout_with_train_exact_duplicate": {s: len(v) for s, v in leaking_exact.items()},
        "leaking_rows": sorted(leaking["val"] | leaking["test"]),
        "candidates_checked": pairs.candidates,
    }


def leak_line(d: dict) -> str:
    """One prominent sentence about held-out images that have a near-duplicate in train."""
    n = sum(d["heldout_with_train_duplicate"].values())
    ex = sum(d["heldout_with_train_exact_duplicate"].values())
    per = ", ".join(f"{s} {v}" for s, v in d["heldout_with_train_duplicate"].items())
    head = "WARNING: " if n and d.get("policy", "keep") == "keep" else ""
    act = {
        "keep": "kept in evaluation (duplicate_policy: keep)",
        "drop": "dropped from evaluation (duplicate_policy: drop)",
        "fail": "ingest stopped (duplicate_policy: fail)",
    }[d.get("policy", "keep")]
    return (
        f"{head}{n} of {d['heldout_images']} validation/test images ({per}) have a near-duplicate "
        f"in train (corr >= {d.get('threshold', 0):g}; {ex} exact)"
        + (f"; {act}" if n else "")
        + f". {d['pairs']} duplicate pairs in all ({d['exact_pairs']} exact), see duplicates.csv"
    )


def _write(out: Path, rows: list[dict], pairs: DuplicatePairs) -> None:
    with (out / "duplicates.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(DUPLICATE_COLUMNS)
        order = np.lexsort((pairs.j, pairs.i, -pairs.similarity))
        for k in order.tolist():
            a, b = rows[int(pairs.i[k])], rows[int(pairs.j[k])]
            pa, pb = a.get("PatientID", ""), b.get("PatientID", "")
            cells = [
                a["row"],
                b["row"],
                f"{pairs.similarity[k]:.6f}",
                int(pairs.exact[k]),
                a["split"],
                b["split"],
                int(a["split"] != b["split"]),
                pa,
                pb,
                int(_patient_key(a) == _patient_key(b)),
                a["label"],
                b["label"],
            ]
            w.writerow([neutralise(c) for c in cells])  # IDs and labels are the user's text


def _check_grouped_splits(rows: list[dict], ds, out: Path) -> None:
    """Refuse computed splits that duplicate grouping left empty (but would not be without it)."""
    asked = {k for k, v in ds.split_fractions.items() if v > 0} - {"train"}
    empty = sorted(asked - {r["split"] for r in rows})
    if not empty:
        return
    plain = [dict(r) for r in rows]
    assign_splits(
        plain, fractions=ds.split_fractions, seed=ds.split_seed, stratify=ds.split_stratify
    )
    if not set(empty) - {r["split"] for r in plain}:  # grouping emptied them
        raise IngestError(
            f"the computed {'/'.join(empty)} split is empty: patients sharing a near-duplicate "
            f"image (pixel correlation >= {ds.duplicate_threshold:g}; pairs in "
            f"{out / 'duplicates.csv'}) must stay together, and here they leave no patient for "
            f"it among {len(rows)} images. Raise dataset.duplicate_threshold if the pairs are not "
            "real copies, add images, or give the splits in the label table."
        )


def split_with_duplicates(out_dir: str | Path, rows: list[dict], ds) -> dict:
    """Find duplicates in ``out_dir/images.npy``, assign splits, write reports, apply the policy.

    ``rows``: kept index rows, ``rows[k]["row"] == k``. ``ds``: the protocol's DatasetSection
    (``split_*``, ``duplicate_threshold``, ``duplicate_policy``). Where splits are computed,
    patients sharing a duplicate pair are put in one split. Returns :func:`leak_summary` plus
    ``threshold``, ``policy`` and ``excluded``.
    """
    out = Path(out_dir)
    images = np.load(out / "images.npy", mmap_mode="r")
    pairs = find_duplicates(images, ds.duplicate_threshold)
    computed = not (rows and "table_split" in rows[0])
    assign_splits(
        rows,
        split_values=ds.split_values,
        fractions=ds.split_fractions,
        seed=ds.split_seed,
        groups=_merged_patients(rows, pairs) if computed else None,
        stratify=ds.split_stratify,
    )
    _write(out, rows, pairs)
    if computed:
        _check_grouped_splits(rows, ds, out)
    d = leak_summary(rows, pairs)
    d.update(threshold=ds.duplicate_threshold, policy=ds.duplicate_policy, excluded=0)
    leaking = d.pop("leaking_rows")
    with (out / EXCLUDED_FILE).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("row", "split", "reason"))
        if ds.duplicate_policy == "drop":
            for k in leaking:
                w.writerow((k, rows[k]["split"], "near-duplicate of a train image"))
            d["excluded"] = len(leaking)
    if ds.duplicate_policy == "fail" and leaking:
        raise IngestError(
            f"{len(leaking)} validation/test images have a near-duplicate in the train split "
            f"(pixel correlation >= {ds.duplicate_threshold:g}), so evaluation would be scored "
            f"partly on copies of training images; the pairs are listed in "
            f"{out / 'duplicates.csv'}. Fix the split (or set dataset.duplicate_policy to 'drop' "
            "to leave those images out of evaluation, or 'keep' to accept the leak)."
        )
    return d


def excluded_rows(ingest_dir: str | Path) -> set[str]:
    """Cache rows (as strings, like index.csv) that evaluation leaves out; empty if none."""
    path = Path(ingest_dir) / EXCLUDED_FILE
    if not path.is_file():
        return set()
    with path.open(newline="") as fh:
        return {r["row"] for r in csv.DictReader(fh)}
