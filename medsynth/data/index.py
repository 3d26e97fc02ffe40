"""Join DICOM headers to a label table and assign patient-level splits.

Labels come from an explicit table keyed by a DICOM attribute, never from file names. Every
image and every table row is accounted for: joined, or reported with a reason.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


class IngestError(ValueError):
    """The label table and the images cannot be joined as the protocol asks."""


@dataclass
class JoinResult:
    rows: list[dict]  # headers of labelled images, with "label" and "label_index" added
    unlabelled: list[dict] = field(default_factory=list)  # {"path", "reason"}
    unmatched_labels: list[dict] = field(default_factory=list)  # table rows with no image
    classes: list[str] = field(default_factory=list)


def read_label_table(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """Read a CSV label table: (column names, rows as dicts of stripped strings)."""
    path = Path(path)
    if not path.is_file():
        raise IngestError(f"label table not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = list(reader.fieldnames or [])
            rows = [{k: (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise IngestError(f"label table {path} cannot be read as UTF-8 CSV: {exc}") from None
    if not columns:
        raise IngestError(
            f"label table {path} is empty (no header row). It needs a header naming the join "
            "column and the label column, then one row per image or patient."
        )
    if not rows:
        raise IngestError(
            f"label table {path} has a header but no rows (columns: {', '.join(columns)}); "
            "add one row per labelled image or patient."
        )
    return columns, rows


def join_labels(
    headers: list[dict],
    table_columns: list[str],
    table_rows: list[dict[str, str]],
    *,
    join_attribute: str = "SOPInstanceUID",
    join_column: str | None = None,
    label_column: str = "label",
    classes: list[str] | None = None,
    split_column: str | None = None,
    table: str | Path = "",
) -> JoinResult:
    """Attach a label (and the table's split value, if any) to each header by a DICOM attribute.

    ``headers``: dicts from ``read_header`` plus ``path``. Several images may share one table row
    (e.g. a per-patient label); a key that appears twice in the table with different labels is
    an error. Unknown class names are reported per image, not silently dropped. ``table`` is
    the table's path, named in every error.
    """
    name = f"label table {table}" if str(table) else "label table"
    join_column = join_column or join_attribute
    for col, what in ((join_column, "join_column"), (label_column, "label_column")):
        if col not in table_columns:
            raise IngestError(
                f"{name} has no column {col!r} ({what}); its columns are: "
                f"{', '.join(table_columns)}. Set dataset.{what} to one of them."
            )
    if split_column and split_column not in table_columns:
        raise IngestError(
            f"{name} has no split column {split_column!r}; columns: {', '.join(table_columns)}"
        )
    by_key: dict[str, dict[str, str]] = {}
    for r in table_rows:
        key = r[join_column]
        if key in by_key and by_key[key][label_column] != r[label_column]:
            raise IngestError(f"{name} gives key {key!r} two labels")
        by_key[key] = r
    names = classes or sorted({r[label_column] for r in table_rows if r[label_column]})
    class_index = {c: i for i, c in enumerate(names)}

    result = JoinResult(rows=[], classes=list(names))
    used: set[str] = set()
    for h in headers:
        key = h.get(join_attribute, "")
        row = by_key.get(key) if key else None
        if row is None:
            why = (
                f"no {join_attribute} in header"
                if not key
                else f"{join_attribute} not in label table"
            )
            result.unlabelled.append({"path": h["path"], "reason": why})
            continue
        used.add(key)
        label = row[label_column]
        if label not in class_index:
            result.unlabelled.append(
                {"path": h["path"], "reason": f"label {label!r} not in classes {names}"}
            )
            continue
        out = dict(h, label=label, label_index=class_index[label])
        if split_column:
            out["table_split"] = row[split_column]
        result.rows.append(out)
    result.unmatched_labels = [r for k, r in by_key.items() if k not in used]
    empty = [c for c in names if not any(r["label"] == c for r in result.rows)]
    if empty:
        raise IngestError(
            f"class(es) {empty} have no images after the join; check dataset.classes, "
            f"dataset.label_column and {name}"
        )
    return result


def _patient_key(row: dict) -> str:
    # A file without PatientID is its own patient: never merged with strangers.
    return row.get("PatientID") or f"__file__:{row['path']}"


def assign_splits(
    rows: list[dict],
    *,
    split_values: dict[str, str] | None = None,
    fractions: dict[str, float] | None = None,
    seed: int = 0,
    groups: dict[str, str] | None = None,
    stratify: list[str] | None = None,
) -> None:
    """Set ``row["split"]`` in place: from ``row["table_split"]`` or computed by patient.

    Computed splits are stratified by each patient's majority label and grouped by PatientID,
    seeded, so a patient's images never straddle splits. ``groups`` (patient key -> group key)
    merges patients further, e.g. patients sharing a near-duplicate image, so a group never
    straddles splits either. ``stratify``: header keywords (e.g. ``ViewPosition``) whose value
    (a patient's most common one) joins the label in the stratum, so each split holds about the
    same share of every (label, value) cell. Raises if a table split puts one patient in two
    splits, or if ``stratify`` is asked of table splits or names a keyword the rows lack.
    """
    stratify = list(stratify or [])
    if stratify and rows:
        missing = [a for a in stratify if a not in rows[0]]
        if missing:
            raise IngestError(
                f"dataset.split_stratify names {missing}, which the ingest does not record; "
                f"recorded header keywords: {', '.join(k for k in rows[0] if k[:1].isupper())}"
            )
    if rows and "table_split" in rows[0]:
        if stratify:
            raise IngestError(
                "dataset.split_stratify applies to computed splits, but the label table gives "
                "the splits (dataset.split_column); drop one of the two"
            )
        inverse = {v: k for k, v in (split_values or {s: s for s in SPLITS}).items()}
        bad = sorted({r["table_split"] for r in rows} - set(inverse))
        if bad:
            raise IngestError(
                f"split column has values {bad} not named in dataset.split_values {split_values}"
            )
        for r in rows:
            r["split"] = inverse[r.pop("table_split")]
    else:
        fractions = fractions or {"train": 0.7, "val": 0.15, "test": 0.15}
        groups = groups or {}

        def key(r: dict) -> str:
            return groups.get(_patient_key(r), _patient_key(r))

        # A patient's stratum: its majority label and, per stratify keyword, its majority value.
        # Without stratify the strata are (label,) in label order: the same draws as before.
        cells: dict[str, list[Counter]] = defaultdict(
            lambda: [Counter() for _ in range(1 + len(stratify))]
        )
        for r in rows:
            mine = cells[key(r)]
            mine[0][r["label_index"]] += 1
            for c, a in zip(mine[1:], stratify, strict=True):
                c[str(r.get(a) or "")] += 1
        by_class: dict[tuple, list[str]] = defaultdict(list)
        for pid in sorted(cells):
            by_class[tuple(c.most_common(1)[0][0] for c in cells[pid])].append(pid)
        rng = np.random.default_rng(seed)
        split_of: dict[str, str] = {}
        for cls in sorted(by_class):
            pids = list(by_class[cls])
            rng.shuffle(pids)
            n = len(pids)
            n_test = round(n * fractions["test"])
            n_val = round(n * fractions["val"])
            for i, pid in enumerate(pids):
                split_of[pid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
        for r in rows:
            r["split"] = split_of[key(r)]
    check_patient_splits(rows)


def check_patient_splits(rows: list[dict]) -> None:
    """Raise if any patient appears in more than one split."""
    seen: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        seen[_patient_key(r)].add(r["split"])
    leaks = sorted(p for p, s in seen.items() if len(s) > 1)
    if leaks:
        raise IngestError(
            f"{len(leaks)} patient(s) appear in more than one split (e.g. {leaks[:3]}); "
            "patient-level splits are required — fix the split column or let medsynth compute splits"
        )


def split_counts(rows: list[dict], classes: list[str]) -> dict[str, dict[str, int]]:
    """``{split: {class: count}}`` for every split and class (zeros included)."""
    out = {s: dict.fromkeys(classes, 0) for s in SPLITS}
    for r in rows:
        out[r["split"]][r["label"]] += 1
    return out
