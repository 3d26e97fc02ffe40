"""Evaluation metrics with known answers, the classifier, statistics and a tiny study."""

import numpy as np
import pytest
import torch

from medsynth.evaluation.classifier import Classifier, ClassifierConfig, classical_augment
from medsynth.evaluation.fidelity import fd, fidelity_diversity, kid, msssim_ratio, prdc, vendi
from medsynth.evaluation.memorization import audit, audit_line
from medsynth.evaluation.selection import kcenter_greedy, select
from medsynth.evaluation.stats import fast_metric, metrics, paired_bootstrap_diff, spearman_with_ci


def _images(n, seed, size=16):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, 4, 4, generator=g)
    return torch.nn.functional.interpolate(base, size=size, mode="bilinear").clamp(-1, 1)


def test_identical_sets():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(300, 16))
    imgs = _images(300, 0)
    m = fidelity_diversity(f, f.copy(), imgs, imgs.clone())
    assert abs(m["FD_clf"]) < 1e-6 and abs(m["KID_clf"]) < 0.05
    assert m["coverage_clf"] == 1.0 and m["precision_clf"] == 1.0 and m["recall_clf"] == 1.0
    assert abs(m["msssim_ratio"] - 1) < 1e-6


def test_fd_matches_monai_where_it_runs():
    from monai.metrics import FIDMetric

    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(400, 6)), rng.normal(size=(300, 6)) * 1.5 + 0.3
    try:
        ref = float(FIDMetric()(torch.as_tensor(b), torch.as_tensor(a)))
    except TypeError:
        pytest.skip("MONAI's FIDMetric does not run with this SciPy")
    assert fd(a, b) == pytest.approx(ref, rel=1e-6)


def test_fd_with_fewer_images_than_dimensions_is_the_covariance_form():
    """Per-class sets are often smaller than the feature size (121 images, 512 ResNet features):
    the nuclear-norm form must give the Fréchet distance of the D x D covariances."""
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(30, 48)), rng.normal(size=(40, 48)) * 1.3 + 0.2
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.sqrt(np.clip(np.linalg.eigvals(s_a @ s_b).real, 0, None)).sum()
    ref = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * root
    assert fd(a, b) == pytest.approx(ref, rel=1e-6)
    assert fd(a, a.copy()) == pytest.approx(0.0, abs=1e-6)


def test_disjoint_sets():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16)) + 10
    assert fd(a, b) > 1000 and kid(a, b) > 1
    p = prdc(a, b)
    assert p["precision"] == 0 and p["recall"] == 0 and p["coverage"] == 0


def test_collapsed_pool_is_not_diverse_and_flagged():
    real = _images(200, 1)
    train, holdout = real[:150], real[150:]
    collapsed = train[:1].repeat(50, 1, 1, 1)
    rng = np.random.default_rng(0)
    f_train = rng.normal(size=(150, 8))
    assert vendi(collapsed.numpy()) == pytest.approx(1.0, abs=1e-6)
    assert vendi(np.eye(20)) == pytest.approx(20.0, rel=1e-6)
    assert msssim_ratio(collapsed, real) > 1.5  # far more alike than real images are
    res = audit(
        collapsed.numpy(),
        train.numpy(),
        holdout.numpy(),
        np.repeat(f_train[:1], 50, 0),
        f_train,
        rng.normal(size=(50, 8)),
    )
    assert res["share_flagged"] == 1.0 and res["exact_copies"] == 50


def test_copies_of_training_images_are_flagged_and_fresh_ones_are_not():
    real = _images(300, 2)
    train, holdout, fresh = real[:200], real[200:250], real[250:]
    rng = np.random.default_rng(1)
    f = rng.normal(size=(300, 8))
    copies = audit(train[:40].numpy(), train.numpy(), holdout.numpy(), f[:40], f[:200], f[200:250])
    assert copies["exact_copies"] == 40 and copies["share_flagged"] == 1.0
    unseen = audit(fresh.numpy(), train.numpy(), holdout.numpy(), f[250:], f[:200], f[200:250])
    assert unseen["exact_copies"] == 0 and unseen["share_flagged"] < 0.2


def test_kcenter_covers_clusters_random_may_not():
    rng = np.random.default_rng(0)
    big = rng.normal(size=(500, 2))
    far = rng.normal(size=(5, 2)) + 50
    feats = np.concatenate([big, far])
    chosen = kcenter_greedy(feats, 4, seed=0)
    assert len(set(chosen)) == 4 and any(i >= 500 for i in chosen)
    assert len(select("random", 10, feats, seed=1)) == 10
    conf = np.linspace(0, 1, len(feats))
    assert list(select("fidelity", 3, feats, conf)) == [504, 503, 502]
    with pytest.raises(ValueError, match="valid choices"):
        select("best", 3, feats)


def test_metrics_and_fast_paths_agree():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(y * 0.3 + rng.uniform(0, 0.7, 200), 0, 1)
    proba = np.stack([1 - p1, p1], 1)
    m = metrics(y, proba, ["a", "b"])
    for name in ("auc", "accuracy", "balanced_accuracy"):
        assert fast_metric(name, y, proba, 2) == pytest.approx(m[name])
    assert 0 <= m["sensitivity_b"] <= 1 and 0 <= m["specificity_b"] <= 1


def test_multiclass_fast_auc_equals_sklearn_ovr_macro():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 150)
    logits = rng.normal(size=(150, 3)) + 1.5 * np.eye(3)[y]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    proba[:10] = proba[10]  # ties
    m = metrics(y, proba, ["a", "b", "c"])
    assert fast_metric("auc", y, proba, 3) == pytest.approx(m["auc"], abs=1e-12)
    # A resample missing class 2: the mean over the classes present, not an exception.
    keep = y != 2
    two = [
        fast_metric("auc", (y[keep] == c).astype(int), proba[keep][:, [c, c]], 2) for c in (0, 1)
    ]
    assert fast_metric("auc", y[keep], proba[keep], 3) == pytest.approx(np.mean(two))


def test_paired_bootstrap_detects_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)

    def proba(noise, seed):
        r = np.random.default_rng(seed)
        s = np.clip(y + r.normal(0, noise, len(y)), -3, 4)
        p = 1 / (1 + np.exp(-(s - 0.5) * 3))
        return np.stack([1 - p, p], 1)

    good = [proba(0.3, s) for s in range(5)]
    bad = [proba(1.2, 10 + s) for s in range(5)]
    same = [proba(1.2, 20 + s) for s in range(5)]
    d = paired_bootstrap_diff(y, good, bad, "auc", ["a", "b"], n_boot=300)
    assert d["diff"] > 0.1 and d["ci_low"] > 0
    d0 = paired_bootstrap_diff(y, same, bad, "auc", ["a", "b"], n_boot=300)
    assert d0["ci_low"] < 0 < d0["ci_high"]


def test_spearman_ci():
    x = np.arange(10.0)
    r = spearman_with_ci(x, x**2)
    assert r["rho"] == pytest.approx(1.0) and r["ci_low"] > 0.9
    assert np.isnan(spearman_with_ci([1, 2], [2, 1])["rho"])


def test_classifier_learns_and_features():
    g = torch.Generator().manual_seed(0)
    n = 160
    y = torch.arange(n) % 2
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.3
    x[y == 1, :, 4:12, 4:12] += 1.0
    cfg = ClassifierConfig(epochs=5, batch_size=32, precision="fp32")
    clf = Classifier(2, 1, cfg, seed=0).fit(x[:120], y[:120], x[120:], y[120:])
    p = clf.predict_proba(x[120:])
    assert p.shape == (40, 2) and np.allclose(p.sum(1), 1, atol=1e-5)
    assert metrics(y[120:].numpy(), p, ["a", "b"])["auc"] > 0.95
    assert clf.features(x[:7]).shape == (7, 128)
    # An ingest cache holds fp16: the classifier reads it like float32 (it once raised).
    assert np.allclose(clf.predict_proba(x[120:].half()), p, atol=2e-3)
    assert len(clf.history) == 5 and 0 <= clf.best_epoch < 5
    aug = classical_augment(x[:8], torch.Generator().manual_seed(1))
    assert aug.shape == x[:8].shape and not torch.equal(aug, x[:8]) and aug.abs().max() <= 1


def test_inference_batches_shrink_with_the_image():
    """No-grad batches hold about as many pixels at 1024 px as at 64 px (memory: one 256 px
    evaluation peaked at 5 GB with a fixed 512-image batch); results do not depend on it."""
    from medsynth.evaluation.classifier import inference_batch

    assert [inference_batch((s, s)) for s in (28, 64, 256, 1024, 4096)] == [512, 512, 32, 2, 1]
    clf = Classifier(2, 1, ClassifierConfig(precision="fp32"), seed=0)
    x = torch.randn(9, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    whole = clf._forward(x, features=True)
    assert np.allclose(clf._forward(x, features=True, batch=2), whole, atol=1e-5)


def test_resnet18_builds_for_small_images():
    clf = Classifier(3, 1, ClassifierConfig(kind="resnet18", width=0.25, epochs=1))
    assert clf.predict_proba(torch.zeros(2, 1, 28, 28)).shape == (2, 3)
    assert clf.features(torch.zeros(2, 1, 28, 28)).shape == (2, 128)


def _leaky_audit_data():
    """Phantom train set, held-out set with planted near-copies of train, synthetic near-copies."""
    from medsynth.data.phantoms import draw_anatomy, render

    rng = np.random.default_rng(7)
    img = np.stack([render(draw_anatomy(rng), "normal", 0.3, 32, rng) for _ in range(300)])
    img = (img[:, None] * 2 - 1).astype(np.float32)
    train, clean_holdout, fresh = img[:150], img[150:270], img[270:]
    leaked = train[:30] + rng.normal(0, 0.002, train[:30].shape)  # corr ~0.9999: crops/re-exports
    holdout = np.concatenate([clean_holdout, leaked]).astype(np.float32)
    near = train[40:50] + rng.normal(0, 0.04, train[40:50].shape)  # corr ~0.99: memorized
    synthetic = np.concatenate([fresh, near]).astype(np.float32)
    f = rng.normal(size=(300, 8))
    f_hold = np.concatenate([f[150:270], f[:30]])
    f_syn = np.concatenate([f[270:], rng.normal(size=(10, 8))])
    return synthetic, train, holdout, f_syn, f[:150], f_hold


def test_audit_on_a_leaky_split_is_not_informative_without_exclusion():
    data = _leaky_audit_data()
    blind = audit(*data, exclude_threshold=None)  # the calibration before the fix
    assert blind["pixel_threshold"] >= 0.999 and not blind["informative"]
    assert "degenerate pixel threshold" in blind["not_informative_reason"]
    assert audit_line(blind).startswith("audit not informative")
    assert "% of" not in audit_line(blind)  # never a bare "0.0 % flagged"


def test_audit_calibrates_on_heldout_images_that_are_not_near_copies():
    data = _leaky_audit_data()
    res = audit(*data, exclude_threshold=0.99)
    assert res["informative"] and res["n_calibration"] == 120
    assert res["n_holdout"] == 150 and res["n_holdout_near_duplicates"] == 30
    assert res["pixel_threshold"] < 0.99
    flagged = np.array(res["per_sample"]["flagged"])
    assert flagged[30:].all()  # the memorized samples
    assert flagged[:30].mean() < 0.2
    # Two OR-ed criteria flag more than 1 - q of held-out images (here 2 + 2 of 120 at most).
    assert res["holdout_flag_rate_nominal"] < res["holdout_flag_rate"] <= 4 / 120
    assert "calibrated on 120 held-out images, 30 near-copies" in audit_line(res)


def test_audit_with_too_few_calibration_images_says_so():
    synthetic, train, holdout, f_syn, f_train, f_hold = _leaky_audit_data()
    res = audit(synthetic, train, holdout[:40], f_syn, f_train, f_hold[:40])
    assert not res["informative"] and "too small (40" in res["not_informative_reason"]


def test_class_counts_minority_topup_fills_the_smaller_class_first():
    import torch

    from medsynth.evaluation.study import class_counts

    labels = torch.tensor([0] * 10 + [1] * 30)
    assert class_counts(labels, 2, 0.5, "minority_topup") == [20, 0]  # 30/30 after top-up
    assert class_counts(labels, 2, 1.0, "minority_topup") == [30, 10]  # 40/40
    assert class_counts(labels, 2, 1.0, "proportional") == [10, 30]
    assert sum(class_counts(labels, 2, 0.25, "minority_topup")) == 10
