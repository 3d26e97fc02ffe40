"""Timestep grids of the samplers (plain Python)."""

from __future__ import annotations


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
