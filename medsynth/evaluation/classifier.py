"""Downstream classifiers (MONAI networks) with a scikit-learn-style fit / predict_proba.

``resnet18``: MONAI's 2-D ResNet-18 adapted to small images (3x3 stem, stride 1, no max-pool),
as in the MedMNIST v2 baselines. ``small_cnn``: a 4-block CNN for fast CPU studies. The epoch
kept is the one with the best validation AUC; features are the penultimate activations.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medsynth.evaluation.stats import auc_score
from medsynth.runtime import resolve_precision


@dataclass
class ClassifierConfig:
    kind: str = "small_cnn"  # small_cnn | resnet18
    width: float = 1.0  # channel multiplier (resnet18: MONAI widen_factor)
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    augment: bool = False  # classical augmentation: shifts, small rotations, contrast
    precision: str = "auto"  # auto | fp32 | bf16 (auto: see resolve_precision)
    device: str = "cpu"
    # NHWC activations: oneDNN's fast convolution/BatchNorm path on CPU; equal results up to
    # float summation order. A speed knob, kept switchable for benchmarks/classifier.py.
    channels_last: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


class SmallCNN(nn.Module):
    """Conv blocks 32-64-128 with BatchNorm, global average pooling, linear head."""

    def __init__(self, in_channels: int, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        c = [max(8, int(round(v * width))) for v in (32, 64, 128)]

        def block(i, o):
            return nn.Sequential(
                nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True)
            )

        self.body = nn.Sequential(
            block(in_channels, c[0]),
            block(c[0], c[0]),
            nn.MaxPool2d(2),
            block(c[0], c[1]),
            block(c[1], c[1]),
            nn.MaxPool2d(2),
            block(c[1], c[2]),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(c[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def build_network(kind: str, in_channels: int, num_classes: int, width: float = 1.0) -> nn.Module:
    if kind == "small_cnn":
        return SmallCNN(in_channels, num_classes, width)
    if kind == "resnet18":
        from monai.networks.nets import ResNet

        return ResNet(
            block="basic",
            layers=[2, 2, 2, 2],
            block_inplanes=[64, 128, 256, 512],
            spatial_dims=2,
            n_input_channels=in_channels,
            conv1_t_size=3,
            conv1_t_stride=1,
            no_max_pool=True,
            widen_factor=width,
            num_classes=num_classes,
        )
    raise ValueError(f"unknown classifier kind {kind!r}; valid choices: resnet18, small_cnn")


def classical_augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shift (±8 %), rotation (±10°), contrast (×0.9-1.1) and brightness (±0.1) per image.

    ``x``: ``(B, C, H, W)`` in [-1, 1]; parameters drawn from ``g`` once per image.
    """
    b = x.shape[0]
    angle = (torch.rand(b, generator=g) * 2 - 1) * math.radians(10)
    shift = (torch.rand(b, 2, generator=g) * 2 - 1) * 0.16  # grid units: 2 = full width
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    contrast = 1 + (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1) * 0.1
    bright = (torch.rand(b, 1, 1, 1, generator=g) * 2 - 1) * 0.1
    return (out * contrast + bright).clamp(-1, 1)


# Pixels per inference batch: 512 images at 64 px (the old fixed batch) but only 32 at 256 px
# and 2 at 1024 px, so activation memory stays near 1 GiB whatever the image size.
INFERENCE_PIXELS = 512 * 64 * 64


def inference_batch(spatial: tuple[int, int]) -> int:
    """Images per no-grad forward batch for images of ``spatial`` (H, W) px: 1 to 512."""
    return max(1, min(512, INFERENCE_PIXELS // (spatial[0] * spatial[1])))


class Classifier:
    """fit / predict_proba / features over ``(N, C, H, W)`` float tensors in [-1, 1]."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        config: ClassifierConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.cfg = copy.copy(config or ClassifierConfig())
        self.cfg.precision = resolve_precision(self.cfg.precision, self.cfg.device)
        self.num_classes, self.in_channels, self.seed = num_classes, in_channels, seed
        torch.manual_seed(seed)
        self.net = build_network(self.cfg.kind, in_channels, num_classes, self.cfg.width).to(
            self.cfg.device, memory_format=self._memory_format()
        )
        self.history: list[dict] = []
        self.best_epoch = -1

    def _memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.cfg.channels_last else torch.contiguous_format

    def _autocast(self):
        dev = torch.device(self.cfg.device).type
        return torch.autocast(dev, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    def fit(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        x_val: torch.Tensor,
        y_val: torch.Tensor,
        sample_weight: torch.Tensor | None = None,
    ) -> Classifier:
        """Train for ``epochs``; keep the weights of the epoch with the best validation AUC."""
        cfg, dev = self.cfg, torch.device(self.cfg.device)
        g = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = max(1, math.ceil(len(x) / cfg.batch_size))
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, cfg.lr, total_steps=cfg.epochs * steps_per_epoch
        )
        best, best_state = -1.0, None
        y_val_np = y_val.numpy()
        for epoch in range(cfg.epochs):
            self.net.train()
            perm = torch.randperm(len(x), generator=g)
            total = 0.0
            for i in range(0, len(x), cfg.batch_size):
                idx = perm[i : i + cfg.batch_size]
                if len(idx) < 2:
                    continue  # BatchNorm needs two samples
                xb = x[idx]
                if cfg.augment:
                    xb = classical_augment(xb, g)
                with self._autocast():
                    logits = self.net(xb.to(dev, memory_format=self._memory_format())).float()
                loss = F.cross_entropy(logits, y[idx].to(dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += loss.item() * len(idx)
            auc = auc_score(y_val_np, self.predict_proba(x_val), self.num_classes)
            self.history.append({"epoch": epoch, "train_loss": total / len(x), "val_auc": auc})
            if auc > best:
                best, best_state, self.best_epoch = auc, copy.deepcopy(self.net.state_dict()), epoch
        if best_state is not None:
            self.net.load_state_dict(best_state)
        return self

    @torch.no_grad()
    def _forward(self, x: torch.Tensor, features: bool, batch: int | None = None) -> np.ndarray:
        self.net.eval()
        batch = batch or inference_batch(tuple(x.shape[-2:]))
        dev, outs = torch.device(self.cfg.device), []
        feats: list[torch.Tensor] = []
        hook = (
            self.net.fc.register_forward_hook(lambda m, i, o: feats.append(i[0].float()))
            if features
            else None
        )
        try:
            for i in range(0, len(x), batch):
                # float32 whatever the caller holds (an ingest cache is fp16); autocast decides.
                xb = x[i : i + batch].to(dev, torch.float32, memory_format=self._memory_format())
                with self._autocast():
                    logits = self.net(xb).float()
                outs.append(feats.pop() if features else logits.softmax(1))
        finally:
            if hook:
                hook.remove()
        return torch.cat(outs).cpu().numpy() if outs else np.zeros((0, self.num_classes))

    def predict_proba(self, x: torch.Tensor) -> np.ndarray:
        """``(N, K)`` class probabilities."""
        return self._forward(x, features=False)

    def features(self, x: torch.Tensor) -> np.ndarray:
        """``(N, D)`` penultimate activations (the extractor behind ``FD_clf`` etc.)."""
        return self._forward(x, features=True)
