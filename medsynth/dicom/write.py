"""Write DICOM instances from an explicit attribute allowlist (never copied from a source file).

``write_instance`` is the shared low-level writer: uncompressed Explicit VR Little Endian,
monochrome, 8/16 bit. The synthetic-scan writer and the phantom generator build on it.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

_PIXEL_ATTRS = {
    "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
    "BitsStored", "HighBit", "PixelRepresentation", "PixelData",
}  # fmt: skip


def deterministic_uid(*entropy: object) -> str:
    """A valid UID derived only from ``entropy`` (same inputs, same UID; 2.25.<int> form)."""
    return generate_uid(prefix=None, entropy_srcs=[str(e) for e in entropy])


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp files are 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_instance(
    pixels: np.ndarray,
    attrs: dict[str, object],
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
) -> Dataset:
    """A complete DICOM data set from ``pixels`` ``(H, W)`` uint8/uint16/int16 and ``attrs``.

    ``attrs`` maps DICOM keywords to values and must not contain pixel-module attributes,
    which are derived from ``pixels`` here. Private blocks are added by callers afterwards.
    """
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16, np.int16):
        raise ValueError(
            f"pixels must be (H, W) uint8/uint16/int16, got {pixels.shape} {pixels.dtype}"
        )
    clash = _PIXEL_ATTRS & set(attrs)
    if clash:
        raise ValueError(f"pixel-module attributes are derived from the array: {sorted(clash)}")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    for key, value in attrs.items():
        setattr(ds, key, value)
    bits = pixels.dtype.itemsize * 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = (int(v) for v in pixels.shape)
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
    ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """Serialise with preamble and file meta (Part 10 file)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_instance(path: str | Path, ds: Dataset) -> bytes:
    """Write ``ds`` atomically to ``path``; returns the bytes written."""
    data = to_bytes(ds)
    atomic_write_bytes(Path(path), data)
    return data
