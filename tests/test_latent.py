"""Latent diffusion on tiny sizes: autoencoder round trip, resume, latent sampling per seed."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import torch
from safetensors.torch import load_file

from medsynth.diffusion.autoencoder import AutoencoderConfig, encode_means, scale_factor
from medsynth.diffusion.unet import UNetConfig
from medsynth.generation.pool import generate_pool
from medsynth.protocol import ProtocolError, parse_protocol
from medsynth.training.autoencoder import (
    load_autoencoder,
    reconstruction_metrics,
    train_autoencoder,
)
from medsynth.training.latent import encode_training_set
from medsynth.training.loop import train

AE = AutoencoderConfig(channels=[8, 16], latent_channels=2, norm_num_groups=8)


def _images(n: int = 12, size: int = 16) -> torch.Tensor:
    """Smooth blobs in [-1, 1]: something an autoencoder can learn in a few dozen steps."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    c = torch.rand(n, 2, generator=g) - 0.5
    r = (xx - c[:, :1, None]) ** 2 + (yy - c[:, 1:, None]) ** 2
    return (torch.exp(-r / 0.2) * 2 - 1)[:, None]


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae")
    x = _images()
    snap = train_autoencoder(
        x,
        out,
        config=AutoencoderConfig(**AE.to_dict()),
        max_steps=40,
        batch_size=6,
        lr=3e-3,
        warmup_steps=5,
        checkpoint_every_steps=20,
        progress=False,
        device="cpu",
    )
    return snap, x


def test_autoencoder_round_trip_and_scale_factor(autoencoder, tmp_path):
    snap, x = autoencoder
    cfg = json.loads((snap / "config.json").read_text())
    assert cfg["image_shape"] == [1, 16, 16] and cfg["latent_shape"] == [2, 8, 8]
    ae, _ = load_autoencoder(snap)
    # The scale factor is 1/std of the training latents, recomputed here, not a constant.
    z = encode_means(ae, x)
    assert z.shape == (12, 2, 8, 8)
    assert cfg["scale_factor"] == pytest.approx(scale_factor(z), rel=1e-5)
    assert float((z * cfg["scale_factor"]).std()) == pytest.approx(1.0, rel=1e-4)
    # Trained reconstruction beats the untrained network on the same images.
    trained = reconstruction_metrics(snap, x)
    fresh = train_autoencoder(
        x,
        tmp_path / "fresh",
        config=AutoencoderConfig(**AE.to_dict()),
        max_steps=1,
        lr=1e-12,
        progress=False,
        device="cpu",
    )
    untrained = reconstruction_metrics(fresh, x)
    assert trained["images"] == 12
    assert trained["psnr_db_mean"] > untrained["psnr_db_mean"] + 3
    assert trained["ssim_mean"] > untrained["ssim_mean"]


def _ae_weights(snapshot):
    return load_file(snapshot / "autoencoder.safetensors")


@pytest.mark.parametrize("patch_px", [None, 8])
def test_autoencoder_resume_is_bit_identical(tmp_path, patch_px):
    """Whole images or random crops (patch_px): a resumed run equals an uninterrupted one."""
    x = _images(6)
    kw = dict(
        config=AutoencoderConfig(**AE.to_dict()),
        batch_size=3,
        patch_px=patch_px,
        checkpoint_every_steps=2,
        progress=False,
        device="cpu",
    )
    whole = train_autoencoder(x, tmp_path / "a", max_steps=4, **kw)
    train_autoencoder(x, tmp_path / "b", max_steps=2, **kw)
    resumed = train_autoencoder(x, tmp_path / "b", max_steps=4, **kw)
    a, b = _ae_weights(whole), _ae_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Crops or not, the snapshot encodes whole images (16 px -> 8 x 8 latents).
    cfg = json.loads((whole / "config.json").read_text())
    assert cfg.get("patch_px") == patch_px and cfg["latent_shape"] == [2, 8, 8]
    with pytest.raises(ValueError, match="other settings"):
        train_autoencoder(
            x, tmp_path / "b", max_steps=6, **(kw | {"config": AutoencoderConfig(channels=[8, 8])})
        )


def test_autoencoder_crops_are_other_training_data(tmp_path):
    x = _images(6)
    kw = dict(config=AutoencoderConfig(**AE.to_dict()), batch_size=3, progress=False, device="cpu")
    a = _ae_weights(train_autoencoder(x, tmp_path / "a", max_steps=4, patch_px=8, **kw))
    c = _ae_weights(train_autoencoder(x, tmp_path / "c", max_steps=4, **kw))
    assert not all(torch.equal(a[k], c[k]) for k in a)
    for bad in (7, 32):  # not divisible by the downsampling 2; larger than the 16 px images
        with pytest.raises(ValueError, match="patch_px"):
            train_autoencoder(x, tmp_path / f"bad{bad}", max_steps=1, patch_px=bad, **kw)


@pytest.fixture(scope="module")
def latent_snapshot(autoencoder, tmp_path_factory):
    ae_snap, x = autoencoder
    latents, record = encode_training_set(ae_snap, x)
    out = tmp_path_factory.mktemp("ldm")
    snap = train(
        latents,
        torch.tensor([0, 1] * 6),
        ["a", "b"],
        out,
        unet=UNetConfig(channels=[16, 32], attention_levels=[False, False], num_head_channels=16),
        max_steps=3,
        batch_size=4,
        warmup_steps=1,
        latent={"autoencoder_dir": str(ae_snap)},
        progress=False,
        device="cpu",
    )
    return snap, record


def test_latent_snapshot_is_self_contained(latent_snapshot, autoencoder):
    snap, record = latent_snapshot
    cfg = json.loads((snap / "config.json").read_text())
    assert cfg["image_shape"] == [2, 8, 8]  # the UNet's sample shape is the latent's
    assert cfg["latent"]["image_shape"] == [1, 16, 16]
    assert cfg["latent"]["scale_factor"] == record["scale_factor"]
    assert (snap / "autoencoder.safetensors").read_bytes() == (
        autoencoder[0] / "autoencoder.safetensors"
    ).read_bytes()
    assert (snap.parent / f"preview-{cfg['step']:07d}.png").exists()


def test_latent_sampling_is_deterministic_per_seed(latent_snapshot, tmp_path):
    snap, _ = latent_snapshot
    kw = dict(pool="p", sampler="ddim", steps=3, guidance_scale=2.0, net_batch=2, progress=False)
    a = generate_pool(snap, tmp_path / "a", {"a": 3, "b": 2}, batch_size=5, device="cpu", **kw)
    b = generate_pool(snap, tmp_path / "b", {"a": 3, "b": 2}, batch_size=2, device="cpu", **kw)
    assert a["pool_images"] == b["pool_images"] == 5
    man_a = (tmp_path / "a" / "manifest.csv").read_text()
    assert man_a == (tmp_path / "b" / "manifest.csv").read_text()
    ds = pydicom.dcmread(tmp_path / "a" / "dicom" / "a" / "000000.dcm")
    assert (ds.Rows, ds.Columns) == (16, 16)  # decoded to the full resolution
    pix = [
        pydicom.dcmread(tmp_path / "a" / "dicom" / "a" / f"00000{i}.dcm").pixel_array
        for i in range(2)
    ]
    assert not np.array_equal(pix[0], pix[1])  # different seeds, different images


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["model.kind=monai_ldm", "dataset.spatial_size=34"], "divisible by the autoencoder"),
        (
            [
                "model.kind=monai_ldm",
                "dataset.spatial_size=32",
                "model.channels=[8,8,8,8,8]",
                "model.attention_levels=[false,false,false,false,false]",
            ],
            "latent side 8",
        ),
        (["model.kind=latent"], "monai_ldm"),
        (["model.kind=monai_ldm", "training.init_from=/tmp/x"], "cannot adapt a base"),
        (["model.autoencoder.channels=[12,16]"], "divisible by norm_num_groups"),
        (["model.autoencoder.patch_px=10"], "divisible by the downsampling 4"),
        (
            ["model.kind=monai_ldm", "dataset.spatial_size=32", "model.autoencoder.patch_px=64"],
            "larger than dataset.spatial_size 32",
        ),
    ],
)
def test_bad_latent_configs_fail_clearly(sets, match):
    with pytest.raises(ProtocolError, match=match):
        parse_protocol("dataset: {kind: phantoms}\n", sets)


def test_pixel_protocols_keep_their_hash():
    """The autoencoder settings of a pixel model are not part of its identity."""
    a = parse_protocol("dataset: {kind: phantoms}\n")
    b = parse_protocol("dataset: {kind: phantoms}\n", ["model.autoencoder.latent_channels=8"])
    c = parse_protocol("dataset: {kind: phantoms}\n", ["model.kind=monai_ldm"])
    assert a.sha256() == b.sha256() != c.sha256()
    assert "autoencoder" not in a.dump()["model"] and "upscaler" not in a.dump()


def test_knobs_added_later_keep_older_latent_protocols_hashes():
    """patch_px and chain_per_class at their old-behaviour value (None) are not in the identity."""
    text = "dataset: {kind: phantoms}\nmodel: {kind: monai_ldm}\nupscaler: {chain: true}\n"
    a = parse_protocol(text)
    assert "patch_px" not in a.identity()["model"]["autoencoder"]
    assert "chain_per_class" not in a.identity()["upscaler"]
    for knob in ("model.autoencoder.patch_px=16", "upscaler.chain_per_class=1"):
        assert parse_protocol(text, [knob]).sha256() != a.sha256()


def test_latent_study_trains_generates_and_chains_the_upscaler(tmp_path):
    """monai_ldm + upscaler chain through the runner (ingest, train, generate) on phantoms."""
    from medsynth.experiment.runner import run_protocol
    from medsynth.protocol import load_protocol
    from tests.conftest import REPO

    sets = [
        "model.kind=monai_ldm",
        "model.autoencoder={channels: [8, 16], latent_channels: 2, max_steps: 4, "
        "batch_size: 4, checkpoint_every_steps: 2}",
        "model.attention_levels=[false, false]",
        "training.max_steps=2",
        "generation.per_class=2",
        "upscaler={factor: 2, channels: [8, 16], patch_px: 8, tile_px: 16, overlap_px: 4, "
        "max_steps: 2, batch_size: 4, steps: 2, chain: true}",
    ]
    proto = load_protocol(REPO / "protocols" / "smoke.yaml", sets)
    log = []
    run_protocol(
        proto,
        stages=["ingest", "train", "generate"],
        run_dir=tmp_path,
        log=log.append,
        progress=False,
    )
    recon = json.loads((tmp_path / "autoencoder" / "recon.json").read_text())
    assert recon["split"] == "val" and recon["images"] > 0 and "psnr_db_mean" in recon
    snap = sorted((tmp_path / "train").glob("snapshot-*"))[-1]
    assert (snap / "autoencoder.safetensors").exists()
    low = pydicom.dcmread(tmp_path / "generate" / "main" / "dicom" / "normal" / "000000.dcm")
    high = pydicom.dcmread(tmp_path / "generate" / "main_x2" / "dicom" / "normal" / "000000.dcm")
    assert (low.Rows, high.Rows) == (16, 32)
    assert low.SOPInstanceUID != high.SOPInstanceUID
    assert "upscaled x2" in high.DerivationDescription
    # Phantoms carry no PixelSpacing: neither pool invents one, and both say why.
    assert "PixelSpacing" not in low and "PixelSpacing" not in high
    assert low.ImageComments == high.ImageComments
    assert "training images have no PixelSpacing" in low.ImageComments
    manifest = (tmp_path / "generate" / "main_x2" / "manifest.csv").read_text().splitlines()
    assert len(manifest) == 1 + 4
    assert any("upsampler" in line for line in log)
    compare = json.loads((tmp_path / "upscaler" / "compare.json").read_text())
    assert compare["images"] > 0 and compare["high_px"] == 16 and compare["low_px"] == 8
    for name in ("bicubic", "upsampler"):
        assert set(compare[name]) == {"psnr_db", "ssim", "fd_clf"}
    assert any("vs bicubic" in line for line in log)
    from medsynth.experiment.report import write_report

    page = write_report(tmp_path, proto).read_text()
    assert "Latent autoencoder" in page and "Diffusion upsampler" in page

    # The stand-alone command upscales the same pool into the same bytes (seed from the row).
    from typer.testing import CliRunner

    from medsynth.cli import app

    pool, other = tmp_path / "generate" / "main", tmp_path / "again"
    args = ["upscale", str(pool), "--snapshot", str(tmp_path), "--out", str(other)]
    res = CliRunner().invoke(app, [*args, "--tile-px", "16", "--overlap-px", "4", "--steps", "2"])
    assert res.exit_code == 0, res.output
    assert "upscaled 4" in res.output
    a = (tmp_path / "generate" / "main_x2" / "dicom" / "normal" / "000000.dcm").read_bytes()
    assert (other / "dicom" / "normal" / "000000.dcm").read_bytes() == a
    bad = CliRunner().invoke(app, [*args, "--tile-px", "16", "--overlap-px", "12"])
    assert bad.exit_code == 2 and "at most half" in bad.output

    # --per-class N upscales the first N of each class; a larger N adds, keeping what is there.
    part = tmp_path / "part"
    small = ["upscale", str(pool), "--snapshot", str(tmp_path), "--out", str(part)]
    small += ["--tile-px", "16", "--overlap-px", "4", "--steps", "2"]
    res = CliRunner().invoke(app, [*small, "--per-class", "1"])
    assert res.exit_code == 0 and "upscaled 2 " in res.output
    assert "0 already present, 0 missing" in res.output
    assert len((part / "manifest.csv").read_text().splitlines()) == 1 + 2
    res = CliRunner().invoke(app, [*small, "--per-class", "2"])
    assert res.exit_code == 0 and "upscaled 2 " in res.output
    assert "2 already present, 0 missing" in res.output
    assert (part / "dicom" / "normal" / "000000.dcm").read_bytes() == a

    # A rerun of generate with other inputs remakes the chained pool from the new pool (its
    # stale upscale from the old pool must not block the rerun nor be kept).
    import hashlib

    old_manifest = (tmp_path / "generate" / "main" / "manifest.csv").read_bytes()
    again = load_protocol(
        REPO / "protocols" / "smoke.yaml", [*sets, "generation.guidance_scale=1.5"]
    )
    run_protocol(again, stages=["generate"], run_dir=tmp_path, log=log.append, progress=False)
    new_manifest = (tmp_path / "generate" / "main" / "manifest.csv").read_bytes()
    request = json.loads((tmp_path / "generate" / "main_x2" / "request.json").read_text())
    assert request["source_manifest_sha256"] == hashlib.sha256(new_manifest).hexdigest()
    assert new_manifest != old_manifest  # the pool was made again (another guidance scale)

    # The chained pool has no stage marker of its own: show names it as upscaled, not stalled.
    from medsynth.experiment.runner import show

    assert "main_x2 4 images upscaled from main" in show(tmp_path)
