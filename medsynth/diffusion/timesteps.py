"""Timestep grids of the samplers (plain Python)."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence


def trailing_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps from ``T - 1`` down, evenly spaced, the last at ``T / steps - 1``.

    "Trailing" spacing (Lin et al. 2024, as diffusers' DPM-Solver++ here): every call does
    work, none is spent at t = 0, and for ``steps`` dividing ``T`` it is ``T - 1, T - 1 - T / n,
    ...``. ``T (n - i) / n`` is rounded half up in integers, so no float error can move a step.
    """
    T, n = num_train_timesteps, steps
    if not 1 <= n <= T:
        raise ValueError(f"steps must lie in [1, {T}], got {n}")
    return [(2 * T * (n - i) + n) // (2 * n) - 1 for i in range(n)]


def karras_timesteps(sigmas: Sequence[float], steps: int, rho: float = 7.0) -> list[int]:
    """``steps`` distinct timesteps from ``T - 1`` down to 0, spaced as EDM's sigmas (Karras et
    al. 2022, eq. 5, rho 7): most steps at low noise, where the fine texture forms.

    ``sigmas``: the schedule's noise-to-signal ratio ``sqrt((1 - abar_t) / abar_t)`` per
    timestep, ``(T,)`` increasing. Each EDM sigma is mapped to the timestep nearest in log
    sigma; where rounding would repeat a timestep (the low end of a long grid) the grid is
    pushed up one level at a time (and capped at ``T - 1 - i``), so every call sits at its own,
    exactly known noise level.
    The last call is at t = 0 (sigma ~ 0.03 for MONAI's scaled-linear betas) rather than the
    trailing grid's ``T / steps - 1`` (sigma ~ 0.13 at 50 of 1,000 steps).
    """
    T, n = len(sigmas), steps
    if not 1 <= n <= T:
        raise ValueError(f"steps must lie in [1, {T}], got {n}")
    if n == 1:
        return [T - 1]
    logs = [math.log(s) for s in sigmas]
    hi, lo = sigmas[-1] ** (1 / rho), sigmas[0] ** (1 / rho)
    ts = []
    for i in range(n):
        target = math.log((hi + i / (n - 1) * (lo - hi)) ** rho)
        k = min(max(bisect.bisect_left(logs, target), 1), T - 1)
        ts.append(k if logs[k] - target < target - logs[k - 1] else k - 1)
    for i in range(n - 2, -1, -1):  # distinct: push colliding low levels up
        ts[i] = max(ts[i], ts[i + 1] + 1)
    return [min(t, T - 1 - i) for i, t in enumerate(ts)]  # and within [0, T) near steps = T
