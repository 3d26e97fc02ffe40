"""CSV cells a person may open in a spreadsheet: formula injection neutralised, losslessly.

A cell starting with ``=``, ``+``, ``-``, ``@``, tab or carriage return is run as a formula by
spreadsheet programs (OWASP "CSV injection"); label values and paths from a user's table can
start that way. Such cells are written with a leading apostrophe, which spreadsheets show as
text, and :func:`restore` strips it again when medsynth reads the file back. Numbers (``-1.5``)
are left as they are.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import IO

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def neutralise(value: object) -> object:
    """``value`` safe to put in a CSV cell; :func:`restore` gives back the original string."""
    if not isinstance(value, str) or not value:
        return value
    bare = value.lstrip("'")
    if bare.startswith(FORMULA_START) and not _is_number(bare):
        # Quote also a value that already starts with quotes before a formula character, so
        # restore() (which strips exactly one) is its exact inverse.
        return "'" + value
    return value


def restore(value: object) -> object:
    """Inverse of :func:`neutralise`."""
    if isinstance(value, str) and value.startswith("'"):
        bare = value.lstrip("'")
        if bare.startswith(FORMULA_START) and not _is_number(bare):
            return value[1:]
    return value


def neutralise_row(row: dict) -> dict:
    return {k: neutralise(v) for k, v in row.items()}


def restore_row(row: dict) -> dict:
    return {k: restore(v) for k, v in row.items()}


def write_rows(fh: IO[str], columns: Iterable[str], rows: Iterable[dict], **kwargs) -> None:
    """``csv.DictWriter`` with a header and neutralised cells (extra keys ignored)."""
    w = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore", **kwargs)
    w.writeheader()
    w.writerows(neutralise_row(r) for r in rows)


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a CSV written by :func:`write_rows`, cells restored."""
    with Path(path).open(newline="") as fh:
        return [restore_row(r) for r in csv.DictReader(fh)]
