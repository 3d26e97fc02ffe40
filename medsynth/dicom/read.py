"""Find DICOM files in any folder layout and decode their pixels to a unit range.

This is one of the few places that import pydicom. Nothing here imports torch. A file that
cannot be used raises :class:`DicomSkip` with a short reason; callers list it and go on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut

PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
HEADER_KEYWORDS = (
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "Modality",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsStored",
    "SamplesPerPixel",
    "ViewPosition",
)
_CODEC_HINT = (
    "install the optional codecs: pip install 'medsynth-toolkit[codecs]' "
    "(pylibjpeg; or '[gdcm]' for python-gdcm)"
)


class DicomSkip(Exception):
    """A file that is not a usable image; ``str(exc)`` is the reason written to skipped.csv."""


@dataclass(frozen=True)
class DecodeOptions:
    """How stored pixels become a unit-range image (see ``DatasetSection`` for meanings)."""

    intensity: str = "percentile"  # bits | percentile | window | dicom_window
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    window_center: float | None = None
    window_width: float | None = None
    color: str = "grey"  # grey | rgb
    multiframe: str = "skip"  # skip | first | middle


def iter_candidate_files(root: str | Path) -> Iterator[Path]:
    """Every regular file below ``root`` in sorted order, with or without extension.

    DICOMDIR index files and hidden files are passed over; whether a file is DICOM is decided
    when it is read, so non-DICOM files end up in skipped.csv with their reason.
    """
    root = Path(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            yield Path(dirpath) / name


def _dcmread(path: Path, stop_before_pixels: bool) -> pydicom.Dataset:
    if path.stat().st_size == 0:
        raise DicomSkip("empty file")
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass  # No preamble: may still be a raw DICOM data set.
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on broken input
        raise DicomSkip(f"unreadable DICOM: {type(exc).__name__}: {exc}") from None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
    except Exception:  # noqa: BLE001
        raise DicomSkip("not DICOM") from None
    # force=True parses almost anything; demand the identity of a real instance.
    if "SOPClassUID" not in ds and "SOPInstanceUID" not in ds:
        raise DicomSkip("not DICOM")
    return ds


def read_header(path: str | Path, keywords: tuple[str, ...] = ()) -> dict[str, str]:
    """Header attributes of one file as strings (missing ones as '').

    Returns the :data:`HEADER_KEYWORDS` plus ``keywords`` and ``TransferSyntaxUID``.
    Raises :class:`DicomSkip` for non-DICOM, empty or unreadable files.
    """
    ds = _dcmread(Path(path), stop_before_pixels=True)
    out = {}
    for kw in dict.fromkeys(HEADER_KEYWORDS + tuple(keywords)):
        try:
            value = ds.get(kw, "")
        except Exception:  # noqa: BLE001 - a malformed element must not stop the scan
            value = ""
        out[kw] = "" if value is None else str(value).strip()
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    out["TransferSyntaxUID"] = str(tsyntax or "")
    return out


def _int(ds: pydicom.Dataset, keyword: str, default: int) -> int:
    """An integer header value, or :class:`DicomSkip` naming the malformed attribute."""
    try:
        value = ds.get(keyword, default)
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError):
        raise DicomSkip(f"malformed {keyword}: {ds.get(keyword)!r}") from None


def _stored_range(ds: pydicom.Dataset) -> tuple[float, float]:
    bits = _int(ds, "BitsStored", _int(ds, "BitsAllocated", 8))
    if _int(ds, "PixelRepresentation", 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _first(value) -> float:
    return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)


def _to_unit(
    arr: np.ndarray, ds: pydicom.Dataset, opts: DecodeOptions, is_color: bool
) -> np.ndarray:
    if opts.intensity == "bits":
        lo, hi = _stored_range(ds)
        if not is_color:
            lo, hi = (float(v) for v in apply_modality_lut(np.array([lo, hi]), ds))
    elif opts.intensity == "percentile":
        lo, hi = (
            float(v) for v in np.percentile(arr, [opts.lower_percentile, opts.upper_percentile])
        )
    elif opts.intensity == "window":
        c, w = float(opts.window_center), float(opts.window_width)
        lo, hi = c - w / 2, c + w / 2
    elif opts.intensity == "dicom_window":
        if "WindowCenter" not in ds or "WindowWidth" not in ds:
            raise DicomSkip("no WindowCenter/WindowWidth in file (intensity: dicom_window)")
        c, w = _first(ds.WindowCenter), _first(ds.WindowWidth)
        lo, hi = c - w / 2, c + w / 2
    else:
        raise ValueError(f"unknown intensity mode {opts.intensity!r}")
    if hi <= lo:
        # A constant image: map it to mid-grey rather than divide by zero.
        return np.full(arr.shape, 0.5, dtype=np.float32)
    return np.clip((arr - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def load_unit_image(path: str | Path, opts: DecodeOptions = DecodeOptions()) -> np.ndarray:
    """Decode one file to ``(C, H, W) float32 in [0, 1]``, bright = dense (MONOCHROME2 sense).

    Steps: pick a frame (multi-frame policy), Modality LUT (rescale slope/intercept or LUT),
    intensity mapping (bits / percentile / window), MONOCHROME1 inversion, colour policy
    (C = 1 for ``grey``, 3 for ``rgb``). Raises :class:`DicomSkip` with the reason.
    """
    path = Path(path)
    ds = _dcmread(path, stop_before_pixels=False)
    if not any(k in ds for k in PIXEL_KEYWORDS):
        raise DicomSkip("no pixel data")
    frames = _int(ds, "NumberOfFrames", 1)
    if frames > 1 and opts.multiframe == "skip":
        raise DicomSkip(f"multi-frame ({frames} frames); set dataset.multiframe to first or middle")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        arr = ds.pixel_array
    except (RuntimeError, NotImplementedError) as exc:
        name = getattr(tsyntax, "name", str(tsyntax))
        if tsyntax is not None and tsyntax.is_compressed:
            raise DicomSkip(f"cannot decode {name}: {_CODEC_HINT}") from None
        raise DicomSkip(f"pixel decode failed: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - truncated data raises ValueError, EOFError, ...
        raise DicomSkip(f"pixel decode failed ({type(exc).__name__}): {exc}") from None

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    spp = _int(ds, "SamplesPerPixel", 1)
    if frames > 1:
        arr = arr[0 if opts.multiframe == "first" else frames // 2]
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        spp = 3
    is_color = spp == 3
    expected = (_int(ds, "Rows", 0), _int(ds, "Columns", 0)) + ((3,) if is_color else ())
    if arr.shape != expected:
        raise DicomSkip(f"pixel array shape {arr.shape} does not match header {expected}")
    arr = arr.astype(np.float64)
    if not is_color:
        arr = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    if not np.isfinite(arr).all():
        raise DicomSkip("non-finite pixel values")
    unit = _to_unit(arr, ds, opts, is_color)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    if is_color:
        if opts.color == "grey":
            unit = unit @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            return unit[None]
        return np.ascontiguousarray(unit.transpose(2, 0, 1))
    return unit[None] if opts.color == "grey" else np.repeat(unit[None], 3, axis=0)


# Values shown unmasked in a header view of a *real* file: technical attributes only.
TECHNICAL_KEYWORDS = frozenset({
    "SOPClassUID", "Modality", "ConversionType", "ImageType", "BodyPartExamined", "ViewPosition",
    "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "NumberOfFrames", "PixelSpacing",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "RescaleIntercept", "RescaleSlope",
    "RescaleType", "WindowCenter", "WindowWidth", "LossyImageCompression", "BurnedInAnnotation",
    "PatientIdentityRemoved", "SeriesDescription", "DerivationDescription", "SpecificCharacterSet",
})  # fmt: skip


def header_table(path: str | Path, mask: bool = False) -> list[dict[str, str]]:
    """Header elements as rows (tag, keyword, VR, value) without pixel data.

    With ``mask`` every value outside :data:`TECHNICAL_KEYWORDS` is replaced by a mask, so a
    real file's names, IDs, dates, UIDs and free text are never displayed.
    """
    ds = _dcmread(Path(path), stop_before_pixels=True)
    rows = []
    for elem in ds.iterall():
        if elem.VR == "SQ":
            continue
        kw = elem.keyword or "(private)"
        value = str(elem.value)
        if mask and kw not in TECHNICAL_KEYWORDS:
            value = "•••• (masked)" if value else ""
        rows.append({"tag": str(elem.tag), "keyword": kw, "VR": str(elem.VR), "value": value[:200]})
    return rows
