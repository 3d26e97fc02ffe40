"""Faster classifier fits keep each seed's result: grouped seeds, channels-last, bf16."""

import copy
import warnings

import numpy as np
import pytest
import torch

from medsynth import runtime
from medsynth.evaluation.classifier import Classifier, ClassifierConfig
from medsynth.evaluation.grouped import GroupedSmallCNN, fit_seeds
from medsynth.evaluation.stats import auc_score
from medsynth.runtime import resolve_precision


def _task(n: int, seed: int, amp: float = 0.35):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.5
    x[y == 1, :, 4:12, 4:12] += amp
    return x.clamp(-1, 1), y


def _max_weight_diff(a: Classifier, b: Classifier) -> float:
    """Largest difference of any weight or BatchNorm statistic, relative to that tensor's scale."""
    sa, sb = a.net.state_dict(), b.net.state_dict()
    return max(
        ((sa[k].float() - sb[k].float()).abs().max() / (sa[k].float().abs().max() + 1e-3)).item()
        for k in sa
    )


@pytest.mark.parametrize("augment", [False, True])
def test_seed_k_of_the_grouped_fit_is_the_sequential_fit(augment):
    x, y = _task(100, 0)
    xv, yv = _task(40, 1)
    cfg = ClassifierConfig(epochs=3, batch_size=32, precision="fp32", augment=augment)
    seeds = [0, 1, 2]
    seq = [Classifier(2, 1, cfg, seed=s).fit(x, y, xv, yv) for s in seeds]
    grp = fit_seeds(2, 1, cfg, seeds, x, y, xv, yv, grouped=True)
    # Without augmentation: equal up to float summation order. With it, a max-pool tie that the
    # summation order flips sends a gradient another way, so allow a little more.
    tol = 0.1 if augment else 1e-3
    for a, b in zip(seq, grp, strict=True):
        assert a.best_epoch == b.best_epoch
        assert [h["val_auc"] for h in a.history] == pytest.approx(
            [h["val_auc"] for h in b.history], abs=0.02
        )
        assert augment or _max_weight_diff(a, b) < tol
        assert np.abs(a.predict_proba(xv) - b.predict_proba(xv)).max() < tol
    # Different seeds stay different (the groups do not leak into each other).
    assert _max_weight_diff(grp[0], grp[1]) > 1e-2


def test_grouped_network_splits_back_into_its_members():
    torch.manual_seed(0)
    nets = [Classifier(3, 2, ClassifierConfig(), seed=s).net for s in (5, 6)]
    grouped = GroupedSmallCNN(nets).eval()
    x = torch.randn(4, 2, 16, 16)
    out = grouped(torch.cat([x, x], dim=1))
    for k, net in enumerate(nets):
        assert torch.allclose(out[:, k], net.eval()(x), atol=1e-5)
        back = grouped.split_state()[k]
        assert all(torch.equal(back[n], t) for n, t in net.state_dict().items())


def test_channels_last_equals_contiguous_layout():
    # The layout changes memory order, not the maths: one step gives the same outputs and
    # gradients up to float summation order.
    x, y = _task(32, 0)
    net = Classifier(2, 1, ClassifierConfig(precision="fp32"), seed=3).net.train()
    twin = copy.deepcopy(net).to(memory_format=torch.channels_last)
    outs, grads = [], []
    for m, inp in ((net, x), (twin, x.contiguous(memory_format=torch.channels_last))):
        loss = torch.nn.functional.cross_entropy(m(inp), y)
        loss.backward()
        outs.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(outs[0], outs[1], rtol=1e-5)
    assert (grads[0] - grads[1]).abs().max() <= 1e-4 * grads[0].abs().max()
    # Whole fits: Adam amplifies rounding in near-zero gradients, so compare the predictions.
    xv, yv = _task(40, 1)
    fits = [
        Classifier(
            2,
            1,
            ClassifierConfig(epochs=2, batch_size=32, precision="fp32", channels_last=cl),
            seed=3,
        ).fit(*_task(100, 0), xv, yv)
        for cl in (False, True)
    ]
    assert np.abs(fits[0].predict_proba(xv) - fits[1].predict_proba(xv)).max() < 0.05


def test_bf16_fits_match_fp32_fits_in_distribution():
    if resolve_precision("auto") != "bf16":
        pytest.skip("no native bf16 on this CPU: auto stays fp32")
    x, y = _task(200, 0, amp=0.2)
    xv, yv = _task(80, 1, amp=0.2)
    xt, yt = _task(300, 2, amp=0.2)
    seeds = list(range(4))
    auc = {}
    for prec in ("fp32", "bf16"):
        cfg = ClassifierConfig(epochs=4, batch_size=32, precision=prec)
        clfs = fit_seeds(2, 1, cfg, seeds, x, y, xv, yv)
        auc[prec] = np.array([auc_score(yt.numpy(), c.predict_proba(xt), 2) for c in clfs])
    # Seed noise dominates: the bf16 mean sits inside the fp32 seeds' spread (and vice versa).
    spread = max(auc["fp32"].std(ddof=1), auc["bf16"].std(ddof=1), 0.01)
    assert abs(auc["bf16"].mean() - auc["fp32"].mean()) < 2 * spread + 0.01
    assert np.abs(auc["bf16"] - auc["fp32"]).max() < 0.08


def test_precision_auto_resolves(monkeypatch):
    """auto picks bf16 only where it is native; an explicit bf16 that would be emulated (13 s per
    training step against 0.9 s in fp32 on an AVX2-only CPU) warns and names the fix."""
    monkeypatch.setattr(runtime, "native_bf16", lambda device="cpu": False)
    assert resolve_precision("auto") == "fp32" and resolve_precision("fp32") == "fp32"
    with pytest.warns(UserWarning, match=r"training: precision bf16 is emulated.*precision: auto"):
        assert resolve_precision("bf16", "cpu", "training") == "bf16"
    monkeypatch.setattr(runtime, "native_bf16", lambda device="cpu": True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_precision("auto") == "bf16" and resolve_precision("bf16") == "bf16"
    monkeypatch.undo()
    assert Classifier(2, 1, ClassifierConfig(precision="auto")).cfg.precision in ("fp32", "bf16")
