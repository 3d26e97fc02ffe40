"""Colour end to end: RGB phantoms -> 3-channel ingest, model, previews, RGB Secondary Capture,
pool read-back, evaluation, report grids and thumbnails; and what dcmtk / dciodvfy say about the
written synthetic DICOM (grey and RGB)."""

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from medsynth.dicom.read import load_unit_image
from medsynth.dicom.write import synthetic_decode_options, synthetic_instance, write_instance

SMOKE_RGB = Path(__file__).resolve().parents[1] / "protocols" / "smoke_rgb.yaml"


def _instance(image: np.ndarray, path: Path) -> Path:
    ds = synthetic_instance(
        image,
        run_id="ab" * 32,
        pool="main",
        class_name="exudate",
        class_index=2,
        seed=7,
        index=3,
        derivation="test",
    )
    write_instance(path, ds)
    return path


def _is_colour(rgb: np.ndarray, tol: float = 2.0) -> bool:
    """``(H, W, 3)``: channels differ on average by more than ``tol`` (8-bit units)."""
    rgb = rgb.astype(np.float64)
    return np.abs(rgb[..., 0] - rgb[..., 2]).mean() > tol


def test_rgb_synthetic_instance_round_trip(tmp_path):
    img = np.random.default_rng(0).uniform(-1, 1, (3, 12, 10)).astype(np.float32)
    path = _instance(img, tmp_path / "c.dcm")
    ds = pydicom.dcmread(path)
    assert (ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration) == (
        3,
        "RGB",
        0,
    )
    assert (ds.BitsAllocated, ds.BitsStored, ds.Rows, ds.Columns) == (8, 8, 12, 10)
    assert "RescaleSlope" not in ds  # no Modality LUT on colour
    np.testing.assert_array_equal(ds.pixel_array, np.round((img.transpose(1, 2, 0) + 1) * 127.5))
    unit = load_unit_image(path, synthetic_decode_options(3))
    assert unit.shape == (3, 12, 10)
    np.testing.assert_allclose(unit * 2 - 1, img, atol=1 / 255 + 1e-6)
    with pytest.raises(ValueError, match="image must be"):
        synthetic_instance(
            img[:2],
            run_id="x",
            pool="p",
            class_name="c",
            class_index=0,
            seed=0,
            index=0,
            derivation="",
        )


def test_study_date_time_fixed_and_laterality_absent(tmp_path):
    for name, img in (("g", np.zeros((8, 8), np.float32)), ("c", np.zeros((3, 8, 8), np.float32))):
        ds = pydicom.dcmread(_instance(img, tmp_path / f"{name}.dcm"))
        assert "Laterality" not in ds and ds.ImageLaterality == "U"
        assert (ds.StudyDate, ds.StudyTime) == ("19000101", "000000")


def _only_private_warnings(text: str) -> list[str]:
    """dciodvfy lines that are errors or warnings about anything but the private label block."""
    return [
        line
        for line in text.splitlines()
        if ("Error" in line or "Warning" in line) and not line.startswith("(0x0011,")
    ]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy not installed")
@pytest.mark.parametrize("shape", [(16, 16), (3, 16, 16)], ids=["grey", "rgb"])
def test_dciodvfy_only_warns_about_the_private_block(tmp_path, shape):
    img = np.random.default_rng(1).uniform(-1, 1, shape).astype(np.float32)
    res = subprocess.run(
        ["dciodvfy", str(_instance(img, tmp_path / "x.dcm"))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    text = res.stdout + res.stderr
    assert "SCImage" in text
    assert any(line.startswith("(0x0011,") for line in text.splitlines())  # the check can see
    assert _only_private_warnings(text) == [], text


@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmtk's dcmdump not installed")
def test_dcmdump_reads_rgb(tmp_path):
    path = _instance(np.zeros((3, 16, 16), np.float32), tmp_path / "c.dcm")
    res = subprocess.run(["dcmdump", "-E", str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "E:" not in res.stderr, res.stderr
    assert "[RGB]" in res.stdout and "SamplesPerPixel" in res.stdout


def test_fundus_phantoms_are_rgb_and_coloured(tmp_path):
    from medsynth.data.phantoms import FUNDUS_CLASS_NAMES, write_phantoms

    labels = write_phantoms(tmp_path, n_patients=6, num_classes=5, size_px=32, body_part="fundus")
    files = sorted(p for p in tmp_path.rglob("IM*"))
    ds = pydicom.dcmread(files[0])
    assert ds.Modality == "OP" and ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
    assert _is_colour(ds.pixel_array)
    assert {r.split(",")[2] for r in labels.read_text().splitlines()[1:]} <= set(FUNDUS_CLASS_NAMES)
    with pytest.raises(ValueError, match="body_part"):
        write_phantoms(tmp_path / "x", n_patients=4, body_part="knee")


# --- all five stages on tiny RGB phantoms -------------------------------------------------------


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    from medsynth.experiment.runner import run_protocol
    from medsynth.protocol import load_protocol

    run = tmp_path_factory.mktemp("rgb")
    res = run_protocol(load_protocol(SMOKE_RGB), run_dir=run, log=lambda s: None, progress=False)
    return run, res


def test_rgb_study_end_to_end(rgb_run):
    run, res = rgb_run
    assert [p.action for p in res.plan] == ["run"] * 5
    # Ingest and model are 3-channel, and the channels carry colour (not grey repeated).
    cache = np.load(run / "ingest/images.npy")
    assert cache.ndim == 4 and cache.shape[1:] == (3, 16, 16)
    assert np.abs(cache[:, 0] - cache[:, 2]).mean() > 0.05
    preview = Image.open(sorted((run / "train").glob("preview-*.png"))[-1])
    assert preview.mode == "RGB" and _is_colour(np.asarray(preview))
    # Every generated file is an RGB Secondary Capture.
    files = sorted((run / "generate/main/dicom").rglob("*.dcm"))
    assert len(files) == 24
    for f in files:
        ds = pydicom.dcmread(f)
        assert (ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration) == (
            3,
            "RGB",
            0,
        )
    # The pool reads back in colour; evaluation ran on 3 channels.
    from medsynth.generation.dataset import load_pool

    pool = load_pool(run / "generate/main", channels=3)
    assert pool.images.shape == (24, 3, 16, 16)
    uplift = (run / "evaluate/uplift.csv").read_text()
    assert "real_only" in uplift and "synthetic:main:random@1" in uplift
    feats = np.load(run / "evaluate/features.npz")
    assert feats["pool_main"].shape[0] == 24
    assert "FD_clf" in (run / "evaluate/fidelity.json").read_text()
    # Report grids are colour.
    samples = np.asarray(Image.open(run / "report/samples.png").convert("RGB"))
    assert _is_colour(samples)
    pairs = np.asarray(Image.open(run / "report/memorization_main.png").convert("RGB"))
    assert _is_colour(pairs)  # synthetic samples and their nearest training images


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy not installed")
def test_rgb_pool_file_passes_dciodvfy(rgb_run):
    run, _ = rgb_run
    f = next((run / "generate/main/dicom").rglob("*.dcm"))
    res = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
    assert _only_private_warnings(res.stdout + res.stderr) == [], res.stdout + res.stderr


def test_colour_thumbnails(rgb_run):
    from medsynth.review.thumbs import array_thumbnail, dicom_thumbnail

    run, _ = rgb_run
    f = next((run / "generate/main/dicom").rglob("*.dcm"))
    thumb = np.asarray(Image.open(io.BytesIO(dicom_thumbnail(f, marker=None))))
    assert thumb.shape == (112, 112, 3) and _is_colour(thumb)
    cache = np.load(run / "ingest/images.npy", mmap_mode="r")
    thumb = np.asarray(Image.open(io.BytesIO(array_thumbnail(np.asarray(cache[0])))))
    assert thumb.shape == (112, 112, 3) and _is_colour(thumb)
    # A grey synthetic file still gives a grey thumbnail (all channels equal).
    grey = _instance(np.linspace(-1, 1, 256).reshape(16, 16).astype(np.float32), run / "g.dcm")
    thumb = np.asarray(Image.open(io.BytesIO(dicom_thumbnail(grey, marker=None))))
    assert not _is_colour(thumb, tol=0.0) and thumb.std() > 10


def test_review_viewer_shows_colour(rgb_run):
    """The dashboard's grid tiles and full-resolution view keep an RGB instance's colour."""
    from medsynth.review.viewer import (
        banner_px,
        full_png,
        presets,
        tile_png,
        value_range,
        windowed,
    )

    run, _ = rgb_run
    f = next((run / "generate/main/dicom").rglob("*.dcm"))
    vr = value_range(f)
    img = windowed(f, vr.center, vr.width)
    assert img.shape[-1] == 3 and img.ndim == 3
    # Crop the red SYNTHETIC banner (above) and the status strip (below): the image alone.
    top = banner_px(112)
    tile = np.asarray(Image.open(io.BytesIO(tile_png(img, "accept"))).convert("RGB"))
    assert _is_colour(tile[top : top + 112])
    top = banner_px(img.shape[1])
    full = np.asarray(Image.open(io.BytesIO(full_png(f, vr.center, vr.width))).convert("RGB"))
    assert _is_colour(full[top : top + img.shape[0]])
    assert set(presets(f)) >= {"stored window", "full range"}


def test_cli_phantoms_body_part(tmp_path):
    from typer.testing import CliRunner

    from medsynth.cli import app

    runner = CliRunner()
    args = ["phantoms", "--n-patients", "4", "--size-px", "32"]
    res = runner.invoke(app, [*args, "--body-part", "knee", str(tmp_path / "k")])
    assert res.exit_code == 2 and "body_part" in res.output and "fundus" in res.output
    assert not (tmp_path / "k").exists()  # nothing written for bad input
    res = runner.invoke(app, [*args, "--body-part", "fundus", str(tmp_path / "f")])
    assert res.exit_code == 0, res.output
    ds = pydicom.dcmread(next(p for p in (tmp_path / "f").rglob("IM*")))
    assert ds.PhotometricInterpretation == "RGB"


def test_evaluation_on_three_channels_uses_colour():
    """Classes that differ only in hue (same per-pixel channel mean): a 3-channel classifier
    (with classical augmentation) separates them; fidelity and memorization run on 3 channels."""
    import torch

    from medsynth.evaluation.classifier import Classifier, ClassifierConfig, classical_augment
    from medsynth.evaluation.fidelity import fidelity_diversity
    from medsynth.evaluation.memorization import audit
    from medsynth.evaluation.stats import metrics

    g = torch.Generator().manual_seed(0)
    n = 160
    y = torch.arange(n) % 2
    x = (torch.randn(n, 3, 16, 16, generator=g) * 0.2).clamp(-1, 1)
    sign = (2 * y - 1).float()[:, None, None]
    x[:, 0, 4:12, 4:12] += 0.5 * sign  # red up and blue down for class 1, the reverse for 0
    x[:, 2, 4:12, 4:12] -= 0.5 * sign
    assert torch.allclose(x[y == 0].mean(1).mean(), x[y == 1].mean(1).mean(), atol=0.02)
    cfg = ClassifierConfig(epochs=3, batch_size=32, augment=True)
    clf = Classifier(2, 3, cfg, seed=0).fit(x[:120], y[:120], x[120:], y[120:])
    assert metrics(y[120:].numpy(), clf.predict_proba(x[120:]), ["a", "b"])["auc"] > 0.95
    assert classical_augment(x[:4], torch.Generator().manual_seed(1)).shape == (4, 3, 16, 16)
    feats = clf.features(x)
    fid = fidelity_diversity(feats[:60], feats[60:120], x[:60], x[60:120])
    assert np.isfinite([fid["FD_clf"], fid["msssim_ratio"], fid["vendi_pixels"]]).all()
    memo = audit(
        x[:10].numpy(), x[10:120].numpy(), x[120:].numpy(), feats[:10], feats[10:120], feats[120:]
    )
    assert memo["n_synthetic"] == 10
    copies = audit(
        x[10:14].numpy(),
        x[10:120].numpy(),
        x[120:].numpy(),
        feats[10:14],
        feats[10:120],
        feats[120:],
    )
    assert copies["exact_copies"] == 4


def test_rgb_pool_png_export(rgb_run):
    from medsynth.generation.pool import generate_pool

    run, _ = rgb_run
    snap = sorted((run / "train").glob("snapshot-[0-9]*"))[-1]
    out = run / "generate/png"
    generate_pool(snap, out, {"normal": 2}, steps=2, export_png=True, progress=False)
    png = Image.open(next((out / "png/normal").glob("*.png")))
    assert png.mode == "RGB" and png.size == (16, 16) and _is_colour(np.asarray(png))
