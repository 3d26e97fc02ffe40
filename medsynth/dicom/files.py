"""Open candidate DICOM files safely: file-system oddities, stubs, DICOMDIRs and size limits.

Everything here runs before any pixel is decoded, so a hostile file (a symlink loop, a FIFO, a
small deflated file declaring a 32768² frame) is turned down with a reason while memory stays
small. Raises :class:`DicomSkip`; callers list the file with ``str(exc)`` and go on.
"""

from __future__ import annotations

import errno
import os
import stat
import zlib
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import FileDataset
from pydicom.errors import InvalidDicomError

# _read_file_meta_info is private, but it is what read_partial itself uses to find where the
# (deflated) data set starts; pinned by pydicom 3.0 and covered by the deflate tests.
from pydicom.filereader import _read_file_meta_info, read_dataset, read_partial, read_preamble
from pydicom.uid import DeflatedExplicitVRLittleEndian

PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})  # Pixel / Double / Float Pixel Data
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
# Default for ``dataset.max_pixels``: 8192² grey samples, 128 MiB as 16-bit stored values.
DEFAULT_MAX_PIXELS = 8192 * 8192
# A header of a deflated file is read from at most this many inflated bytes.
_HEADER_INFLATE_BYTES = 8 << 20


class DicomSkip(Exception):
    """A file that is not a usable image; ``str(exc)`` is the reason written to skipped.csv."""


def iter_candidate_files(
    root: str | Path, on_error: Callable[[Path, str], None] | None = None
) -> Iterator[Path]:
    """Every non-directory entry below ``root`` in sorted order, with or without extension.

    Files named ``DICOMDIR`` and hidden entries are passed over. Whether a file is DICOM, or a
    regular file at all, is decided when it is read, so each yielded path ends up indexed or
    listed with a reason. Symlinks to folders are not followed (no loops) and, like a folder
    that cannot be listed, are reported through ``on_error(path, reason)``.
    """

    def walk_error(exc: OSError) -> None:
        if on_error is not None:
            on_error(Path(exc.filename or root), f"cannot list folder: {exc.strerror or exc}")

    for dirpath, dirnames, filenames in os.walk(root, onerror=walk_error):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for d in [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            # os.walk lists a link to a folder without following it (that is what keeps a
            # link loop finite); say so rather than pass it over in silence.
            dirnames.remove(d)
            if on_error is not None:
                on_error(Path(dirpath) / d, "symlink to a folder, not followed")
        for name in sorted(filenames):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            yield Path(dirpath) / name


def _check_file(path: Path) -> os.stat_result:
    """Stat ``path`` following links; a reason for anything that is not a readable regular file."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DicomSkip("symlink loop") from None
        if exc.errno == errno.ENOENT and os.path.islink(path):
            raise DicomSkip("dangling symlink (its target does not exist)") from None
        raise DicomSkip(f"cannot read file: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise DicomSkip("a folder, not a file")
    if not stat.S_ISREG(st.st_mode):
        kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "socket or device"
        raise DicomSkip(f"not a regular file ({kind})")
    if st.st_size == 0:
        raise DicomSkip("empty file")
    return st


def _inflate(fh, limit: int, *, whole: bool) -> BytesIO:
    """Inflate the raw-deflate stream from ``fh`` to at most ``limit`` bytes.

    With ``whole`` the stream must end within the limit, otherwise it is a decompression bomb
    (the data inflates beyond what its header declares); without, a prefix is enough.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = BytesIO()
    while True:
        chunk = inflater.unconsumed_tail or fh.read(1 << 16)
        if not chunk:
            break
        out.write(inflater.decompress(chunk, limit + 1 - out.tell()))
        if out.tell() > limit:
            if whole:
                raise DicomSkip(
                    f"decompression bomb: deflated data inflates beyond {limit:,} bytes, "
                    "more than its header declares"
                )
            break
        if inflater.eof:
            break
    out.seek(0)
    return out


def _parse(path: Path, force: bool, stop_when, inflate_limit: int | None) -> FileDataset:
    """pydicom's ``read_partial`` with bounded inflation of the deflated transfer syntax.

    pydicom inflates a whole deflated file into memory even to read its header; a 522 KB file
    can declare and hold gigabytes, so inflation here stops at ``inflate_limit`` bytes.
    """
    with path.open("rb") as fh:
        preamble = read_preamble(fh, force)
        meta = _read_file_meta_info(fh)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            fh.seek(0)
            return read_partial(fh, stop_when=stop_when, force=force)
        whole = stop_when is None
        buf = _inflate(fh, inflate_limit or _HEADER_INFLATE_BYTES, whole=whole)
        try:
            dataset = read_dataset(buf, False, True, stop_when=stop_when)
        except EOFError:
            raise DicomSkip("deflated header longer than the bounded read; not an image") from None
    ds = FileDataset(str(path), dataset, preamble, meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds


def open_dataset(
    path: str | Path, *, pixels: bool, inflate_limit: int | None = None
) -> tuple[pydicom.Dataset, int | None]:
    """Parse one file: ``(dataset, pixel_bytes)``.

    ``pixel_bytes`` is the length of the pixel data element (``None`` without one; the file
    size for encapsulated data of undefined length, an upper bound). ``pixels=False`` stops
    before the pixel data, which is then not read, only measured; ``inflate_limit`` bounds the
    inflated size of a deflated file read with pixels. Raises :class:`DicomSkip` for
    non-files, empty, non-DICOM or unreadable files.
    """
    path = Path(path)
    size = _check_file(path).st_size
    seen: list[int] = []

    def at_pixels(tag, vr, length) -> bool:
        if tag in PIXEL_TAGS:
            seen.append(size if length == 0xFFFFFFFF else int(length))
            return True
        return False

    stop = None if pixels else at_pixels
    try:
        ds = _parse(path, False, stop, inflate_limit)
    except InvalidDicomError:
        ds = None  # No preamble: may still be a raw DICOM data set.
    except DicomSkip:
        raise
    except OSError as exc:
        raise DicomSkip(f"cannot read file: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on broken input
        raise DicomSkip(f"unreadable DICOM: {type(exc).__name__}: {exc}") from None
    if ds is None:
        try:
            ds = _parse(path, True, stop, inflate_limit)
        except DicomSkip:
            raise
        except Exception:  # noqa: BLE001
            raise DicomSkip("not DICOM") from None
        # force=True parses almost anything; demand the identity of a real instance.
        if "SOPClassUID" not in ds and "SOPInstanceUID" not in ds:
            raise DicomSkip("not DICOM")
    if pixels:
        elems = [ds[t] for t in ds.keys() if int(t) in PIXEL_TAGS]
        seen = [len(e.value or b"") if isinstance(e.value, bytes) else size for e in elems]
    return ds, (seen[0] if seen else None)


def int_attr(ds: pydicom.Dataset, keyword: str, default: int) -> int:
    """An integer header value, or :class:`DicomSkip` naming the malformed attribute."""
    try:
        value = ds.get(keyword, default)
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError):
        raise DicomSkip(f"malformed {keyword}: {ds.get(keyword)!r}") from None


def is_dicomdir(ds: pydicom.Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    sop = str(getattr(meta, "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
    return sop == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds


def declared_samples(ds: pydicom.Dataset) -> int:
    """Rows × Columns × frames × samples per pixel, as the header declares them."""
    rows, cols = int_attr(ds, "Rows", 0), int_attr(ds, "Columns", 0)
    frames = max(1, int_attr(ds, "NumberOfFrames", 1))
    return rows * cols * frames * max(1, int_attr(ds, "SamplesPerPixel", 1))


def check_image_header(ds: pydicom.Dataset, pixel_bytes: int | None, max_pixels: int) -> int:
    """Refuse what cannot be a usable image before decoding; return the declared sample count.

    Checks: not a DICOMDIR, pixel data present (``pixel_bytes`` from :func:`open_dataset`),
    Rows/Columns positive, Rows × Columns × frames × samples per pixel at most ``max_pixels``
    (0 = no limit), and pixel data not far larger than that image needs (a bomb: its bytes
    would be read into memory whatever the header says).
    """
    if is_dicomdir(ds):
        raise DicomSkip("DICOMDIR (a media directory index), not an image")
    if pixel_bytes is None:
        raise DicomSkip("no pixel data")
    rows, cols = int_attr(ds, "Rows", 0), int_attr(ds, "Columns", 0)
    if rows <= 0 or cols <= 0:
        raise DicomSkip(f"no image size in header (Rows {rows}, Columns {cols})")
    n = declared_samples(ds)
    if max_pixels and n > max_pixels:
        frames, spp = int_attr(ds, "NumberOfFrames", 1), int_attr(ds, "SamplesPerPixel", 1)
        raise DicomSkip(
            f"image too large: header declares {rows}×{cols} × {frames} frame(s) × {spp} "
            f"sample(s) = {n:,} samples, above dataset.max_pixels {max_pixels:,}"
        )
    need = n * max(1, -(-int_attr(ds, "BitsAllocated", 8) // 8))
    if pixel_bytes > 2 * need + (1 << 20):
        raise DicomSkip(
            f"pixel data of {pixel_bytes:,} bytes is far larger than the {need:,} bytes of the "
            "image its header declares (a decompression bomb or a corrupt header)"
        )
    return n
