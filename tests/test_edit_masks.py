"""Editing loops (RePaint, SDEdit) on a tiny random UNet, and mask handling: box scaling,
out-of-bounds boxes, empty masks, mask/image size mismatch."""

import warnings

import numpy as np
import pytest
import torch

from medsynth.diffusion.edit import repaint, repaint_schedule, sdedit
from medsynth.diffusion.schedule import ScheduleConfig
from medsynth.diffusion.unet import UNetConfig, build_unet
from medsynth.generation.masks import (
    Box,
    MaskError,
    MaskSource,
    box_mask,
    png_mask,
    read_box_table,
    rect_mask,
)

CFG = ScheduleConfig(num_train_timesteps=100)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_unet(
        UNetConfig(channels=[16, 32], attention_levels=[False, False], num_head_channels=16)
    )
    # A fresh MONAI UNet outputs exactly zero (zero-initialised output conv): perturb it.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def _sources(n=3, size=16):
    g = torch.Generator().manual_seed(1)
    return torch.rand((n, 1, size, size), generator=g) * 2 - 1


def test_repaint_schedule_denoises_each_level_resamplings_times():
    ts = repaint_schedule(20, 5, 3)
    assert ts[0] == 19 and ts[-1] == -1
    downs = sum(b < a for a, b in zip(ts, ts[1:], strict=False))
    ups = sum(b > a for a, b in zip(ts, ts[1:], strict=False))
    assert ups == 3 * 2 * 5  # three jump points below 15, two extra passes, 5 levels each
    assert downs == 20 + ups
    assert repaint_schedule(4, 1, 1) == [3, 2, 1, 0, -1]


def test_repaint_keeps_outside_and_is_per_sample(model):
    src = _sources()
    mask = torch.zeros((3, 1, 16, 16))
    mask[:, :, 4:10, 3:12] = 1
    kw = dict(null_label=2, steps=8, jump_length=2, resamplings=2, net_batch=4)
    out = repaint(model, CFG, src, mask, [1, 0, 1], [11, 12, 13], **kw)
    assert out.shape == src.shape
    outside = mask == 0
    assert torch.equal(out[outside], src.clamp(-1, 1)[outside])
    assert (out[mask.bool()] - src[mask.bool()]).abs().mean() > 0.05  # the inside changed
    # Edit 1 alone (another batch) is the same image: per-sample noise, fixed network call size.
    one = repaint(model, CFG, src[1:2], mask[1:2], [0], [12], **kw)
    assert torch.equal(one[0], out[1])
    other_seed = repaint(model, CFG, src[1:2], mask[1:2], [0], [99], **kw)
    assert not torch.equal(other_seed[0], out[1])


def test_sdedit_strength_and_determinism(model):
    src = _sources()
    weak = sdedit(model, CFG, src, [0, 1, 0], [1, 2, 3], strength=0.1, null_label=2, steps=10)
    strong = sdedit(model, CFG, src, [0, 1, 0], [1, 2, 3], strength=1.0, null_label=2, steps=10)
    d_weak, d_strong = (weak - src).abs().mean(), (strong - src).abs().mean()
    assert d_weak < d_strong
    again = sdedit(model, CFG, src[2:], [0], [3], strength=0.1, null_label=2, steps=10)
    assert torch.equal(again[0], weak[2])
    with pytest.raises(ValueError, match="strength"):
        sdedit(model, CFG, src, [0, 1, 0], [1, 2, 3], strength=0.0, null_label=2)
    with pytest.raises(ValueError, match="variance-preserving"):
        sdedit(
            model, ScheduleConfig(kind="rflow"), src, [0] * 3, [1] * 3, strength=0.5, null_label=2
        )


def test_box_scaled_from_original_pixels():
    # A 1024 x 1024 image at 64 px: scale 1/16. Box x 256..512, y 128..384 -> cols 16..32.
    m = box_mask([Box(256, 128, 256, 256)], (1024, 1024), 64)
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (8, 23, 16, 31)
    # Pad geometry: a 100 x 200 (h x w) image at 20 px is 10 x 20, padded 5 rows on top.
    m = box_mask([Box(0, 0, 10, 10)], (100, 200), 20)
    assert m[5, 0] == 1 and m[4, 0] == 0 and m.sum() == 1


def test_out_of_bounds_box_clipped_with_warning_and_empty_is_error():
    with pytest.warns(UserWarning, match="outside the 1024x1024 image; clipped"):
        m = box_mask([Box(900, 900, 300, 300)], (1024, 1024), 64)
    assert m[-1, -1] == 1 and m.sum() == 8 * 8
    with pytest.raises(MaskError, match="empty"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        box_mask([Box(2000, 10, 50, 50)], (1024, 1024), 64, where="box table t.csv")
    with pytest.raises(MaskError, match="empty"):
        box_mask([Box(10, 10, 0, 50)], (1024, 1024), 64)
    with pytest.warns(UserWarning, match="clipped"):
        assert rect_mask("10,10,40,40", 16).sum() == 6 * 6
    with pytest.raises(MaskError, match="empty"):
        rect_mask("4,4,4,9", 16)
    with pytest.raises(MaskError, match="x0,y0,x1,y1"):
        rect_mask("1,2,3", 16)


def test_png_mask_size_mismatch_and_empty_name_the_file(tmp_path):
    from PIL import Image

    good = np.zeros((16, 16), np.uint8)
    good[2:5, 3:9] = 255
    Image.fromarray(good).save(tmp_path / "ok.png")
    assert png_mask(tmp_path / "ok.png", 16).sum() == 18
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(tmp_path / "big.png")
    with pytest.raises(MaskError, match=r"big\.png is 32x32 pixels but the model works at 16x16"):
        png_mask(tmp_path / "big.png", 16)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "blank.png")
    with pytest.raises(MaskError, match=r"blank\.png is empty"):
        png_mask(tmp_path / "blank.png", 16)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(MaskError, match=r"junk\.png is not a readable image"):
        png_mask(tmp_path / "junk.png", 16)


def test_box_table_columns_and_borrowed_boxes(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,x,y\na,1,2\n")
    with pytest.raises(MaskError, match=r"bad\.csv lacks columns \['width', 'height'\]"):
        read_box_table(bad, "id")
    table = tmp_path / "boxes.csv"
    table.write_text("pid,x,y,width,height\nP1,0,0,512,512\nP1,512,512,100,100\n")
    src = MaskSource(f"boxes:{table}", 16, key_column="pid")
    rows = [
        {"row": "3", "PatientID": "P1", "Rows": "1024", "Columns": "1024"},
        {"row": "8", "PatientID": "P2", "Rows": "1024", "Columns": "1024"},
    ]
    got = src.for_rows(rows, "PatientID")
    assert got[3][1] == "boxes:own:2" and got[8][1] == "boxes:from-row-3:2"
    assert np.array_equal(got[3][0], got[8][0]) and got[3][0][:8, :8].all()
    assert "P1" not in got[8][1]  # descriptions name cache rows, never identifiers
    with pytest.raises(MaskError, match="none of the 1 source images has a box"):
        src.for_rows(rows[1:], "PatientID")
