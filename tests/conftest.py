"""Shared fixtures: tiny seeded data, the shared real datasets (skip when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDSYNTH_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_dataset(name: str) -> Path:
    path = SHARED_DATA / name
    if not (path / "labels.csv").is_file():
        pytest.skip(f"shared dataset {name} not present at {path}")
    return path


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """A small two-class phantom DICOM dataset (40 patients, 64 px)."""
    from medsynth.data.phantoms import write_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    write_phantoms(out, n_patients=40, num_classes=2, size_px=64, difficulty=0.3, seed=1)
    return out


@pytest.fixture(autouse=True)
def _restore_main_module():
    """Streamlit's AppTest runs a dashboard as ``__main__`` and leaves it in ``sys.modules``;
    a later ``spawn`` process pool (ingest workers) would then re-run that dashboard as its
    main module with pytest's argv and die. Put the real ``__main__`` back after every test."""
    import sys

    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main
