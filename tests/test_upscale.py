"""SR3-style upsampler on tiny sizes: tiling covers the image, the blend has no seams."""

from __future__ import annotations

import pytest
import torch

from medsynth.diffusion.schedule import ScheduleConfig, training_scheduler
from medsynth.diffusion.upsampler import (
    UpsamplerConfig,
    blend_tiles,
    tile_starts,
    upsample_bicubic,
    upscale,
)
from medsynth.protocol import ProtocolError, parse_protocol
from medsynth.training.upscaler import load_upsampler, train_upsampler


@pytest.mark.parametrize(("size", "tile", "overlap"), [(64, 16, 4), (48, 16, 8), (16, 16, 4)])
def test_tiles_cover_the_image_and_end_at_its_edge(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] == size - tile
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_overlap_blend_of_a_constant_image_is_constant():
    size, tile, overlap = 40, 16, 6
    pos = [
        (y, x) for y in tile_starts(size, tile, overlap) for x in tile_starts(size, tile, overlap)
    ]
    tiles = torch.full((len(pos), 1, tile, tile), 0.37)
    out = blend_tiles(tiles, pos, (size, size), overlap)
    assert out.shape == (1, size, size)
    assert torch.allclose(out, torch.full_like(out, 0.37), atol=1e-6)
    # Tiles that disagree blend into a smooth ramp (no step at a tile edge): neighbouring
    # pixels differ by less than the tiles' difference over the overlap width.
    tiles = torch.stack([torch.full((1, tile, tile), float(x > 0)) for _, x in pos])
    out = blend_tiles(tiles, pos, (size, size), overlap)
    assert (out[0, :, 1:] - out[0, :, :-1]).abs().max() < 0.5


class _Oracle(torch.nn.Module):
    """Predicts the noise that makes x0 equal the condition (epsilon prediction).

    Tiled sampling with this network must return the bicubic condition exactly, whatever the
    image: any seam, misplaced crop or unnormalised blend would show.
    """

    def __init__(self, cfg: ScheduleConfig) -> None:
        super().__init__()
        self.acp = training_scheduler(cfg).alphas_cumprod
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, timesteps, class_labels):
        noisy, cond = x[:, :1], x[:, 1:]
        a = self.acp[timesteps].view(-1, 1, 1, 1).to(x.dtype)
        return (noisy - a.sqrt() * cond) / (1 - a).sqrt()


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp"])
def test_tiled_upscaling_has_no_seams(sampler):
    cfg = ScheduleConfig(prediction_type="epsilon")
    g = torch.Generator().manual_seed(0)
    low = torch.rand(1, 10, 12, generator=g) * 2 - 1
    kw = dict(factor=4, tile=16, overlap=4, sampler=sampler, steps=5, net_batch=3)
    out = upscale(_Oracle(cfg), cfg, low, seed=7, **kw)
    want = upsample_bicubic(low[None], 4)[0]
    assert out.shape == (1, 40, 48)
    assert torch.allclose(out, want, atol=2e-3), (out - want).abs().max()
    const = upscale(_Oracle(cfg), cfg, torch.full((1, 8, 8), -0.25), seed=3, **kw)
    assert torch.allclose(const, torch.full_like(const, -0.25), atol=2e-3)


def test_upsampler_trains_resumes_and_upscales_per_seed(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 32, 32, generator=g) * 2 - 1
    kw = dict(
        config=UpsamplerConfig(channels=[8, 16]),
        patch_px=16,
        batch_size=4,
        checkpoint_every_steps=2,
        progress=False,
        device="cpu",
    )
    whole = train_upsampler(images, tmp_path / "a", max_steps=4, **kw)
    train_upsampler(images, tmp_path / "b", max_steps=2, **kw)
    resumed = train_upsampler(images, tmp_path / "b", max_steps=4, **kw)
    assert (whole / "ema.safetensors").read_bytes() == (resumed / "ema.safetensors").read_bytes()
    model, sched, _ = load_upsampler(whole)
    low = images[0, :, ::4, ::4]
    a = upscale(model, sched, low, seed=5, tile=16, overlap=4, steps=3, net_batch=2)
    b = upscale(model, sched, low, seed=5, tile=16, overlap=4, steps=3, net_batch=2)
    c = upscale(model, sched, low, seed=6, tile=16, overlap=4, steps=3, net_batch=2)
    assert a.shape == (1, 32, 32) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_bad_upscaler_configs_fail_clearly(tmp_path):
    with pytest.raises(ProtocolError, match="overlap_px 40 must be at most half"):
        parse_protocol("dataset: {kind: phantoms}\nupscaler: {tile_px: 64, overlap_px: 40}\n")
    with pytest.raises(ProtocolError, match="tile_px 62 must be divisible by 4"):
        parse_protocol("dataset: {kind: phantoms}\nupscaler: {tile_px: 62}\n")
    with pytest.raises(ValueError, match="patch_px 64 must be at most the image side 32"):
        train_upsampler(torch.zeros(2, 1, 32, 32), tmp_path, patch_px=64, progress=False)
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "config.json").write_text('{"unet": {}}')
    with pytest.raises(ValueError, match="not an upsampler snapshot"):
        load_upsampler(tmp_path / "snap")
