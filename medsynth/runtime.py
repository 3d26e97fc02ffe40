"""CPU threads for torch and its OpenMP/MKL pools: one setting for every command.

torch's default (one thread per core) oversubscribes a machine that runs anything else: on a
shared 2-core machine training was 3-9x slower until ``OMP_NUM_THREADS=1`` was set by hand.
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
    """Threads to use: ``threads`` if given, else ``$OMP_NUM_THREADS``, else half the CPUs.

    Half, not all: the other half serves the ingest workers, the OS and whatever else runs on
    the machine, and an oversubscribed thread pool loses far more than one thread gains.
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        return int(threads)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return max(1, available_cpus() // 2)


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
