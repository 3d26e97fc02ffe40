"""The review database: SQLite in the run folder, safe under concurrent writers.

One connection per operation, ``busy_timeout``, ``BEGIN IMMEDIATE`` (the write lock is taken
before reading, so concurrent upserts queue instead of failing), an upsert keyed by (sample,
reviewer) and an append-only audit table. The default DELETE journal mode is kept on purpose
(WAL had a corruption bug before SQLite 3.51.3). A decision stores the sample's pixel SHA-256,
so it never attaches to a regenerated file with other pixels.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DECISIONS = ("accept", "reject", "unsure")
DB_NAME = "review.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    sample TEXT NOT NULL, reviewer TEXT NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('accept', 'reject', 'unsure')),
    corrected_label TEXT, note TEXT NOT NULL DEFAULT '', pixel_sha256 TEXT NOT NULL,
    updated_at REAL NOT NULL, PRIMARY KEY (sample, reviewer));
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, sample TEXT NOT NULL, reviewer TEXT NOT NULL,
    decision TEXT NOT NULL, corrected_label TEXT, note TEXT NOT NULL, pixel_sha256 TEXT NOT NULL,
    at REAL NOT NULL);
"""


def db_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / DB_NAME


@contextmanager
def _connect(path: Path, write: bool) -> Iterator[sqlite3.Connection]:
    con = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        con.execute("PRAGMA busy_timeout = 30000")
        if write:
            con.execute("BEGIN IMMEDIATE")
        yield con
        if write:
            con.execute("COMMIT")
    except BaseException:
        if write and con.in_transaction:
            con.execute("ROLLBACK")
        raise
    finally:
        con.close()


def init_db(path: str | Path) -> Path:
    path = Path(path)
    with _connect(path, write=False) as con:
        con.executescript(SCHEMA)
    return path


def decide(path: str | Path, sample: str, reviewer: str, decision: str, pixel_sha256: str,
           corrected_label: str | None = None, note: str = "") -> None:  # fmt: skip
    """Record (or change) one reviewer's decision on one sample, and append it to the audit log."""
    if decision not in DECISIONS:
        raise ValueError(f"unknown decision {decision!r}; valid choices: {', '.join(DECISIONS)}")
    if not reviewer.strip():
        raise ValueError("a reviewer name is required")
    path = init_db(path)
    now = time.time()
    with _connect(path, write=True) as con:
        con.execute(
            "INSERT INTO decisions (sample, reviewer, decision, corrected_label, note, pixel_sha256, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sample, reviewer) DO UPDATE SET decision = excluded.decision, "
            "corrected_label = excluded.corrected_label, note = excluded.note, pixel_sha256 = excluded.pixel_sha256, "
            "updated_at = excluded.updated_at",
            (sample, reviewer, decision, corrected_label, note, pixel_sha256, now),
        )
        con.execute(
            "INSERT INTO audit (sample, reviewer, decision, corrected_label, note, pixel_sha256, at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (sample, reviewer, decision, corrected_label, note, pixel_sha256, now),
        )


def decisions(path: str | Path, reviewer: str | None = None) -> list[dict]:
    """Current decisions (one per sample and reviewer), optionally for one reviewer."""
    path = Path(path)
    if not path.exists():
        return []
    with _connect(path, write=False) as con:
        con.row_factory = sqlite3.Row
        q, args = "SELECT * FROM decisions", ()
        if reviewer:
            q, args = q + " WHERE reviewer = ?", (reviewer,)
        return [dict(r) for r in con.execute(q + " ORDER BY sample, reviewer", args)]


def audit_log(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with _connect(path, write=False) as con:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute("SELECT * FROM audit ORDER BY id")]


def status_by_sample(
    path: str | Path, pixel_sha: dict[str, str], reviewer: str | None = None
) -> dict[str, dict]:
    """sample -> {status, corrected_label, note} from decisions whose pixel hash still matches.

    Across reviewers a sample is ``accept`` only if nobody rejected or was unsure; ``reject``
    wins over ``unsure``. Decisions on a file whose pixels changed since are ignored.
    """
    merged: dict[str, dict] = {}
    for d in decisions(path, reviewer):
        if pixel_sha.get(d["sample"]) != d["pixel_sha256"]:
            continue
        cur = merged.setdefault(d["sample"], {"decisions": []})
        cur["decisions"].append(d)
    for cur in merged.values():
        kinds = {d["decision"] for d in cur["decisions"]}
        cur["status"] = (
            "reject" if "reject" in kinds else "unsure" if "unsure" in kinds else "accept"
        )
        labels = [d["corrected_label"] for d in cur["decisions"] if d["corrected_label"]]
        cur["corrected_label"] = labels[-1] if labels else None
        cur["note"] = "; ".join(d["note"] for d in cur["decisions"] if d["note"])
    return merged
