"""Uplift arms and audit notes for edited pools (inpainting / SDEdit of real training images).

An edited pool's manifest has an ``edit`` column. Its rows split into *variations* (target class
= source class) and *counterfactuals* (target class differs); each becomes an arm named
``variations@<s>:<pool>@<ratio>`` or ``counterfactual@<s>:<pool>@<ratio>`` (``s``: SDEdit
strength, or ``inpaint``). Arms are count-matched per class like every synthetic arm; where a
pool cannot fill the ratio's counts (a counterfactual pool only holds its target classes), the
arm gets its own duplicate control with exactly its per-class counts.
"""

from __future__ import annotations

import numpy as np

EDIT_ARMS = ("variations", "counterfactual")


def is_edit_pool(rows: list[dict]) -> bool:
    return bool(rows) and "edit" in rows[0]


def edit_groups(rows: list[dict]) -> list[tuple[str, str, np.ndarray]]:
    """``(arm kind, strength label, row indices)`` for each non-empty group of an edited pool."""
    out = []
    for kind, flag in (("variations", "0"), ("counterfactual", "1")):
        idx = np.array([i for i, r in enumerate(rows) if r["counterfactual"] == flag], np.int64)
        if len(idx) == 0:
            continue
        edits = {r["edit"] for r in rows}
        if edits == {"inpaint"}:
            label = "inpaint"
        else:
            label = "+".join(sorted({f"{float(rows[i]['strength']):g}" for i in idx}))
        out.append((kind, label, idx))
    return out


def edit_audit_fields(memo: dict, rows: list[dict], train_rows: list[dict]) -> dict:
    """Extra fields of an edited pool's memorization audit.

    Edits derive from a training image, so resemblance to it is by design: the flagged share is
    reported under its own name (``share_flagged_edits``), with the share whose nearest training
    image (pixels) is the edit's own source.
    """
    pos = {int(r["row"]): i for i, r in enumerate(train_rows)}
    nn = memo["per_sample"]["pixel_nn"]
    own = [pos.get(int(r["source_row"])) == nn[i] for i, r in enumerate(rows)]
    return {
        "derived_from_patient": True,
        "share_flagged_edits": memo["share_flagged"],
        "share_nearest_is_source": float(np.mean(own)) if own else float("nan"),
    }
