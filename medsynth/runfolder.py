"""Run folders: ``<output_root>/<name>-<hash8>/`` holding the resolved protocol and environment.

The folder name comes from the protocol hash, so rerunning the same protocol finds the same
folder (and can resume), while any change to the protocol gets a folder of its own.
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

from medsynth import __version__
from medsynth.protocol import Protocol


def run_dir_for(protocol: Protocol, output_root: str | Path | None = None) -> Path:
    root = Path(output_root or protocol.output_root)
    return root / f"{protocol.name}-{protocol.sha256()[:8]}"


def environment() -> dict:
    """Versions and device facts worth keeping beside results."""
    import importlib.metadata as md

    env = {
        "medsynth": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
    }
    for pkg in ("torch", "monai", "diffusers", "pydicom", "numpy", "scikit-learn"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    return env


def prepare_run_dir(protocol: Protocol, run_dir: str | Path) -> Path:
    """Create ``run_dir`` and write ``protocol.yaml`` (resolved), its SHA-256 and environment."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "protocol.yaml").write_text(
        f"# resolved protocol; sha256 {protocol.sha256()}\n" + protocol.to_yaml()
    )
    (run_dir / "protocol.sha256").write_text(protocol.sha256() + "\n")
    (run_dir / "environment.json").write_text(json.dumps(environment(), indent=2))
    return run_dir
