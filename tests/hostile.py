"""A hostile DICOM corpus built at test time (also used by benchmarks/hostile_ingest.py).

Each builder writes tiny files: the "huge" images only *declare* their size in the header.
"""

from __future__ import annotations

import os
import zlib
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

SC = "1.2.840.10008.5.1.4.1.1.7"


def image_dataset(rows: int, cols: int, bits: int = 16, **attrs) -> Dataset:
    """A Secondary Capture header for a grey ``rows`` × ``cols`` image (pixel data not set)."""
    uid = generate_uid(entropy_srcs=[f"{rows}x{cols}", str(bits), repr(sorted(attrs.items()))])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SC
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SC, uid
    ds.PatientID = "HOSTILE"
    ds.Modality = "OT"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def write_native(path: Path, ds: Dataset, pixels: bytes) -> Path:
    ds.PixelData = pixels
    ds["PixelData"].VR = "OW" if ds.BitsAllocated > 8 else "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_deflated_huge(path: Path, rows: int, cols: int, pixel_bytes: int | None = None) -> Path:
    """A deflated 16-bit file declaring ``rows`` × ``cols``; its pixel data are zeros.

    ``pixel_bytes`` (default: what the header declares) is the length of the pixel data
    actually stored, so a small header can carry a huge payload (a decompression bomb).
    The zeros are compressed in chunks, so building a 512 MiB payload takes little memory.
    """
    n = rows * cols * 2 if pixel_bytes is None else pixel_bytes
    ds = image_dataset(rows, cols)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    body = BytesIO()
    # The data set without pixels, explicit VR little endian, then the PixelData element header.
    pydicom.filewriter.write_dataset(pydicom.filebase.DicomFileLike(body), _le(ds))
    body.write(b"\xe0\x7f\x10\x00OW\x00\x00" + n.to_bytes(4, "little"))
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with path.open("wb") as fh:
        meta = BytesIO()
        pydicom.filewriter.write_file_meta_info(pydicom.filebase.DicomFileLike(meta), ds.file_meta)
        fh.write(b"\x00" * 128 + b"DICM" + meta.getvalue())
        fh.write(comp.compress(body.getvalue()))
        zeros = bytes(1 << 22)
        left = n
        while left:
            k = min(left, len(zeros))
            fh.write(comp.compress(zeros[:k]))
            left -= k
        fh.write(comp.flush())
    return path


def _le(ds: Dataset) -> Dataset:
    body = Dataset()
    body.update({e.tag: e for e in ds if e.tag.group != 2})
    body.set_original_encoding(False, True)
    body._is_little_endian, body._is_implicit_VR = True, False
    return body


def modality_lut_file(path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """An 8×8 16-bit file with a non-linear Modality LUT Sequence: (path, stored, expected)."""
    stored = (np.arange(64, dtype=np.uint16) % 16).reshape(8, 8)
    lut = (np.arange(16, dtype=np.uint16) ** 2) * 10  # 0 .. 2250, non-linear
    ds = image_dataset(8, 8, bits=16, BitsStored=12, HighBit=11)
    item = Dataset()
    item.LUTDescriptor = [16, 0, 16]
    item.ModalityLUTType = "HU"
    item.add_new(0x00283006, "US", lut.tolist())  # LUTData
    ds.ModalityLUTSequence = [item]
    write_native(path, ds, stored.tobytes())
    return path, stored, lut[stored]


def dicomdir_file(path: Path) -> Path:
    """A media directory (DICOMDIR) saved under another name."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["dicomdir"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "HOSTILE"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    ds.DirectoryRecordSequence = []
    ds.save_as(path, enforce_file_format=True)
    return path


def stub_file(path: Path) -> Path:
    """A ~200-byte DICOM stub: identity only, no image."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SC
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["stub"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SC, meta.MediaStorageSOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def build_hostile_corpus(root: Path, huge_side: int = 16384) -> dict[str, str]:
    """Write the corpus below ``root``: ``{relative path: expected outcome}``.

    Outcomes: ``index`` (a usable image) or a fragment of the skip reason. Entries whose
    outcome depends on the platform (an unreadable file when running as root) map to ``*``.
    """
    root.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    rng = np.random.default_rng(0)
    for i in range(3):
        img = rng.integers(0, 4096, (24, 24), dtype=np.uint16).tobytes()
        write_native(
            root / f"good{i}.dcm", image_dataset(24, 24, BitsStored=12, StudyID=str(i)), img
        )
        out[f"good{i}.dcm"] = "index"
    # File-system oddities.
    os.symlink("loop_b.dcm", root / "loop_a.dcm")
    os.symlink("loop_a.dcm", root / "loop_b.dcm")
    os.symlink("self.dcm", root / "self.dcm")
    os.symlink("nowhere.dcm", root / "dangling.dcm")
    os.symlink(".", root / "uplink")  # a folder link back to root: a loop if followed
    out["uplink"] = "symlink to a folder"
    out.update({"loop_a.dcm": "symlink loop", "loop_b.dcm": "symlink loop"})
    out.update({"self.dcm": "symlink loop", "dangling.dcm": "dangling symlink"})
    locked = root / "unreadable.dcm"
    locked.write_bytes(os.urandom(300))
    locked.chmod(0)
    out["unreadable.dcm"] = "*"  # "cannot read file" for a user, "not DICOM" for root
    os.mkfifo(root / "fifo.dcm")
    out["fifo.dcm"] = "not a regular file (FIFO)"
    (root / "folder.dcm").mkdir()
    write_native(root / "folder.dcm" / "inside", image_dataset(16, 16, StudyID="in"), bytes(512))
    out["folder.dcm/inside"] = "index"
    # Broken or odd content.
    (root / "zero.dcm").write_bytes(b"")
    out["zero.dcm"] = "empty file"
    (root / "random.bin").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    out["random.bin"] = "not DICOM"
    cut = write_native(root / "truncated.dcm", image_dataset(64, 64, StudyID="cut"), bytes(8192))
    cut.write_bytes(cut.read_bytes()[:-3000])
    out["truncated.dcm"] = "pixel decode failed"
    write_native(root / "huge_rows.dcm", image_dataset(60000, 60000, StudyID="60k"), bytes(64))
    out["huge_rows.dcm"] = "image too large"
    write_deflated_huge(root / "deflated_huge.dcm", huge_side, huge_side)
    out["deflated_huge.dcm"] = "image too large"
    ds64 = image_dataset(8, 8, bits=64, StudyID="b64")
    write_native(root / "bits64.dcm", ds64, rng.integers(0, 1000, 64, dtype=np.uint64).tobytes())
    out["bits64.dcm"] = "*"  # decodes where pydicom supports 64-bit integers, else a reason
    out[modality_lut_file(root / "mlut.dcm")[0].name] = "index"
    frames = image_dataset(16, 16, NumberOfFrames=3, StudyID="mf")
    write_native(root / "multiframe.dcm", frames, np.arange(768, dtype=np.uint16).tobytes())
    out["multiframe.dcm"] = "index"  # the corpus ingests with multiframe: middle
    dicomdir_file(root / "index.bin")
    out["index.bin"] = "DICOMDIR"
    stub_file(root / "stub.dcm")
    out["stub.dcm"] = "no pixel data"
    return out


def label_table(root: Path, path: Path) -> Path:
    """A label table naming the SOPInstanceUID of every readable DICOM file below ``root``."""
    from medsynth.dicom.read import DicomSkip, read_header

    uids = []
    for p in sorted(root.rglob("*")):
        try:
            uids.append(read_header(p)["SOPInstanceUID"])  # bounded, unlike pydicom.dcmread
        except DicomSkip:
            continue
    lines = [f"{u},{'ab'[i % 2]}" for i, u in enumerate(uids)]
    path.write_text("sop,label\n" + "\n".join(lines) + "\n")
    return path
