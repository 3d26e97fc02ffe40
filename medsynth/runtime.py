"""CPU threads for torch and its OpenMP/MKL pools: one setting for every command.

Every core is the default (fastest for one job), but it oversubscribes a machine that runs
anything else: on a shared 2-core machine training was 3-9x slower until the count was lowered.
The thread count also decides how float sums are split, so a bit-identical resume needs the
same count as the run it resumes.
"""

from __future__ import annotations

import os
import warnings


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


def native_bf16(device: str = "cpu") -> bool:
    """Whether ``device`` computes bf16 natively (AVX-512 BF16 / AMX on a CPU, a bf16 GPU).

    Elsewhere torch emulates bf16 autocast, far slower than fp32: PneumoniaMNIST training took
    13 s per step in bf16 against 0.8 s in fp32 on an AVX2-only EPYC (docs/benchmarks.md)."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: str = "cpu", what: str = "") -> str:
    """``auto`` -> ``bf16`` where ``device`` computes bf16 natively, else ``fp32``; ``fp32`` and
    ``bf16`` unchanged, but an explicit ``bf16`` on a device that only emulates it warns, naming
    ``what`` (e.g. ``"training"``) and the fix."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision == "bf16" and not native_bf16(device):
        warnings.warn(
            f"{what or 'this stage'}: precision bf16 is emulated on this {device} (no native "
            "bf16, e.g. no AVX-512 BF16/AMX): expect it to run over 10x slower than fp32; set "
            "precision: auto (bf16 only where native) or fp32",
            stacklevel=2,
        )
    return precision
