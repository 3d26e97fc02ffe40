"""The denoiser: MONAI's DiffusionModelUNet, class-conditional through a class embedding.

Class index ``num_classes`` is the null class used for classifier-free guidance, so the network
has ``num_class_embeds = num_classes + 1``. Defaults are sized for 28-64 px on a CPU.

The class embedding is summed with the time embedding into one vector per image, which every
residual block turns into per-channel terms. ``embedding_injection`` says how they enter:
``add`` (MONAI's block: a bias added before the second GroupNorm, which removes each group's
mean of it) or ``scale_shift`` (ADM's AdaGN, Dhariwal & Nichol 2021: ``norm(h) * (1 + s) + b``
after that norm, so the condition can rescale features, not only shift them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock


@dataclass
class UNetConfig:
    """Everything needed to rebuild the network (saved as JSON beside its weights)."""

    num_classes: int = 2  # real classes; the null class is added on top
    in_channels: int = 1
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    attention_levels: list[bool] = field(default_factory=lambda: [False, False, True])
    num_res_blocks: int = 1
    num_head_channels: int = 32
    norm_num_groups: int = 8
    embedding_injection: Literal["add", "scale_shift"] = "add"

    def to_dict(self) -> dict:
        """Plain data; ``embedding_injection`` only off ``add``, so configs (and the snapshot
        hashes over them) written before it existed stay as they were."""
        data = asdict(self)
        if data["embedding_injection"] == "add":
            del data["embedding_injection"]
        return data


class ScaleShiftResnetBlock(DiffusionUNetResnetBlock):
    """MONAI's residual block with the embedding applied as AdaGN after ``norm2``.

    ``time_emb_proj`` maps the embedding to ``2 * out_channels``: a scale ``s`` and a shift
    ``b``, applied as ``norm2(h) * (1 + s) + b`` (``s = b = 0`` is the plain block without a
    condition). ``x``: ``(B, C, H, W)``; ``emb``: ``(B, E)``.
    """

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.nonlinearity(self.norm1(x))
        if self.upsample is not None:
            x, h = self.upsample(x), self.upsample(h)
        elif self.downsample is not None:
            x, h = self.downsample(x), self.downsample(h)
        h = self.conv1(h)
        scale, shift = self.time_emb_proj(self.nonlinearity(emb))[:, :, None, None].chunk(2, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.nonlinearity(h))
        return self.skip_connection(x) + h


def _use_scale_shift(model: DiffusionModelUNet) -> None:
    """Turn every residual block of ``model`` into a :class:`ScaleShiftResnetBlock` in place.

    Only ``time_emb_proj`` changes shape (to ``2 * out_channels``, freshly initialised); the
    other weights are the block's own, so the class swap keeps every module name.
    """
    for block in model.modules():
        if type(block) is DiffusionUNetResnetBlock:
            proj = block.time_emb_proj
            block.time_emb_proj = torch.nn.Linear(proj.in_features, 2 * proj.out_features)
            block.__class__ = ScaleShiftResnetBlock


def build_unet(cfg: UNetConfig) -> DiffusionModelUNet:
    """A 2-D MONAI UNet: ``(B, C, H, W)``, timesteps ``(B,)`` long, labels ``(B,)`` long."""
    model = DiffusionModelUNet(
        spatial_dims=2,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        channels=tuple(cfg.channels),
        attention_levels=tuple(cfg.attention_levels),
        num_res_blocks=cfg.num_res_blocks,
        num_head_channels=cfg.num_head_channels,
        norm_num_groups=cfg.norm_num_groups,
        num_class_embeds=cfg.num_classes + 1,
    )
    if cfg.embedding_injection == "scale_shift":
        _use_scale_shift(model)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
