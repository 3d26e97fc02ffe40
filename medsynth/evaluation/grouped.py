"""Train the seeds of one arm together: G small CNNs side by side as one grouped network.

A study fits every arm with ``seeds`` classifiers that differ only in their seed (initial
weights, batch order, augmentation draws). On a CPU each small fit is dominated by per-layer
overhead, so G fits run far faster as one network whose convolutions have ``groups=G``: group
``g`` holds seed ``g``'s channels, its BatchNorm channels see only its own batch, its head is
its own. Each seed keeps its own generator, optimizer state (AdamW is elementwise) and
best-epoch weights, and the loss is the sum of the per-seed losses, so seed ``g`` follows the
same computation as a sequential :meth:`Classifier.fit` up to float summation order.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medsynth.evaluation.classifier import Classifier, ClassifierConfig, SmallCNN, classical_augment
from medsynth.evaluation.stats import auc_score


def groupable(config: ClassifierConfig) -> bool:
    """Whether seeds of this classifier train as one grouped network by default.

    small_cnn on a GPU only: there a small fit is bound by kernel launches, which grouping
    divides by G. On a CPU every layer is already compute-bound (profiled: convolution,
    BatchNorm and pooling kernels, not dispatch), so grouping gains nothing there.
    """
    return config.kind == "small_cnn" and torch.device(config.device).type == "cuda"


def _group_conv(convs: list[nn.Conv2d]) -> nn.Conv2d:
    g, c0 = len(convs), convs[0]
    out = nn.Conv2d(
        c0.in_channels * g,
        c0.out_channels * g,
        c0.kernel_size,
        padding=c0.padding,
        bias=False,
        groups=g,
    )
    out.weight.data.copy_(torch.cat([c.weight.data for c in convs]))
    return out


def _group_bn(bns: list[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    out = nn.BatchNorm2d(bns[0].num_features * len(bns), eps=bns[0].eps, momentum=bns[0].momentum)
    for name in ("weight", "bias"):
        getattr(out, name).data.copy_(torch.cat([getattr(b, name).data for b in bns]))
    for name in ("running_mean", "running_var"):
        getattr(out, name).copy_(torch.cat([getattr(b, name) for b in bns]))
    return out


class GroupedSmallCNN(nn.Module):
    """``G`` :class:`SmallCNN` of equal shape as one network.

    ``forward(x)``: ``x`` ``(B, G*C, H, W)`` (seed ``g``'s images in channels ``g*C:(g+1)*C``)
    -> logits ``(B, G, K)``.
    """

    def __init__(self, nets: list[SmallCNN]) -> None:
        super().__init__()
        self.groups = len(nets)
        layers = []
        for parts in zip(*(n.body for n in nets), strict=True):
            if isinstance(parts[0], nn.Sequential):  # conv - BN - ReLU block
                layers.append(
                    nn.Sequential(
                        _group_conv([p[0] for p in parts]),
                        _group_bn([p[1] for p in parts]),
                        nn.ReLU(inplace=True),
                    )
                )
            else:  # pooling / flatten act per channel: shared as they are
                layers.append(parts[0])
        self.body = nn.Sequential(*layers)
        self.fc_weight = nn.Parameter(torch.stack([n.fc.weight.data for n in nets]))  # (G, K, D)
        self.fc_bias = nn.Parameter(torch.stack([n.fc.bias.data for n in nets]))  # (G, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x).view(x.shape[0], self.groups, -1)  # (B, G, D)
        return torch.einsum("bgd,gkd->bgk", h, self.fc_weight) + self.fc_bias

    def split_state(self) -> list[dict[str, torch.Tensor]]:
        """One :class:`SmallCNN` state dict per group (copies)."""
        g, out = self.groups, [{} for _ in range(self.groups)]
        for i, layer in enumerate(self.body):
            if not isinstance(layer, nn.Sequential):
                continue
            for j, mod in ((0, layer[0]), (1, layer[1])):
                for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
                    for k in range(g):
                        if t.dim() == 0:  # num_batches_tracked: equal in every group
                            out[k][f"body.{i}.{j}.{name}"] = t.detach().clone()
                        else:
                            out[k][f"body.{i}.{j}.{name}"] = t.detach().chunk(g)[k].clone()
        for k in range(g):
            out[k]["fc.weight"] = self.fc_weight.detach()[k].clone()
            out[k]["fc.bias"] = self.fc_bias.detach()[k].clone()
        return out


def fit_seeds(
    num_classes: int,
    in_channels: int,
    config: ClassifierConfig,
    seeds: list[int],
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    *,
    grouped: bool | None = None,
) -> list[Classifier]:
    """Fit one classifier per seed on the same data; return them in ``seeds`` order.

    ``x``: ``(N, C, H, W)`` float in [-1, 1], ``y``: ``(N,)`` long. Grouped when
    ``grouped`` (None: :func:`groupable`), else one :meth:`Classifier.fit` after the other. Each returned classifier
    holds its best-validation-AUC epoch's weights, its ``history`` and ``best_epoch``.
    """
    clfs = [Classifier(num_classes, in_channels, config, seed=s) for s in seeds]
    config = clfs[0].cfg  # precision resolved
    grouped = groupable(config) if grouped is None else grouped
    if not grouped or config.kind != "small_cnn" or len(seeds) < 2:
        return [c.fit(x, y, x_val, y_val) for c in clfs]
    cfg, dev, g = config, torch.device(config.device), len(seeds)
    mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
    net = GroupedSmallCNN([c.net for c in clfs]).to(dev, memory_format=mf)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(x) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch
    )

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    best = [-1.0] * g
    best_state: list[dict | None] = [None] * g
    y_val_np = y_val.numpy()
    for epoch in range(cfg.epochs):
        net.train()
        perms = [torch.randperm(len(x), generator=gen) for gen in gens]
        totals = torch.zeros(g)
        for i in range(0, len(x), cfg.batch_size):
            idx = [p[i : i + cfg.batch_size] for p in perms]
            if len(idx[0]) < 2:
                continue  # BatchNorm needs two samples
            xs = [x[ix] for ix in idx]
            if cfg.augment:
                xs = [classical_augment(xb, gen) for xb, gen in zip(xs, gens, strict=True)]
            xb = torch.cat(xs, dim=1).to(dev, memory_format=mf)  # (B, G*C, H, W)
            with autocast():
                logits = net(xb).float()  # (B, G, K)
            yb = torch.stack([y[ix] for ix in idx], dim=1).to(dev)  # (B, G)
            # Sum of the per-seed mean losses: each group's gradient is its own loss's gradient.
            per_seed = F.cross_entropy(logits.permute(0, 2, 1), yb, reduction="none").mean(0)
            opt.zero_grad(set_to_none=True)
            per_seed.sum().backward()
            opt.step()
            sched.step()
            totals += per_seed.detach().float().cpu() * len(idx[0])
        probas = _predict(net, x_val, autocast, dev, mf)
        states = None
        for k in range(g):
            auc = auc_score(y_val_np, probas[k], num_classes)
            clfs[k].history.append(
                {"epoch": epoch, "train_loss": float(totals[k]) / len(x), "val_auc": auc}
            )
            if auc > best[k]:
                states = states or net.split_state()
                best[k], best_state[k], clfs[k].best_epoch = auc, states[k], epoch
    final = net.split_state()
    for k, clf in enumerate(clfs):
        clf.net.load_state_dict(best_state[k] if best_state[k] is not None else final[k])
    return clfs


@torch.no_grad()
def _predict(
    net: GroupedSmallCNN, x: torch.Tensor, autocast, dev, mf, batch: int = 512
) -> list[np.ndarray]:
    """Per-group ``(N, K)`` probabilities of the same images ``x`` ``(N, C, H, W)``."""
    net.eval()
    outs = []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch].to(dev).repeat(1, net.groups, 1, 1).contiguous(memory_format=mf)
        with autocast():
            outs.append(net(xb).float().softmax(-1))
    p = torch.cat(outs).cpu().numpy()  # (N, G, K)
    return [p[:, k] for k in range(net.groups)]
