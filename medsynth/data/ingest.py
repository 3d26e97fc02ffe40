"""Ingest: DICOM folder + label table -> ``ingest/`` cache (index.csv, images.npy, reports).

Later stages read only this cache and never decode DICOM again. Decoding runs in worker
processes and streams into a memory-mapped array, so memory stays flat as file count grows.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medsynth.data.index import (
    IngestError,
    join_labels,
    read_label_table,
    split_counts,
)
from medsynth.data.leakage import leak_line, split_with_duplicates
from medsynth.data.transforms import fit_to_square
from medsynth.dicom.read import (
    DecodeOptions,
    DicomSkip,
    iter_candidate_files,
    load_unit_image,
    read_header,
)
from medsynth.protocol import DatasetKind, DatasetSection
from medsynth.utils.csvsafe import write_rows

INDEX_COLUMNS = (
    "row",
    "path",
    "PatientID",
    "StudyInstanceUID",
    "SOPInstanceUID",
    "label",
    "label_index",
    "split",
    "Rows",
    "Columns",
    "PhotometricInterpretation",
    "TransferSyntaxUID",
    "ViewPosition",
    "PixelSpacing",
)


@dataclass
class IngestSummary:
    files_scanned: int
    images: int
    skipped: int
    unlabelled: int
    unmatched_labels: int
    classes: list[str]
    counts: dict[str, dict[str, int]]
    spatial_size: int
    channels: int
    seconds: float
    duplicates: dict | None = None  # leakage.split_with_duplicates figures

    def line(self) -> str:
        per_split = ", ".join(f"{s} {sum(c.values())}" for s, c in self.counts.items())
        return (
            f"ingested {self.images} images ({per_split}) from {self.files_scanned} files; "
            f"skipped {self.skipped} (see skipped.csv), {self.unlabelled} without label, "
            f"{self.unmatched_labels} label rows without image; {self.seconds:.1f} s"
        ) + (f"\n{leak_line(self.duplicates)}" if self.duplicates else "")


def _header_task(args: tuple[str, tuple[str, ...], int]) -> tuple[str, dict | None, str | None]:
    path, keywords, max_pixels = args
    try:
        return path, read_header(path, keywords, check_image=True, max_pixels=max_pixels), None
    except DicomSkip as exc:
        return path, None, str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad file never stops an ingest
        return path, None, f"unexpected {type(exc).__name__}: {exc}"


def _decode_task(args: tuple[str, DecodeOptions, int, str]) -> tuple[np.ndarray | None, str | None]:
    path, opts, size, mode = args
    try:
        return fit_to_square(load_unit_image(path, opts, reduce_to=size), size, mode).astype(
            np.float16
        ), None
    except DicomSkip as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - one bad file never stops an ingest
        return None, f"unexpected {type(exc).__name__}: {exc}"


def _pmap(fn: Callable, items: list, workers: int, desc: str) -> Iterator:
    """Ordered map, in worker processes when ``workers > 1``, with a progress bar."""
    bar = dict(total=len(items), desc=desc, unit="file", mininterval=1.0, leave=False)
    if workers <= 1 or len(items) < 64:
        yield from tqdm(map(fn, items), **bar)
        return
    # spawn, not fork: callers may hold torch/OpenMP threads that fork would copy mid-flight.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        chunk = max(8, min(256, len(items) // (workers * 16)))
        yield from tqdm(pool.map(fn, items, chunksize=chunk), **bar)


def _write_csv(path: Path, columns: Iterable[str], rows: Iterable[dict]) -> None:
    # Labels and paths come from the user's data: neutralise spreadsheet formulas.
    with path.open("w", newline="") as fh:
        write_rows(fh, columns, rows)


def _trim_rows(src: Path, dst: Path, n: int, chunk: int = 4096) -> None:
    """Move the first ``n`` rows of a .npy file to ``dst`` in chunks (flat memory)."""
    full = np.load(src, mmap_mode="r")
    if n == full.shape[0]:
        del full
        src.replace(dst)
        return
    out = np.lib.format.open_memmap(dst, mode="w+", dtype=full.dtype, shape=(n,) + full.shape[1:])
    for i in range(0, n, chunk):
        out[i : i + chunk] = full[i : min(n, i + chunk)]
    out.flush()
    del out, full
    src.unlink()


def decode_options(ds: DatasetSection) -> DecodeOptions:
    return DecodeOptions(
        intensity=ds.intensity,
        lower_percentile=ds.lower_percentile,
        upper_percentile=ds.upper_percentile,
        window_center=ds.window_center,
        window_width=ds.window_width,
        color=ds.color,
        multiframe=ds.multiframe,
        max_pixels=ds.max_pixels,
    )


def ingest(
    ds: DatasetSection, out_dir: str | Path, root: str | Path | None = None
) -> IngestSummary:
    """Scan, join, split, decode and cache a DICOM dataset into ``out_dir``.

    Writes ``index.csv`` (one row per cached image, ``row`` = position in the array),
    ``images.npy`` (``(N, C, S, S) float16 in [-1, 1]``), ``skipped.csv``, ``unlabelled.csv``,
    ``unmatched_labels.csv`` and ``summary.json``. ``root`` overrides ``ds.root``.
    """
    t0 = time.perf_counter()
    root = Path(root or ds.root or "")
    if not root.is_dir():
        raise IngestError(
            f"data folder not found: {root}. Point dataset.root at a folder of DICOM files "
            "(or use dataset.kind: phantoms for the embedded demo data)."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table_columns, table_rows = read_label_table(ds.labels_csv)

    # 1. Headers of every candidate file.
    # realpath, not Path.resolve: it never raises on a symlink loop.
    table = os.path.realpath(ds.labels_csv)
    skipped: list[dict] = []

    def unlisted(path: Path, reason: str) -> None:
        skipped.append({"path": str(path.relative_to(root)), "reason": reason})

    files = [str(p) for p in iter_candidate_files(root, unlisted) if os.path.realpath(p) != table]
    if not files:
        raise IngestError(f"no files found below {root}")
    keywords = (ds.join_attribute, "PixelSpacing")
    headers = []
    tasks = [(f, keywords, ds.max_pixels) for f in files]
    for path, header, reason in _pmap(_header_task, tasks, ds.workers, "headers"):
        if header is None:
            skipped.append({"path": str(Path(path).relative_to(root)), "reason": reason})
        else:
            headers.append(dict(header, path=str(Path(path).relative_to(root))))

    # 2. Labels and patient-level splits.
    joined = join_labels(
        headers,
        table_columns,
        table_rows,
        join_attribute=ds.join_attribute,
        join_column=ds.join_column,
        label_column=ds.label_column,
        classes=ds.classes,
        split_column=ds.split_column,
        table=ds.labels_csv,
    )

    # 3. Decode the labelled images, streaming into a memory-mapped cache.
    channels = 3 if ds.color == "rgb" else 1
    opts = decode_options(ds)
    tasks = [(str(root / r["path"]), opts, ds.spatial_size, ds.resize_mode) for r in joined.rows]
    tmp = out / "images.tmp.npy"
    shape = (max(len(tasks), 1), channels, ds.spatial_size, ds.spatial_size)
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
    kept = []
    for r, (img, reason) in zip(
        joined.rows, _pmap(_decode_task, tasks, ds.workers, "decode"), strict=True
    ):
        if img is None:
            skipped.append({"path": r["path"], "reason": reason})
            continue
        arr[len(kept)] = img
        kept.append(dict(r, row=len(kept)))
    arr.flush()
    del arr
    if not kept:
        # The message points at skipped.csv: write it (and unlabelled.csv) before failing.
        _write_csv(out / "skipped.csv", ("path", "reason"), skipped)
        _write_csv(out / "unlabelled.csv", ("path", "reason"), joined.unlabelled)
        tmp.unlink(missing_ok=True)
        raise IngestError(
            f"no usable images below {root}: {len(skipped)} file(s) skipped; "
            f"reasons are in {out / 'skipped.csv'}"
        )
    _trim_rows(tmp, out / "images.npy", len(kept))
    # Splits, with duplicate search (near-duplicate groups never straddle computed splits).
    duplicates = split_with_duplicates(out, kept, ds)

    # 4. Reports.
    _write_csv(out / "index.csv", INDEX_COLUMNS, kept)
    _write_csv(out / "skipped.csv", ("path", "reason"), skipped)
    _write_csv(out / "unlabelled.csv", ("path", "reason"), joined.unlabelled)
    _write_csv(out / "unmatched_labels.csv", table_columns, joined.unmatched_labels)
    summary = IngestSummary(
        files_scanned=len(files),
        images=len(kept),
        skipped=len(skipped),
        unlabelled=len(joined.unlabelled),
        unmatched_labels=len(joined.unmatched_labels),
        classes=joined.classes,
        counts=split_counts(kept, joined.classes),
        spatial_size=ds.spatial_size,
        channels=channels,
        seconds=round(time.perf_counter() - t0, 3),
        duplicates=duplicates,
    )
    (out / "summary.json").write_text(json.dumps(asdict(summary), indent=2))
    return summary


def ingest_dataset(ds: DatasetSection, run_dir: str | Path) -> IngestSummary:
    """Ingest as the protocol's dataset section says into ``run_dir/ingest``.

    For ``kind: phantoms`` the embedded phantom dataset is written to ``run_dir/phantoms``
    first (once) and joined on AccessionNumber, as its ``labels.csv`` is keyed.
    """
    from medsynth.data.phantoms import LABELS_FILE, class_names, write_phantoms

    run_dir = Path(run_dir)
    if ds.kind == DatasetKind.phantoms.value:
        root = run_dir / "phantoms"
        names = class_names(ds.phantoms.body_part)
        done = root / ".complete"
        if not done.exists():
            write_phantoms(root, **ds.phantoms.model_dump())
            done.write_text("ok\n")
        ds = ds.model_copy(
            update=dict(
                root=str(root),
                labels_csv=str(root / LABELS_FILE),
                join_attribute="AccessionNumber",
                join_column="accession",
                label_column="finding",
                classes=ds.classes or list(names[: ds.phantoms.num_classes]),
                split_column=None,
            )
        )
    return ingest(ds, run_dir / "ingest")
