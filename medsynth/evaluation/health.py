"""Is the study's classifier able to measure anything? Warnings from the real-only arm.

An uplift table is only as good as the classifier under it. A real-only classifier at chance
(too few optimiser steps, a broken label join) makes every arm's "uplift" noise; one still
improving at its last epoch in every seed favours any arm with more images per epoch (it simply
trains longer), so only the duplicate control is a fair baseline; a dead penultimate layer makes
every ``*_clf`` fidelity and diversity metric constant. These are facts about the study, so they
travel with its summary, the sweep's recommendation and both reports.
"""

from __future__ import annotations

import numpy as np

CHANCE_AUC = 0.6  # mean real-only AUC below this reads "at chance"
# Share of the features' energy, tr(Cov) / mean ||f||^2, that varies between images, below
# which the extractor reads "constant": 7e-5 in the invalid fundus sweep, 0.29 on RSNA.
MIN_FEATURE_VARIANCE_SHARE = 1e-3


def classifier_health(
    rows: list[dict], epochs: int, real_features: np.ndarray | None = None
) -> list[str]:
    """Plain-sentence warnings (``[]`` when healthy) from the real-only arm's per-seed rows.

    ``rows``: the study's ``runs.csv`` rows (``arm``, ``auc``, ``balanced_accuracy``,
    ``best_epoch`` 0-based); ``epochs``: the classifier's epoch budget; ``real_features``:
    ``(N, D)`` extractor features of the real training images.
    """
    real = [r for r in rows if r["arm"] == "real_only"]
    if not real:
        return []
    out = []
    auc = float(np.nanmean([float(r["auc"]) for r in real]))
    bal = float(np.mean([float(r["balanced_accuracy"]) for r in real]))
    best = [int(r["best_epoch"]) for r in real]
    if not auc >= CHANCE_AUC:
        out.append(
            f"The real-only classifier is near chance (mean test AUC {auc:.3f}, balanced "
            f"accuracy {bal:.3f} over {len(real)} seeds): no uplift measured with it means "
            "anything. Give it more optimiser steps (evaluation.classifier.epochs, a smaller "
            "batch_size) or check the labels."
        )
    if epochs > 1 and all(b == 0 for b in best):
        out.append(
            "The real-only classifier's best validation epoch is the first in every seed: it "
            "never improved on the validation split."
        )
    elif epochs > 1 and all(b == epochs - 1 for b in best):
        out.append(
            f"The real-only classifier was still improving at its last epoch ({epochs}) in every "
            "seed: it is under-trained, so any arm with more images per epoch gains from "
            "training longer. Read uplift against the duplicate control only, or raise "
            "evaluation.classifier.epochs."
        )
    if real_features is not None and len(real_features) > 1:
        share = feature_variance_share(real_features)
        if not share >= MIN_FEATURE_VARIANCE_SHARE:
            out.append(
                "The feature extractor (real-only classifier, seed 0) gives nearly the same "
                f"features for every image ({share:.1e} of their energy varies between "
                "images): FD_clf, precision/recall/coverage and Vendi_clf are meaningless in "
                "this study."
            )
    return out


def feature_variance_share(features: np.ndarray) -> float:
    """tr(Cov) / mean squared norm of ``(N, D)`` features, in [0, 1]: 0 when every image has
    the same features (also for all-zero features), near 1 when they are centred."""
    f = features.reshape(len(features), -1).astype(np.float64)
    energy = float((f**2).sum(axis=1).mean())
    return float(f.var(axis=0).sum()) / energy if energy > 0 else 0.0
