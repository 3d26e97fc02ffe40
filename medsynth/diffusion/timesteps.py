"""Timestep grids and sampler revisions: plain Python, so stage hashing does not import torch."""

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


# Samplers whose pixels changed after pools were made with them. The revision joins a pool's
# request, its derivation and its stage hash, so an older pool is regenerated, never resumed
# into or mixed. Revision 2 steps over `trailing_timesteps`. Before it, ddim stepped a fixed
# T // n over MONAI's linspace(T - 1, 0, n) grid (the image noisier than the level the network
# was told: residual noise of sigma ~0.14 at 10 steps) and ddpm made n + 1 calls when n does
# not divide T; ddpm with n dividing T is unchanged and keeps its hashes.
def sampler_revision(sampler: str, steps: int, num_train_timesteps: int) -> dict:
    """``{"sampler_revision": 2}`` where revision 2 changed the pixels, else ``{}``."""
    changed = sampler == "ddim" or (sampler == "ddpm" and num_train_timesteps % steps != 0)
    return {"sampler_revision": 2} if changed else {}
