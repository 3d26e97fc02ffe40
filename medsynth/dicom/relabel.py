"""Relabel a synthetic instance: every place the class label lives changes together.

A reviewer's corrected label must not be half applied: the label is in SeriesDescription, the
series (number and UID), the MEDSYNTH private block and the instance UID (which derives from the
class). The pixels are untouched; the derivation says who relabelled it from what.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

from medsynth.dicom.write import PRIVATE_CREATOR, deterministic_uid, to_bytes


def relabel_synthetic(path: str | Path, class_name: str, class_index: int) -> tuple[bytes, str]:
    """Bytes of the instance at ``path`` relabelled to ``class_name`` / ``class_index``, and its
    new SOPInstanceUID (derived from the old one and the new class, so a re-export is identical).
    """
    ds = pydicom.dcmread(Path(path))
    if "SYNTHETIC" not in list(ds.get("ImageType", [])):
        raise ValueError(f"{path}: not a medsynth synthetic instance; refusing to relabel it")
    block = ds.private_block(0x0011, PRIVATE_CREATOR)
    old = str(block[0x01].value)
    ds.SeriesDescription = f"SYNTHETIC {class_name}"
    ds.SeriesNumber = class_index + 1
    ds.SeriesInstanceUID = deterministic_uid(ds.StudyInstanceUID, class_index, "series")
    uid = deterministic_uid(ds.SOPInstanceUID, "relabel", class_name)
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    block[0x01].value = class_name[:64]
    block[0x02].value = str(class_index)
    note = f"; relabelled by review from {old} to {class_name}"
    ds.DerivationDescription = (str(ds.get("DerivationDescription", "")) + note)[:1024]
    return to_bytes(ds), uid
