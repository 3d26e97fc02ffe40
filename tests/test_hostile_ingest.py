"""Hostile files: file-system oddities, declared-huge frames, bombs, LUTs, stubs, codec advice."""

import csv
import errno
import io
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, JPEGLSLossless, RLELossless

from medsynth.dicom import files
from medsynth.dicom.read import DecodeOptions, DicomSkip, load_unit_image, read_header

from .hostile import (
    build_hostile_corpus,
    image_dataset,
    label_table,
    modality_lut_file,
    write_deflated_huge,
    write_native,
)


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def _entries(root: Path) -> set[str]:
    """Every entry below ``root`` but real folders (links included, not followed), relative."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        out.update(str((Path(dirpath) / n).relative_to(root)) for n in filenames + links)
    return out


def test_hostile_corpus_every_file_accounted_for(tmp_path):
    from typer.testing import CliRunner

    from medsynth.cli import app

    data = tmp_path / "data"
    expected = build_hostile_corpus(data)
    table = label_table(data, tmp_path / "labels.csv")
    proto = tmp_path / "p.yaml"
    proto.write_text(
        f"name: hostile\noutput_root: {tmp_path / 'runs'}\n"
        f"dataset:\n  root: {data}\n  labels_csv: {table}\n  join_column: sop\n"
        "  spatial_size: 16\n  workers: 1\n  multiframe: middle\n"
    )
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["ingest", str(proto), "--run-dir", str(run)])
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    out = run / "ingest"
    index = {r["path"] for r in _rows(out / "index.csv")}
    skipped = {r["path"]: r["reason"] for r in _rows(out / "skipped.csv")}
    unlabelled = {r["path"] for r in _rows(out / "unlabelled.csv")}
    # Every entry is in exactly one list.
    assert index | set(skipped) | unlabelled == _entries(data) == set(expected)
    assert len(index) + len(skipped) + len(unlabelled) == len(expected)
    for name, outcome in expected.items():
        if outcome == "index":
            assert name in index, (name, skipped.get(name))
        elif outcome != "*":
            assert outcome in skipped.get(name, ""), (name, skipped.get(name))
    assert "mlut.dcm" in index and "multiframe.dcm" in index


def test_modality_lut_sequence_applies_to_stored_integers(tmp_path):
    path, stored, expected = modality_lut_file(tmp_path / "mlut.dcm")
    unit = load_unit_image(path, DecodeOptions(intensity="bits"))
    # Before the fix: "IndexError: arrays used as indices must be of integer type".
    np.testing.assert_allclose(unit[0], expected / expected.max(), atol=1e-6)


def test_multiframe_middle_decodes_that_frame(tmp_path):
    ds = image_dataset(16, 16, NumberOfFrames=3)
    path = write_native(tmp_path / "mf.dcm", ds, np.arange(768, dtype=np.uint16).tobytes())
    opts = DecodeOptions(
        intensity="window", window_center=383.5, window_width=255, multiframe="middle"
    )
    unit = load_unit_image(path, opts)
    np.testing.assert_allclose(unit[0].ravel(), (np.arange(256, 512) - 256) / 255, atol=1e-6)


def test_declared_huge_frames_are_refused_from_the_header(tmp_path):
    small = write_deflated_huge(tmp_path / "d.dcm", 16384, 16384)
    assert small.stat().st_size < 2_000_000
    with pytest.raises(DicomSkip, match="image too large.*16384×16384.*dataset.max_pixels"):
        read_header(small, check_image=True)
    with pytest.raises(DicomSkip, match="image too large"):
        load_unit_image(small)
    header = read_header(small)  # without the image check the header still reads, bounded
    assert header["Rows"] == "16384"
    # A higher limit lets the same frame through the check.
    assert files.check_image_header(*files.open_dataset(small, pixels=False), 0) == 16384**2


def test_deflated_payload_larger_than_declared_is_a_bomb(tmp_path):
    bomb = write_deflated_huge(tmp_path / "bomb.dcm", 64, 64, pixel_bytes=64 << 20)
    with pytest.raises(DicomSkip, match="decompression bomb"):
        load_unit_image(bomb)


def test_pillow_decompression_bomb_is_reported_as_such(tmp_path):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(buf, format="JPEG")
    frame = buf.getvalue()
    sof = frame.index(b"\xff\xc0")
    # SOF0: marker, length (2), precision (1), height (2), width (2): declare 30000 × 30000.
    forged = frame[: sof + 5] + (30000).to_bytes(2, "big") * 2 + frame[sof + 9 :]
    ds = image_dataset(16, 16, bits=8)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([forged])
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "bomb.dcm", enforce_file_format=True)
    with pytest.raises(DicomSkip, match="decompression bomb"):
        load_unit_image(tmp_path / "bomb.dcm")


def test_codec_advice_only_when_a_plugin_is_missing(tmp_path):
    # A corrupt RLE segment: pydicom's own RLE decoder is installed, so keep its message.
    ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm", download=False))
    frame = bytearray(next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1)))
    frame[0:4] = (15).to_bytes(4, "little")  # 15 segments declared for one 16-bit sample
    ds.PixelData = encapsulate([bytes(frame)])
    ds.save_as(tmp_path / "rle.dcm")
    with pytest.raises(DicomSkip) as err:
        load_unit_image(tmp_path / "rle.dcm")
    assert "codecs" not in str(err.value) and "RLE Lossless" in str(err.value)
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    # JPEG-LS has no decoder plugin here (no pylibjpeg/gdcm): then the advice is right.
    from pydicom.pixels.decoders.base import get_decoder

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS plugin is installed")
    ls = image_dataset(8, 8, bits=16)
    ls.file_meta.TransferSyntaxUID = JPEGLSLossless
    ls.PixelData = encapsulate([b"\xff\xd8" + bytes(30)])
    ls["PixelData"].VR = "OB"
    ls.save_as(tmp_path / "ls.dcm", enforce_file_format=True)
    with pytest.raises(DicomSkip, match="no decoder plugin installed; install the optional codecs"):
        load_unit_image(tmp_path / "ls.dcm")


def test_io_errors_become_reasons(tmp_path, monkeypatch):
    path = write_native(tmp_path / "ok.dcm", image_dataset(8, 8), bytes(128))

    def eio(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(files, "_parse", eio)
    with pytest.raises(DicomSkip, match="cannot read file: Input/output error"):
        read_header(path)


def test_large_frame_is_averaged_before_float(tmp_path):
    side = 2048
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, (side, side), dtype=np.uint16)
    ds = image_dataset(side, side, BitsStored=12, RescaleSlope=2, RescaleIntercept=-100)
    path = write_native(tmp_path / "big.dcm", ds, pixels.tobytes())
    tracemalloc.start()
    unit = load_unit_image(path, DecodeOptions(intensity="bits"), reduce_to=32)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert unit.shape == (1, 64, 64)
    want = pixels.reshape(64, 32, 64, 32).mean(axis=(1, 3)) / 4095
    np.testing.assert_allclose(unit[0], want, atol=1e-4)
    # The stored bytes, the native array and one float band; never a full float64 copy
    # (8 bytes a pixel: before this, peak was ~18x the native size).
    assert peak < 3.5 * pixels.nbytes, peak / pixels.nbytes


def test_pixel_data_far_larger_than_declared_is_refused_before_reading(tmp_path):
    # 16 × 16 declared, 4 MiB stored: the bytes would be read into memory whatever the header says.
    path = write_native(tmp_path / "big.dcm", image_dataset(16, 16), bytes(4 << 20))
    with pytest.raises(DicomSkip, match="pixel data of 4,194,304 bytes is far larger than the 512"):
        read_header(path, check_image=True)
