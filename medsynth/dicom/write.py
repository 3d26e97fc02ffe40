"""Write DICOM instances from an explicit attribute allowlist (never copied from a source file).

``write_instance`` is the shared low-level writer: uncompressed Explicit VR Little Endian,
monochrome 8/16 bit or RGB 8 bit (colour-by-pixel). The synthetic-scan writer and the phantom generator build on it.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

_PIXEL_ATTRS = {
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PixelData",
    "PlanarConfiguration",
}


def deterministic_uid(*entropy: object) -> str:
    """A valid UID derived only from ``entropy``: same inputs, same UID.

    The 2.25 form of a 128-bit hash, like a name-based UUID (pydicom's ``generate_uid`` with
    ``prefix=None`` ignores its entropy sources and returns a random UUID).
    """
    digest = hashlib.sha256("\x1f".join(str(e) for e in entropy).encode()).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


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
    """A complete DICOM data set from ``pixels`` and ``attrs``.

    ``pixels``: ``(H, W)`` uint8/uint16/int16 (monochrome, ``photometric`` MONOCHROME1/2) or
    ``(H, W, 3)`` uint8 (written as RGB, SamplesPerPixel 3, PlanarConfiguration 0: R, G, B
    interleaved per pixel; ``photometric`` must then be ``RGB``). ``attrs`` maps DICOM keywords
    to values and must not contain pixel-module attributes, which are derived from ``pixels``
    here. Private blocks are added by callers afterwards.
    """
    rgb = pixels.ndim == 3
    if rgb and (pixels.shape[2] != 3 or pixels.dtype != np.uint8 or photometric != "RGB"):
        raise ValueError(
            f"colour pixels must be (H, W, 3) uint8 with photometric 'RGB', got {pixels.shape} "
            f"{pixels.dtype} {photometric!r}"
        )
    if not rgb and (pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16, np.int16)):
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
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = photometric
    if rgb:
        ds.PlanarConfiguration = 0  # (H, W, 3) in C order is already colour-by-pixel
    ds.Rows, ds.Columns = (int(v) for v in pixels.shape[:2])
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


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PRIVATE_CREATOR = "MEDSYNTH 1"
STORED_BITS = 12  # grey: [-1, 1] -> 0..4095; RescaleSlope/Intercept map stored values back
# A fixed placeholder study date/time: a DICOMDIR needs both, but a real date would either be
# non-deterministic (the generation time) or come from a training file (a leak). 1900-01-01 is
# the DICOM epoch and obviously not an acquisition date.
SYNTHETIC_STUDY_DATE = "19000101"
SYNTHETIC_STUDY_TIME = "000000"


def synthetic_decode_options(samples_per_pixel: int):
    """How ``dicom.read.load_unit_image`` maps a synthetic instance back to ``[0, 1]``.

    Grey instances store the training scale [-1, 1] as modality values (via the rescale), so a
    fixed window (centre 0, width 2) inverts it exactly. RGB instances have no Modality LUT
    (it does not apply to colour); their 8-bit stored range 0..255 *is* [-1, 1].
    """
    from medsynth.dicom.read import DecodeOptions

    if samples_per_pixel == 3:
        return DecodeOptions(intensity="bits", color="rgb")
    return DecodeOptions(intensity="window", window_center=0.0, window_width=2.0)


def synthetic_instance(
    image: np.ndarray,
    *,
    run_id: str,
    pool: str,
    class_name: str,
    class_index: int,
    seed: int,
    index: int,
    derivation: str,
    modality: str = "OT",
    edited: bool = False,
    pixel_spacing: tuple[float, float] | None = None,
    spacing_note: str = "",
) -> Dataset:
    """A Secondary Capture instance for one synthetic image, built from an allowlist only.

    ``image``: ``(H, W)`` or ``(1, H, W)`` (grey) or ``(3, H, W)`` (RGB), float in [-1, 1] (the
    training scale). Grey is stored losslessly as 12-bit unsigned with ``RescaleSlope = 2/4095``
    and ``RescaleIntercept = -1``, so modality values are the training-scale intensities (to
    1/4095). RGB is stored as 8-bit RGB, colour-by-pixel (0..255 = [-1, 1], to 1/255), without
    a Modality LUT. ``run_id`` names the synthetic patient and study (e.g. the snapshot hash);
    UIDs derive from (run, pool, class, seed), so the same request always yields the same UIDs
    and bytes. No value comes from any source file.

    ``edited``: the pixels are an edit of a real patient image (inpainting, SDEdit). The instance
    then says so (ImageType ``DERIVED\\SECONDARY\\SYNTHETIC\\EDITED``, a patient-derived
    de-identification method, ``EDIT-`` identity) and still carries no source identifier: the
    derivation names the run's cache row, never a source UID.

    ``pixel_spacing``: (row, column) mm of this image (see :func:`medsynth.data.spacing.
    cache_spacing`), written as ``PixelSpacing``; without it ``spacing_note`` (why it is absent)
    goes to ``ImageComments``.
    """
    if image.ndim == 3 and image.shape[0] == 1:
        image = image[0]
    rgb = image.ndim == 3
    if rgb and image.shape[0] != 3 or image.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W), (1, H, W) or (3, H, W), got {image.shape}")
    run8 = run_id[:8]
    who, kind = ("EDIT", "EDITED") if edited else ("SYN", "SYNTHETIC")
    attrs = {
        "SpecificCharacterSet": "ISO_IR 100",
        "ImageType": ["DERIVED", "SECONDARY", "SYNTHETIC"] + (["EDITED"] if edited else []),
        "StudyDate": SYNTHETIC_STUDY_DATE,
        "StudyTime": SYNTHETIC_STUDY_TIME,
        "AccessionNumber": "",
        "Modality": modality,
        "ConversionType": "SYN",
        "Manufacturer": "medsynth",
        "ReferringPhysicianName": "",
        "StudyDescription": f"{kind} medsynth pool {pool}",
        "SeriesDescription": f"{kind} {class_name}",
        "DerivationDescription": derivation[:1024],
        "PatientName": f"{who}^{run8}",
        "PatientID": f"{who}-{run8}",
        "PatientBirthDate": "",
        "PatientSex": "",
        "PatientIdentityRemoved": "YES",
        "DeidentificationMethod": (
            "edited real patient image; source not identified"
            if edited
            else "synthetic image; no source patient"
        ),
        "BurnedInAnnotation": "NO",
        "StudyInstanceUID": deterministic_uid(run_id, pool, "study"),
        "SeriesInstanceUID": deterministic_uid(run_id, pool, class_index, "series"),
        "StudyID": pool[:16],
        "SeriesNumber": class_index + 1,
        "InstanceNumber": index + 1,
        "PatientOrientation": "",
        # Series Laterality (type 2C) is absent, as the standard wants for an unpaired part; the
        # image-level "U" (unpaired) says so explicitly, which lets validators evaluate the
        # condition (without it dciodvfy reports the absent Laterality as an error).
        "ImageLaterality": "U",
    }
    if pixel_spacing is not None:
        attrs["PixelSpacing"] = [f"{v:.6g}" for v in pixel_spacing]
    elif spacing_note:
        attrs["ImageComments"] = spacing_note[:10240]
    if rgb:
        stored = np.round((np.clip(image, -1, 1) + 1) / 2 * 255).astype(np.uint8)
        stored, photometric, bits = np.ascontiguousarray(stored.transpose(1, 2, 0)), "RGB", 8
    else:
        top = 2**STORED_BITS - 1
        stored = np.round((np.clip(image, -1, 1) + 1) / 2 * top).astype(np.uint16)
        photometric, bits = "MONOCHROME2", STORED_BITS
        attrs |= {
            "RescaleIntercept": "-1",
            "RescaleSlope": f"{2 / top:.10g}",
            "RescaleType": "US",
            "WindowCenter": "0",
            "WindowWidth": "2",
        }
    attrs["LossyImageCompression"] = "00"
    ds = build_instance(
        stored,
        attrs,
        sop_class_uid=SECONDARY_CAPTURE,
        sop_instance_uid=deterministic_uid(run_id, pool, class_index, seed),
        photometric=photometric,
        bits_stored=bits,
    )
    block = ds.private_block(0x0011, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", class_name[:64])
    block.add_new(0x02, "IS", str(class_index))
    block.add_new(0x03, "LO", str(seed))
    block.add_new(0x04, "LO", pool[:64])
    return ds


def pixel_sha256(ds: Dataset) -> str:
    return hashlib.sha256(bytes(ds.PixelData)).hexdigest()
