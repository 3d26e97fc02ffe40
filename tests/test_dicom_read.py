"""DICOM decoding: photometric, rescale, bit depths, colour, multi-frame, broken files."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medsynth.dicom.read import DecodeOptions, DicomSkip, load_unit_image, read_header
from medsynth.dicom.write import build_instance, deterministic_uid, write_instance

SC = "1.2.840.10008.5.1.4.1.1.7"


def _write(path: Path, pixels: np.ndarray, photometric="MONOCHROME2", bits_stored=None, **attrs):
    ds = build_instance(
        pixels,
        attrs,
        sop_class_uid=SC,
        sop_instance_uid=deterministic_uid(path.name),
        photometric=photometric,
        bits_stored=bits_stored,
    )
    write_instance(path, ds)
    return path


def _gradient(dtype, lo, hi, shape=(8, 12)):
    # Top row dark, bottom row bright: orientation is checkable after decoding.
    col = np.linspace(lo, hi, shape[0])
    return np.repeat(col[:, None], shape[1], axis=1).astype(dtype)


def test_monochrome1_with_rescale_matches_monochrome2(tmp_path):
    m2 = _write(tmp_path / "m2", _gradient(np.uint16, 0, 4095), bits_stored=12)
    # Same anatomy stored inverted, with a modality rescale that maps back to other units.
    m1 = _write(
        tmp_path / "m1",
        4095 - _gradient(np.uint16, 0, 4095),
        "MONOCHROME1",
        12,
        RescaleSlope=2,
        RescaleIntercept=-1000,
    )
    for mode in ("bits", "percentile"):
        a = load_unit_image(m2, DecodeOptions(intensity=mode))
        b = load_unit_image(m1, DecodeOptions(intensity=mode))
        assert a.shape == b.shape == (1, 8, 12)
        assert a[0, 0].mean() < a[0, -1].mean()  # bright at the bottom
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_16bit_signed_and_window(tmp_path):
    px = _gradient(np.int16, -1024, 3071)
    f = _write(
        tmp_path / "ct.dcm",
        px,
        RescaleSlope=1,
        RescaleIntercept=0,
        WindowCenter=40,
        WindowWidth=400,
    )
    bits = load_unit_image(f, DecodeOptions(intensity="bits"))
    expected = (px.astype(np.float64) + 32768) / 65535
    np.testing.assert_allclose(bits[0], expected, atol=1e-6)
    win = load_unit_image(f, DecodeOptions(intensity="dicom_window"))
    ref = np.clip((px - (40 - 200)) / 400, 0, 1)
    np.testing.assert_allclose(win[0], ref, atol=1e-6)
    same = load_unit_image(f, DecodeOptions(intensity="window", window_center=40, window_width=400))
    np.testing.assert_array_equal(win, same)


def test_8bit_bits_mode_is_exact(tmp_path):
    px = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = load_unit_image(_write(tmp_path / "a", px), DecodeOptions(intensity="bits"))
    np.testing.assert_array_equal(np.round(out[0] * 255).astype(np.uint8), px)


def test_rgb_grey_and_kept():
    path = get_testdata_file("SC_rgb_small_odd.dcm", download=False)
    rgb = load_unit_image(path, DecodeOptions(intensity="bits", color="rgb"))
    grey = load_unit_image(path, DecodeOptions(intensity="bits", color="grey"))
    assert rgb.shape[0] == 3 and grey.shape[0] == 1
    np.testing.assert_allclose(grey[0], np.tensordot([0.299, 0.587, 0.114], rgb, 1), atol=1e-5)


def test_jpeg_baseline_decodes_with_pillow():
    out = load_unit_image(
        get_testdata_file("SC_rgb_jpeg_dcmtk.dcm", download=False), DecodeOptions(color="rgb")
    )
    assert out.shape == (3, 100, 100) and 0 <= out.min() < out.max() <= 1


def test_multiframe_policy():
    path = get_testdata_file("SC_rgb_rle_2frame.dcm", download=False)
    with pytest.raises(DicomSkip, match="multi-frame .2 frames"):
        load_unit_image(path)
    first = load_unit_image(path, DecodeOptions(multiframe="first", intensity="bits"))
    middle = load_unit_image(path, DecodeOptions(multiframe="middle", intensity="bits"))
    assert first.shape == middle.shape == (1, 100, 100)
    assert not np.array_equal(first, middle)


def _bad_corpus(tmp: Path) -> dict[str, str]:
    """name -> expected reason fragment, for files the tests write plus pydicom's broken ones."""
    good = _write(tmp / "good.dcm", _gradient(np.uint16, 0, 4095, (32, 32)), bits_stored=12)
    cut = _write(tmp / "truncated.dcm", _gradient(np.uint16, 0, 4095, (32, 32)), bits_stored=12)
    cut.write_bytes(cut.read_bytes()[:-700])
    (tmp / "empty.dcm").write_bytes(b"")
    (tmp / "notes.txt").write_text("this is not a DICOM file\n" * 20)
    (tmp / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(300))
    ds = pydicom.dcmread(good)
    del ds.PixelData
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = deterministic_uid("nopixels")
    ds.save_as(tmp / "nopixels.dcm")
    return {
        "truncated.dcm": "pixel decode failed",
        "empty.dcm": "empty file",
        "notes.txt": "not DICOM",
        "image.png": "not DICOM",
        "nopixels.dcm": "no pixel data",
    }


def test_bad_input_corpus_never_crashes(tmp_path):
    expected = _bad_corpus(tmp_path)
    for name, fragment in expected.items():
        with pytest.raises(DicomSkip, match=fragment):
            load_unit_image(tmp_path / name)
    # pydicom's own malformed / unusual test files: each decodes or skips with a reason.
    names = [
        "MR_truncated.dcm",
        "rtplan_truncated.dcm",
        "rtplan.dcm",
        "test-SR.dcm",
        "badVR.dcm",
        "no_meta.dcm",
        "meta_missing_tsyntax.dcm",
        "JPEG2000.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "JPEGLSNearLossless_08.dcm",
        "UN_sequence.dcm",
        "rtstruct.dcm",
        "CT_small.dcm",
        "MR_small_RLE.dcm",
    ]
    outcomes = {}
    for name in names:
        path = get_testdata_file(name, download=False)
        if path is None:
            continue
        try:
            out = load_unit_image(path)
            assert out.ndim == 3 and np.isfinite(out).all()
            outcomes[name] = "ok"
        except DicomSkip as exc:
            assert str(exc)
            outcomes[name] = str(exc)
    assert outcomes["CT_small.dcm"] == "ok"
    assert outcomes["rtplan.dcm"] == "no pixel data"
    assert "pixel decode failed" in outcomes["MR_truncated.dcm"]
    assert "codecs" in outcomes["JPEG2000.dcm"] or outcomes["JPEG2000.dcm"] == "ok"


def test_ingest_lists_bad_files_with_reasons(tmp_path):
    from medsynth.data.ingest import ingest
    from medsynth.protocol import DatasetSection

    data = tmp_path / "data"
    data.mkdir()
    expected = _bad_corpus(data)
    for i in range(3):
        _write(data / f"ok{i}", _gradient(np.uint16, 0, 4000 + i, (20, 30)), bits_stored=12)
    keys = [read_header(data / f"ok{i}")["SOPInstanceUID"] for i in range(3)]
    keys += [read_header(data / n)["SOPInstanceUID"] for n in ("truncated.dcm", "nopixels.dcm")]
    (data / "labels.csv").write_text(
        "sop,y\n" + "".join(f"{k},{'ab'[i % 2]}\n" for i, k in enumerate(keys)) + "missing,a\n"
    )
    ds = DatasetSection(
        root=str(data),
        labels_csv=str(data / "labels.csv"),
        join_column="sop",
        label_column="y",
        spatial_size=16,
        workers=1,
    )
    summary = ingest(ds, tmp_path / "out")
    import csv

    skipped = {r["path"]: r["reason"] for r in csv.DictReader(open(tmp_path / "out/skipped.csv"))}
    assert set(skipped) == set(expected)
    for name, fragment in expected.items():
        assert fragment in skipped[name], (name, skipped[name])
    assert summary.images == 3 and summary.skipped == len(expected)
    assert summary.unlabelled == 1  # good.dcm has no label row
    # "missing", and nopixels.dcm's row: a file without an image is skipped from its header.
    assert summary.unmatched_labels == 2
    assert "skipped 5" in summary.line()
    images = np.load(tmp_path / "out/images.npy")
    assert images.shape == (3, 1, 16, 16) and images.dtype == np.float16
