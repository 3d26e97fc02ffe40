"""The denoiser: MONAI's DiffusionModelUNet, class-conditional through a class embedding.

Class index ``num_classes`` is the null class used for classifier-free guidance, so the network
has ``num_class_embeds = num_classes + 1``. Defaults are sized for 28-64 px on a CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from monai.networks.nets import DiffusionModelUNet


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

    def to_dict(self) -> dict:
        return asdict(self)


def build_unet(cfg: UNetConfig) -> DiffusionModelUNet:
    """A 2-D MONAI UNet: ``(B, C, H, W)``, timesteps ``(B,)`` long, labels ``(B,)`` long."""
    return DiffusionModelUNet(
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


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
