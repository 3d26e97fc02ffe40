"""Classifier-health warnings: a study whose classifier cannot measure anything says so."""

import numpy as np

from medsynth.evaluation.health import classifier_health, feature_variance_share


def _rows(aucs, best_epochs, bal=0.8):
    rows = [
        {"arm": "real_only", "seed": s, "auc": a, "balanced_accuracy": bal, "best_epoch": b}
        for s, (a, b) in enumerate(zip(aucs, best_epochs, strict=True))
    ]
    # Other arms never trigger anything: only real-only is the yardstick.
    return rows + [
        {"arm": "synthetic:p:random@1", "auc": 0.5, "balanced_accuracy": 0.3, "best_epoch": 0}
    ]


def test_a_healthy_classifier_gets_no_warning():
    feats = np.random.default_rng(0).normal(size=(20, 8))
    assert classifier_health(_rows([0.85, 0.88, 0.86], [4, 7, 5]), 10, feats) == []


def test_chance_first_epoch_and_dead_features_are_named():
    # The fundus sweep of 2026-12-03: AUC 0.54 / 0.43, best epoch 0, constant features.
    w = classifier_health(_rows([0.54, 0.43], [0, 0], bal=1 / 3), 10, np.ones((30, 16)))
    assert len(w) == 3
    assert "near chance (mean test AUC 0.485" in w[0] and "balanced accuracy 0.333" in w[0]
    assert "first in every seed" in w[1]
    assert "nearly the same features for every image" in w[2]


def test_feature_variance_share_separates_a_collapsed_extractor():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, size=(1, 64))
    collapsed = base + 1e-3 * rng.normal(size=(133, 64))  # like the invalid fundus run
    assert feature_variance_share(collapsed) < 1e-4
    assert feature_variance_share(np.zeros((5, 3))) == 0.0
    assert 0.9 < feature_variance_share(rng.normal(size=(200, 16))) <= 1.0
    w = classifier_health(_rows([0.85, 0.86], [3, 4]), 10, collapsed)
    assert len(w) == 1 and "varies between images" in w[0] and "FD_clf" in w[0]


def test_last_epoch_in_every_seed_reads_under_trained_but_not_in_some():
    w = classifier_health(_rows([0.92, 0.93], [9, 9]), 10)
    assert len(w) == 1 and "under-trained" in w[0] and "duplicate control" in w[0]
    assert classifier_health(_rows([0.92, 0.93], [9, 6]), 10) == []
    assert classifier_health(_rows([0.92], [0]), 1) == []  # one epoch: nothing to say
