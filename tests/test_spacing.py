"""PixelSpacing of synthetic images: derived from the training images, or absent with a reason."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from medsynth.data.spacing import cache_spacing, parse_spacing
from medsynth.dicom.write import synthetic_instance, to_bytes


def _row(spacing: str, rows: int = 1024, cols: int = 1024) -> dict:
    return {"PixelSpacing": spacing, "Rows": str(rows), "Columns": str(cols)}


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("[0.168, 0.168]", (0.168, 0.168)),
        ("0.1\\0.2", (0.1, 0.2)),
        ("", None),
        ("[0, 1]", None),
        ("[1e400, 1]", None),
        ("abc", None),
        ("[0.1, 0.1, 0.1]", None),
    ],
)
def test_parse_spacing(text, want):
    assert parse_spacing(text) == want


def test_uniform_spacing_scales_with_the_resize_mode():
    rows = [_row("[0.2, 0.2]", 1000, 800)] * 3
    assert cache_spacing(rows, 250, "pad") == ((0.8, 0.8), "")  # long side 1000 -> 250
    assert cache_spacing(rows, 200, "crop") == ((0.8, 0.8), "")  # short side 800 -> 200
    assert cache_spacing(rows, 200, "stretch") == ((1.0, 0.8), "")
    # Equal physical scale from different stored sizes is one scale.
    mixed = [_row("[0.2, 0.2]", 1000, 1000), _row("[0.4, 0.4]", 500, 500)]
    assert cache_spacing(mixed, 100, "pad") == ((2.0, 2.0), "")


def test_mixed_or_missing_spacing_is_omitted_with_the_reason():
    """RSNA's 400 images range 0.139-0.194 mm: no single physical scale for a synthetic one."""
    spacing, why = cache_spacing([_row("[0.139, 0.139]"), _row("[0.194, 0.194]")], 256)
    assert spacing is None and "0.556-0.776 mm" in why and "no single physical scale" in why
    spacing, why = cache_spacing([_row("[0.139, 0.139]"), _row("")], 256)
    assert spacing is None and "1 of 2 training images have no PixelSpacing" in why


def test_synthetic_instance_writes_spacing_or_the_note():
    img = np.zeros((8, 8), np.float32)
    kw = dict(run_id="r" * 16, pool="p", class_name="a", class_index=0, seed=1, index=0)
    ds = pydicom.dcmread(
        io.BytesIO(
            to_bytes(synthetic_instance(img, derivation="d", pixel_spacing=(0.5, 0.25), **kw))
        )
    )
    assert [float(v) for v in ds.PixelSpacing] == [0.5, 0.25] and "ImageComments" not in ds
    ds = synthetic_instance(img, derivation="d", spacing_note="PixelSpacing omitted: why", **kw)
    assert "PixelSpacing" not in ds and ds.ImageComments == "PixelSpacing omitted: why"


def test_an_upscaled_image_has_its_source_spacing_over_the_factor(tmp_path):
    from medsynth.generation.upscale import _spacing_after

    img = np.zeros((8, 8), np.float32)
    kw = dict(run_id="r" * 16, pool="p", class_name="a", class_index=0, seed=1, index=0)
    (tmp_path / "a.dcm").write_bytes(
        to_bytes(synthetic_instance(img, derivation="d", pixel_spacing=(0.8, 0.8), **kw))
    )
    assert _spacing_after(tmp_path / "a.dcm", 4) == ((0.2, 0.2), "")
    (tmp_path / "b.dcm").write_bytes(
        to_bytes(synthetic_instance(img, derivation="d", spacing_note="PixelSpacing omitted", **kw))
    )
    assert _spacing_after(tmp_path / "b.dcm", 4) == (None, "PixelSpacing omitted")
