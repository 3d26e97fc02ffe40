"""The review database: SQLite in the run folder, safe under concurrent writers and readers.

One connection per operation, ``busy_timeout``, ``BEGIN IMMEDIATE`` (the write lock is taken
before reading, so concurrent upserts queue instead of failing), an upsert keyed by (sample,
reviewer) and an append-only audit table. The default DELETE journal mode is kept on purpose
(WAL had a corruption bug before SQLite 3.51.3). A decision stores the sample's pixel SHA-256,
so it never attaches to a regenerated file with other pixels.

The schema never races a reader: a new database is built in a temporary file and renamed into
place with its tables, and a reader that meets a file without tables (an empty file, a file from
an older version) sees no decisions instead of ``no such table``. A write holds the lock only
for its two statements (the schema check is a read before it).
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import threading
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
CREATE TABLE IF NOT EXISTS adjudications (
    sample TEXT PRIMARY KEY, adjudicator TEXT NOT NULL,
    decision TEXT NOT NULL CHECK (decision IN ('accept', 'reject', 'unsure')),
    corrected_label TEXT, note TEXT NOT NULL DEFAULT '', pixel_sha256 TEXT NOT NULL,
    updated_at REAL NOT NULL);
"""
TABLES = ("decisions", "audit", "adjudications")


def db_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / DB_NAME


# Writers of one process (the Streamlit server's sessions) queue on a lock instead of in SQLite's
# busy handler, whose growing sleeps let one writer starve for seconds while others get through.
_WRITE_LOCK = threading.Lock()


@contextmanager
def _connect(path: Path, write: bool) -> Iterator[sqlite3.Connection]:
    if write:
        with _WRITE_LOCK, _connect_unlocked(path, write) as con:
            yield con
    else:
        with _connect_unlocked(path, write) as con:
            yield con


@contextmanager
def _connect_unlocked(path: Path, write: bool) -> Iterator[sqlite3.Connection]:
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


def _tables(con: sqlite3.Connection) -> set[str]:
    return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def init_db(path: str | Path) -> Path:
    """Make sure ``path`` holds the review schema; never exposes a file without tables."""
    path = Path(path)
    if not path.exists():
        # Build the schema aside and rename it into place: readers see no file or a whole one.
        fd, tmp = tempfile.mkstemp(prefix=".review-", suffix=".sqlite", dir=path.parent)
        os.close(fd)
        try:
            con = sqlite3.connect(tmp, isolation_level=None)
            con.executescript(SCHEMA)
            con.close()
            os.chmod(tmp, 0o644)
            # Link, not exists-then-replace: two first writers could both see no file, and the
            # second replace would swap the file under the first one's open connection
            # ("attempt to write a readonly database"). A link fails if the path exists.
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another writer won; keep its file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        with _connect(path, write=False) as con:
            missing = set(TABLES) - _tables(con)
        if missing:  # an empty or older file: add the tables under the write lock
            with _connect(path, write=True) as con:
                for stmt in SCHEMA.split(";"):
                    if stmt.strip():
                        con.execute(stmt)
    return path


def _check(decision: str, reviewer: str) -> None:
    if decision not in DECISIONS:
        raise ValueError(f"unknown decision {decision!r}; valid choices: {', '.join(DECISIONS)}")
    if not reviewer.strip():
        raise ValueError("a reviewer name is required")


def decide(
    path: str | Path,
    sample: str,
    reviewer: str,
    decision: str,
    pixel_sha256: str,
    corrected_label: str | None = None,
    note: str = "",
) -> None:
    """Record (or change) one reviewer's decision on one sample, and append it to the audit log."""
    _check(decision, reviewer)
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


def clear(path: str | Path, sample: str, reviewer: str) -> bool:
    """Undo one reviewer's decision on a sample (audited as ``clear``). True if one existed."""
    if not reviewer.strip():
        raise ValueError("a reviewer name is required")
    path = init_db(path)
    with _connect(path, write=True) as con:
        gone = con.execute(
            "DELETE FROM decisions WHERE sample = ? AND reviewer = ? RETURNING pixel_sha256",
            (sample, reviewer),
        ).fetchall()
        if gone:
            con.execute(
                "INSERT INTO audit (sample, reviewer, decision, corrected_label, note, pixel_sha256, at) "
                "VALUES (?, ?, 'clear', NULL, '', ?, ?)",
                (sample, reviewer, gone[0][0], time.time()),
            )
    return bool(gone)


def adjudicate(
    path: str | Path,
    sample: str,
    adjudicator: str,
    decision: str,
    pixel_sha256: str,
    corrected_label: str | None = None,
    note: str = "",
) -> None:
    """Settle a sample the reviewers disagree on; the adjudication overrides every reviewer.

    Audited with the reviewer written as ``<adjudicator> (adjudication)``.
    """
    _check(decision, adjudicator)
    path = init_db(path)
    now = time.time()
    with _connect(path, write=True) as con:
        con.execute(
            "INSERT INTO adjudications VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (sample) DO UPDATE SET "
            "adjudicator = excluded.adjudicator, decision = excluded.decision, "
            "corrected_label = excluded.corrected_label, note = excluded.note, "
            "pixel_sha256 = excluded.pixel_sha256, updated_at = excluded.updated_at",
            (sample, adjudicator, decision, corrected_label, note, pixel_sha256, now),
        )
        con.execute(
            "INSERT INTO audit (sample, reviewer, decision, corrected_label, note, pixel_sha256, at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                sample,
                f"{adjudicator} (adjudication)",
                decision,
                corrected_label,
                note,
                pixel_sha256,
                now,
            ),
        )


def _select(path: Path, table: str, where: str = "", args: tuple = ()) -> list[dict]:
    if not path.exists():
        return []
    with _connect(path, write=False) as con:
        if table not in _tables(con):  # a file whose schema is not there yet: nothing decided
            return []
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute(f"SELECT * FROM {table} {where}", args)]


def decisions(path: str | Path, reviewer: str | None = None) -> list[dict]:
    """Current decisions (one per sample and reviewer), optionally for one reviewer."""
    if reviewer:
        return _select(Path(path), "decisions", "WHERE reviewer = ? ORDER BY sample", (reviewer,))
    return _select(Path(path), "decisions", "ORDER BY sample, reviewer")


def adjudications(path: str | Path) -> list[dict]:
    return _select(Path(path), "adjudications", "ORDER BY sample")


def audit_log(path: str | Path) -> list[dict]:
    return _select(Path(path), "audit", "ORDER BY id")


def status_by_sample(
    path: str | Path, pixel_sha: dict[str, str], reviewer: str | None = None
) -> dict[str, dict]:
    """sample -> {status, corrected_label, note, decisions, adjudicated} for current pixels.

    Across reviewers a sample is ``accept`` only if nobody rejected or was unsure; ``reject``
    wins over ``unsure``; reviewers who disagree on the corrected label leave it ``unsure``.
    An adjudication overrides all of that (not when one reviewer's view is asked for).
    Decisions on a file whose pixels changed since are ignored.
    """
    merged: dict[str, dict] = {}
    for d in decisions(path, reviewer):
        if pixel_sha.get(d["sample"]) != d["pixel_sha256"]:
            continue
        cur = merged.setdefault(d["sample"], {"decisions": [], "adjudicated": None})
        cur["decisions"].append(d)
    for cur in merged.values():
        kinds = {d["decision"] for d in cur["decisions"]}
        cur["status"] = (
            "reject" if "reject" in kinds else "unsure" if "unsure" in kinds else "accept"
        )
        labels = {d["corrected_label"] for d in cur["decisions"] if d["decision"] == "accept"}
        if cur["status"] == "accept" and len(labels) > 1:
            cur["status"] = "unsure"  # accepted under different labels: needs adjudication
        cur["corrected_label"] = next(iter(labels)) if len(labels) == 1 else None
        cur["note"] = "; ".join(d["note"] for d in cur["decisions"] if d["note"])
    if reviewer is None:
        for a in adjudications(path):
            if pixel_sha.get(a["sample"]) != a["pixel_sha256"]:
                continue
            cur = merged.setdefault(a["sample"], {"decisions": [], "note": ""})
            cur.update(status=a["decision"], corrected_label=a["corrected_label"], adjudicated=a)
            if a["note"]:
                cur["note"] = "; ".join(x for x in (cur["note"], a["note"]) if x)
    return merged
