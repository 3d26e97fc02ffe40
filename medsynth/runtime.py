"""CPU threads for torch and its OpenMP/MKL pools: one setting for every command.

Every core is the default (fastest for one job), but it oversubscribes a machine that runs
anything else: on a shared 2-core machine training was 3-9x slower until the count was lowered.
The thread count also decides how float sums are split, so a bit-identical resume needs the
same count as the run it resumes.
"""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a container)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def resolve_threads(threads: int | None) -> int:
    """Threads to use: ``threads`` if given, else ``$OMP_NUM_THREADS``, else every CPU available.

    Every CPU is fastest for one job on an idle machine (half of 2 cores doubled the quickstart's
    training time); a machine shared with other jobs wants a lower count, set by the user.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        return int(threads)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return available_cpus()


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (and the env for child processes); return the count used.

    Child processes (the ingest workers are spawned) read ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``
    when they import torch, so those are set too.
    """
    n = resolve_threads(threads)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
