"""Find DICOM files in any folder layout and decode their pixels to a unit range.

This is one of the few places that import pydicom. Nothing here imports torch. A file that
cannot be used raises :class:`DicomSkip` with a short reason; callers list it and go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_color_lut, apply_modality_lut

from medsynth.dicom.files import (
    DEFAULT_MAX_PIXELS,
    DicomSkip,
    check_image_header,
    int_attr,
    is_dicomdir,
    iter_candidate_files,
    open_dataset,
)

__all__ = [
    "DecodeOptions",
    "DicomSkip",
    "iter_candidate_files",
    "read_header",
    "load_unit_image",
    "header_table",
    "check_image_header",
]

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
    max_pixels: int = DEFAULT_MAX_PIXELS  # Rows x Columns x frames x samples; 0 = no limit


def _dcmread(path: Path, stop_before_pixels: bool) -> pydicom.Dataset:
    return open_dataset(path, pixels=not stop_before_pixels)[0]


def read_header(
    path: str | Path,
    keywords: tuple[str, ...] = (),
    *,
    check_image: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, str]:
    """Header attributes of one file as strings (missing ones as ''), pixel data not read.

    Returns the :data:`HEADER_KEYWORDS` plus ``keywords`` and ``TransferSyntaxUID``.
    Raises :class:`DicomSkip` for non-files, empty, unreadable, non-DICOM files and DICOMDIRs;
    with ``check_image`` also for files without an image or larger than ``max_pixels``
    (see :func:`check_image_header`).
    """
    ds, pixel_bytes = open_dataset(Path(path), pixels=False)
    if is_dicomdir(ds):
        raise DicomSkip("DICOMDIR (a media directory index), not an image")
    if check_image:
        check_image_header(ds, pixel_bytes, max_pixels)
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


def _stored_range(ds: pydicom.Dataset) -> tuple[float, float]:
    bits = int_attr(ds, "BitsStored", int_attr(ds, "BitsAllocated", 8))
    if int_attr(ds, "PixelRepresentation", 0) == 1:
        return -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    return 0.0, 2.0**bits - 1


def _first(value) -> float:
    return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)


def _modality_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The stored-bit range in modality units (rescale, or the extremes of a Modality LUT)."""
    lo, hi = _stored_range(ds)
    if "ModalityLUTSequence" in ds:
        # Every output of the LUT (entries below/above it map to its first/last value).
        n_entries, first = (int(v) for v in ds.ModalityLUTSequence[0].LUTDescriptor[:2])
        lut = np.asarray(apply_modality_lut(np.arange(first, first + (n_entries or 65536)), ds))
        return float(lut.min()), float(lut.max())
    lo, hi = (float(v) for v in apply_modality_lut(np.array([lo, hi]), ds))
    return min(lo, hi), max(lo, hi)


def _to_unit(
    arr: np.ndarray, ds: pydicom.Dataset, opts: DecodeOptions, is_color: bool
) -> np.ndarray:
    if opts.intensity == "bits":
        lo, hi = _stored_range(ds) if is_color else _modality_range(ds)
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


def block_mean(arr: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` × ``factor`` blocks of ``(H, W[, C])`` native values -> float32.

    Converts to float a band of rows at a time, so a large integer frame never has a
    full-size float copy; up to ``factor - 1`` edge rows/columns are dropped.
    """
    if factor <= 1:
        return arr.astype(np.float32)
    h, w = arr.shape[0] // factor, arr.shape[1] // factor
    rest = arr.shape[2:]
    out = np.empty((h, w) + rest, np.float32)
    per_row = factor * factor * w * int(np.prod(rest, dtype=np.int64))
    step = max(1, (1 << 20) // max(1, per_row))  # ~1 Mi samples (4 MiB float32) per band
    for i in range(0, h, step):
        j = min(h, i + step)
        band = arr[i * factor : j * factor, : w * factor].astype(np.float32)
        out[i:j] = band.reshape((j - i, factor, w, factor) + rest).mean(axis=(1, 3))
    return out


def _is_bomb(exc: BaseException) -> bool:
    from PIL import Image

    while exc is not None:
        if isinstance(exc, Image.DecompressionBombError) or "decompression bomb" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _decode_failure(exc: Exception, tsyntax) -> DicomSkip:
    """A reason for a failed pixel decode; codec advice only when a plugin is really missing."""
    name = getattr(tsyntax, "name", str(tsyntax))
    if _is_bomb(exc):
        return DicomSkip(f"decompression bomb refused while decoding {name}: {exc}")
    if tsyntax is not None and tsyntax.is_compressed:
        from pydicom.pixels.decoders.base import get_decoder

        try:
            available = get_decoder(tsyntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            return DicomSkip(f"cannot decode {name}: no decoder plugin installed; {_CODEC_HINT}")
        return DicomSkip(f"pixel decode failed ({name}, {type(exc).__name__}): {exc}")
    return DicomSkip(f"pixel decode failed ({type(exc).__name__}): {exc}")


def _decode_frame(path: Path, opts: DecodeOptions) -> tuple[pydicom.Dataset, np.ndarray]:
    """Header checks, then the stored values of the chosen frame, in their native dtype."""
    head, pixel_bytes = open_dataset(path, pixels=False)
    samples = check_image_header(head, pixel_bytes, opts.max_pixels)
    frames = int_attr(head, "NumberOfFrames", 1)
    if frames > 1 and opts.multiframe == "skip":
        raise DicomSkip(f"multi-frame ({frames} frames); set dataset.multiframe to first or middle")
    # Inflate at most what the header declares (8 bytes a sample) plus room for the header.
    ds, _ = open_dataset(path, pixels=True, inflate_limit=samples * 8 + (16 << 20))
    if not any(k in ds for k in PIXEL_KEYWORDS):
        raise DicomSkip("no pixel data")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        if frames > 1:
            # Decode only the frame we keep.
            ds.pixel_array_options(index=0 if opts.multiframe == "first" else frames // 2)
        arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - truncated data raises ValueError, EOFError, ...
        raise _decode_failure(exc, tsyntax) from None
    return ds, arr


def load_unit_image(
    path: str | Path, opts: DecodeOptions = DecodeOptions(), reduce_to: int | None = None
) -> np.ndarray:
    """Decode one file to ``(C, H, W) float32 in [0, 1]``, bright = dense (MONOCHROME2 sense).

    Steps: header checks (image present, at most ``opts.max_pixels`` samples), pick a frame
    (multi-frame policy), decode in the stored dtype, Modality LUT Sequence on the stored
    integers, block-average down to at least ``2 * reduce_to`` on the short side (when given;
    before any float conversion, so memory stays near the stored size), rescale
    slope/intercept, intensity mapping (bits / percentile / window), MONOCHROME1 inversion,
    colour policy (C = 1 for ``grey``, 3 for ``rgb``). Raises :class:`DicomSkip` with the reason.
    """
    ds, arr = _decode_frame(Path(path), opts)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    spp = int_attr(ds, "SamplesPerPixel", 1)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        spp = 3
    is_color = spp == 3
    expected = (int_attr(ds, "Rows", 0), int_attr(ds, "Columns", 0)) + ((3,) if is_color else ())
    if arr.shape != expected:
        raise DicomSkip(f"pixel array shape {arr.shape} does not match header {expected}")
    lut = not is_color and "ModalityLUTSequence" in ds
    if lut:
        # A LUT indexes by stored integer: apply it before any averaging or float cast.
        arr = apply_modality_lut(arr, ds)
    factor = max(1, min(arr.shape[:2]) // (2 * reduce_to)) if reduce_to else 1
    arr = block_mean(arr, factor)
    if not is_color and not lut:
        arr = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
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
TECHNICAL_KEYWORDS = frozenset(
    {
        "SOPClassUID",
        "Modality",
        "ConversionType",
        "ImageType",
        "BodyPartExamined",
        "ViewPosition",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "PixelSpacing",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "RescaleIntercept",
        "RescaleSlope",
        "RescaleType",
        "WindowCenter",
        "WindowWidth",
        "LossyImageCompression",
        "BurnedInAnnotation",
        "PatientIdentityRemoved",
        "SeriesDescription",
        "DerivationDescription",
        "SpecificCharacterSet",
    }
)


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
