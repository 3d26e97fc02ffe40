"""Exponential moving average of weights, parametrised by a half-life in optimizer steps."""

from __future__ import annotations

import copy

import torch


class EMA:
    """``ema <- beta * ema + (1 - beta) * model`` with ``beta = 0.5 ** (1 / halflife_steps)``.

    Early on beta is capped at ``(1 + n) / (10 + n)`` (n = updates so far) so a short run is not
    dominated by its random initialisation.
    """

    def __init__(self, model: torch.nn.Module, halflife_steps: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.beta = 0.5 ** (1.0 / halflife_steps)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        beta = min(self.beta, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.module.parameters(), model.parameters(), strict=True):
            e.lerp_(p.detach(), 1.0 - beta)
        for e, b in zip(self.module.buffers(), model.buffers(), strict=True):
            e.copy_(b)
        self.updates += 1
