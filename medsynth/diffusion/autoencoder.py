"""The latent space: MONAI's AutoencoderKL, its training loss and reconstruction metrics.

Pure torch/MONAI (no file I/O). The loss is L1 + SSIM + KL only: no perceptual loss, because
every perceptual network needs downloaded weights. Latents used for diffusion are the
deterministic posterior means times a scale factor computed on the training data
(``1 / std``), so the diffusion model sees roughly unit-variance inputs whatever the
autoencoder learned (Rombach et al. 2022 compute it the same way; it is never assumed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL


@dataclass
class AutoencoderConfig:
    """Everything needed to rebuild the autoencoder (saved as JSON beside its weights)."""

    in_channels: int = 1
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # one level per entry
    latent_channels: int = 4
    num_res_blocks: int = 1
    norm_num_groups: int = 8
    attention: bool = False  # non-local attention in the bottleneck (memory grows with H*W)

    @property
    def downsample(self) -> int:
        """Side of the image per latent pixel: ``2 ** (len(channels) - 1)``."""
        return 2 ** (len(self.channels) - 1)

    def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """``(C, H, W)`` image -> ``(latent_channels, H / f, W / f)``."""
        c, h, w = image_shape
        f = self.downsample
        if h % f or w % f:
            raise ValueError(
                f"image side {h}x{w} is not divisible by the autoencoder's downsampling {f} "
                f"(2 ** (len(channels) - 1) with channels {self.channels})"
            )
        return (self.latent_channels, h // f, w // f)

    def to_dict(self) -> dict:
        return asdict(self)


def build_autoencoder(cfg: AutoencoderConfig) -> AutoencoderKL:
    """A 2-D AutoencoderKL: ``(B, C, H, W)`` in [-1, 1] -> latents ``(B, L, H/f, W/f)``."""
    n = len(cfg.channels)
    return AutoencoderKL(
        spatial_dims=2,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        channels=tuple(cfg.channels),
        attention_levels=(False,) * n,
        latent_channels=cfg.latent_channels,
        num_res_blocks=cfg.num_res_blocks,
        norm_num_groups=cfg.norm_num_groups,
        with_encoder_nonlocal_attn=cfg.attention,
        with_decoder_nonlocal_attn=cfg.attention,
    )


def _ssim_loss(spatial_side: int):
    from monai.losses import SSIMLoss

    # data_range 2: images live in [-1, 1]; a small window keeps SSIM defined on tiny images.
    return SSIMLoss(spatial_dims=2, data_range=2.0, win_size=min(7, spatial_side))


def autoencoder_loss(
    ae: AutoencoderKL,
    images: torch.Tensor,
    *,
    ssim_weight: float = 0.5,
    kl_weight: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss ``L1 + ssim_weight * (1 - SSIM) + kl_weight * KL`` and its parts.

    ``images``: ``(B, C, H, W)`` in [-1, 1]. KL is the closed form of the diagonal Gaussian
    posterior against N(0, I), summed over latent elements and averaged over the batch.
    """
    recon, mu, sigma = ae(images)
    recon = recon.float()
    l1 = F.l1_loss(recon, images)
    ssim = _ssim_loss(images.shape[-1])(recon, images)
    var = sigma.float().pow(2)
    kl = 0.5 * (mu.float().pow(2) + var - torch.log(var.clamp(min=1e-12)) - 1)
    kl = kl.flatten(1).sum(1).mean()
    loss = l1 + ssim_weight * ssim + kl_weight * kl
    parts = {"l1": l1.item(), "ssim_loss": ssim.item(), "kl": kl.item()}
    return loss, parts


@torch.no_grad()
def encode_means(ae: AutoencoderKL, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Deterministic latents (posterior means), ``(N, L, H/f, W/f)`` float32, unscaled.

    Encoded ``batch`` images at a time, so peak memory is bounded by the batch, not ``N``.
    """
    was = ae.training
    ae.eval()
    dev = next(ae.parameters()).device
    try:
        return torch.cat(
            [
                ae.encode(images[i : i + batch].to(dev).float())[0].cpu()
                for i in range(0, len(images), batch)
            ]
        )
    finally:
        ae.train(was)


@torch.no_grad()
def decode(ae: AutoencoderKL, latents: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Unscaled latents ``(N, L, h, w)`` -> images ``(N, C, h*f, w*f)`` clamped to [-1, 1]."""
    was = ae.training
    ae.eval()
    dev = next(ae.parameters()).device
    try:
        out = [
            ae.decode(latents[i : i + batch].to(dev).float()).float().cpu()
            for i in range(0, len(latents), batch)
        ]
        return torch.cat(out).clamp(-1, 1)
    finally:
        ae.train(was)


def scale_factor(latents: torch.Tensor) -> float:
    """``1 / std`` of latents ``(N, L, h, w)`` over every element (the LDM convention)."""
    std = float(latents.float().std())
    if not std > 0:
        raise ValueError("latents have zero spread; the autoencoder has collapsed (retrain it)")
    return 1.0 / std


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of ``(N, C, H, W)`` images in [-1, 1] (peak-to-peak range 2)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1).clamp(min=1e-12)
    return 10 * torch.log10(4.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of ``(N, C, H, W)`` images in [-1, 1] (Gaussian window, up to 7 px)."""
    from monai.metrics import SSIMMetric

    metric = SSIMMetric(spatial_dims=2, data_range=2.0, win_size=min(7, a.shape[-1]))
    return metric(a.float(), b.float()).flatten()
