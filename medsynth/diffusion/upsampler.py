"""SR3-style diffusion upsampler: the low-resolution image, upsampled, is concatenated to the input.

Pure torch/MONAI. The network is a MONAI DiffusionModelUNet with ``2 C`` input channels (noisy
high-resolution image + bicubic-upsampled condition) and ``C`` outputs, unconditional on class
(one embedding, the null class). Sampling is tiled: the image is covered by ``tile`` px tiles
overlapping by ``overlap`` px, each tile is denoised from its crop of ONE full-size noise draw
and its crop of the condition, and tiles are blended with weights that ramp down in the overlap
and are normalised to sum to one at every pixel. So memory is bounded by the tile, a constant
image stays constant, and neighbours agree in the overlap because they start from the same noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet

from medsynth.diffusion.objective import draw
from medsynth.diffusion.sampler import StackedNoise, sample
from medsynth.diffusion.schedule import ScheduleConfig


@dataclass
class UpsamplerConfig:
    """Everything needed to rebuild the upsampler (saved as JSON beside its weights)."""

    in_channels: int = 1  # image channels C (the network sees 2 C)
    factor: int = 4
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    num_res_blocks: int = 1
    norm_num_groups: int = 8

    def to_dict(self) -> dict:
        return asdict(self)


def build_upsampler(cfg: UpsamplerConfig) -> DiffusionModelUNet:
    """``(B, 2C, H, W)`` (noisy image, condition) + timesteps -> ``(B, C, H, W)`` prediction."""
    return DiffusionModelUNet(
        spatial_dims=2,
        in_channels=2 * cfg.in_channels,
        out_channels=cfg.in_channels,
        channels=tuple(cfg.channels),
        # No attention in the levels; MONAI's mid block always attends, over one tile's
        # bottleneck only ((tile / 2 ** (levels - 1)) ** 2 tokens), so memory stays per tile.
        attention_levels=(False,) * len(cfg.channels),
        num_res_blocks=cfg.num_res_blocks,
        norm_num_groups=cfg.norm_num_groups,
        num_class_embeds=1,
    )


def downsample(images: torch.Tensor, factor: int) -> torch.Tensor:
    """``(N, C, H, W)`` -> ``(N, C, H/f, W/f)`` by area averaging (the degradation learned)."""
    return F.avg_pool2d(images.float(), factor)


def upsample_bicubic(low: torch.Tensor, factor: int) -> torch.Tensor:
    """``(N, C, h, w)`` -> ``(N, C, h*f, w*f)`` bicubic, clamped to [-1, 1] (the condition)."""
    up = F.interpolate(low.float(), scale_factor=factor, mode="bicubic", align_corners=False)
    return up.clamp(-1, 1)


def upsampler_loss(
    model: torch.nn.Module,
    scheduler,
    cfg: ScheduleConfig,
    high: torch.Tensor,
    factor: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """MSE of the model's prediction for high-resolution crops ``(B, C, H, W)`` in [-1, 1].

    The condition is made from ``high`` itself (area-downsampled, bicubic-upsampled), so any
    training image is a training pair. Targets as in :func:`diffusion_loss` (epsilon or v).
    """
    cond = upsample_bicubic(downsample(high, factor), factor)
    d = draw(tuple(high.shape), cfg.num_train_timesteps, 0.0, generator)
    noisy = scheduler.add_noise(original_samples=high, noise=d.noise, timesteps=d.timesteps)
    if cfg.prediction_type == "v_prediction":
        target = scheduler.get_velocity(high, d.noise, d.timesteps)
    else:
        target = d.noise
    labels = torch.zeros(len(high), dtype=torch.long)
    pred = model(torch.cat([noisy, cond], 1), timesteps=d.timesteps, class_labels=labels)
    return F.mse_loss(pred.float(), target.float())


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering ``[0, size)``; the last tile ends exactly at ``size``."""
    if tile >= size:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return sorted(set(starts))


def blend_window(tile: int, overlap: int) -> torch.Tensor:
    """``(tile, tile)`` weights: 1 inside, a linear ramp over ``overlap`` px at every edge.

    The ramp never reaches 0 (it starts at 1 / (overlap + 1)), so image borders that only one
    tile covers keep a positive weight; the blend divides by the summed weights.
    """
    ramp = torch.ones(tile)
    if overlap > 0:
        r = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        ramp[:overlap] = r
        ramp[-overlap:] = torch.minimum(ramp[-overlap:], r.flip(0))
    return ramp[:, None] * ramp[None, :]


def blend_tiles(
    tiles: torch.Tensor, positions: list[tuple[int, int]], size: tuple[int, int], overlap: int
) -> torch.Tensor:
    """Tiles ``(T, C, t, t)`` at ``positions`` (top, left) -> image ``(C, H, W)``.

    A weighted mean at every pixel (weights :func:`blend_window`): constant tiles give the same
    constant image, with no seam.
    """
    c, t = tiles.shape[1], tiles.shape[-1]
    w = blend_window(t, overlap)
    acc = torch.zeros((c, *size))
    norm = torch.zeros(size)
    for tile, (y, x) in zip(tiles, positions, strict=True):
        acc[:, y : y + t, x : x + t] += tile * w
        norm[y : y + t, x : x + t] += w
    return acc / norm


def _crop(a: torch.Tensor, positions: list[tuple[int, int]], t: int) -> torch.Tensor:
    """``(C, H, W)`` -> ``(len(positions), C, t, t)`` crops at (top, left) positions."""
    return torch.stack([a[:, y : y + t, x : x + t] for y, x in positions])


@torch.no_grad()
def upscale(
    model: torch.nn.Module,
    cfg: ScheduleConfig,
    low: torch.Tensor,
    seed: int,
    *,
    factor: int = 4,
    tile: int = 64,
    overlap: int = 16,
    sampler: str = "dpmpp",
    steps: int = 10,
    net_batch: int = 4,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One image ``(C, h, w)`` in [-1, 1] -> ``(C, h*f, w*f)`` in [-1, 1], tile by tile.

    ``seed`` names the result: the full-size starting noise is drawn from it once and each
    tile takes its crop (tile k's later stochastic draws use seed + k). ``tile``/``overlap``
    in px at the high resolution. Peak network memory is that of ``net_batch`` tiles.
    """
    c, h, w = low.shape
    H, W = h * factor, w * factor
    cond = upsample_bicubic(low[None], factor)[0]
    t = min(tile, H, W)
    if min(H, W) < tile and (H != W):
        raise ValueError(f"image {H}x{W} is smaller than the tile {tile} on one side only")
    noise = StackedNoise([seed]).randn((c, H, W))[0]
    pos = [(y, x) for y in tile_starts(H, t, overlap) for x in tile_starts(W, t, overlap)]
    out = []
    for i in range(0, len(pos), net_batch):
        chunk = pos[i : i + net_batch]
        out.append(
            sample(
                model,
                cfg,
                [0] * len(chunk),
                [seed + i + k for k in range(len(chunk))],
                image_shape=(c, t, t),
                null_label=0,
                sampler=sampler,
                steps=steps,
                guidance_scale=1.0,
                device=device,
                net_batch=net_batch,
                cond=_crop(cond, chunk, t),
                x_init=_crop(noise, chunk, t),
            ).cpu()
        )
    return blend_tiles(torch.cat(out), pos, (H, W), overlap).clamp(-1, 1)
