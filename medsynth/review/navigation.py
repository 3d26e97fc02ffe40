"""Which sample the review points at, as a sample key (not a list position).

A position in a filtered list means a different sample as soon as the filter or a decision
changes the list ("unreviewed" drops the sample just decided), so the dashboard keeps the key
of the current sample and derives the position from it each time.
"""

from __future__ import annotations


def resolve(shown: list[str], order: dict[str, int], current: str | None) -> int:
    """Index in ``shown`` of ``current``; if it is filtered out, of the first shown sample after
    it in pool ``order`` (else the last one). ``shown`` is in pool order; -1 when it is empty."""
    if not shown:
        return -1
    if current is None or current not in order:
        return 0
    here = order[current]
    for i, k in enumerate(shown):
        if order[k] >= here:
            return i
    return len(shown) - 1


def step(shown: list[str], order: dict[str, int], current: str | None, delta: int) -> str | None:
    """The key ``delta`` places from ``current`` within ``shown`` (clamped); None if empty."""
    i = resolve(shown, order, current)
    if i < 0:
        return None
    if current in shown or delta <= 0:
        i = i + delta
    else:  # current is filtered out: the sample at ``i`` is already the next one
        i = i + delta - 1
    return shown[max(0, min(len(shown) - 1, i))]
