"""Latent diffusion glue: images -> scaled latents for training, latents -> images for sampling.

A latent model's snapshot holds ``config.json`` with a ``latent`` record (scale factor, decoded
image shape, autoencoder settings and hash) and a copy of ``autoencoder.safetensors``, so
:func:`snapshot_decoder` decodes from the snapshot folder alone (DESIGN rule 3).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from medsynth.diffusion.autoencoder import (
    AutoencoderConfig,
    build_autoencoder,
    decode,
    encode_means,
)

WEIGHTS = "autoencoder.safetensors"


def latent_record(latent: dict) -> dict:
    """What a latent UNet's ``config.json`` records about its latent space.

    ``latent``: ``autoencoder_dir`` (an autoencoder snapshot); the scale factor is read from
    that snapshot (computed on the training images when it was written), never assumed.
    """
    ae_dir = Path(latent["autoencoder_dir"])
    cfg = json.loads((ae_dir / "config.json").read_text())
    return {
        "scale_factor": float(cfg["scale_factor"]),
        "image_shape": list(cfg["image_shape"]),
        "autoencoder": cfg["autoencoder"],
        "autoencoder_sha256": hashlib.sha256((ae_dir / WEIGHTS).read_bytes()).hexdigest(),
    }


def _load(weights: Path, record: dict, device) -> torch.nn.Module:
    ae = build_autoencoder(AutoencoderConfig(**record["autoencoder"]))
    ae.load_state_dict(load_file(weights))
    return ae.to(device).eval()


def encode_training_set(
    autoencoder_dir: str | Path, images: torch.Tensor, device="cpu", batch: int = 16
) -> tuple[torch.Tensor, dict]:
    """Images ``(N, C, H, W)`` in [-1, 1] -> scaled latents ``(N, L, H/f, W/f)`` and the record.

    Latents are the posterior means times ``scale_factor`` (about unit std on training data).
    """
    record = latent_record({"autoencoder_dir": autoencoder_dir})
    ae = _load(Path(autoencoder_dir) / WEIGHTS, record, device)
    return encode_means(ae, images, batch) * record["scale_factor"], record


def latent_decoder(
    autoencoder_dir: Path, record: dict, device="cpu", batch: int = 1
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function: scaled latents ``(B, L, h, w)`` -> images ``(B, C, H, W)`` in [-1, 1].

    One image per decoder call by default: CPU kernels may round differently for other batch
    sizes, and sample k must not depend on its batch; it also bounds memory at full size.
    """
    ae = _load(Path(autoencoder_dir) / WEIGHTS, record, device)
    scale = float(record["scale_factor"])
    return lambda z: decode(ae, z / scale, batch)


def snapshot_decoder(snapshot_dir: str | Path, config: dict, device="cpu"):
    """The decoder of a latent UNet snapshot (None for a pixel model)."""
    if "latent" not in config:
        return None
    path = Path(snapshot_dir) / WEIGHTS
    if not path.exists():
        raise FileNotFoundError(
            f"{snapshot_dir} is a latent model but holds no {WEIGHTS}; the snapshot is incomplete"
        )
    return latent_decoder(Path(snapshot_dir), config["latent"], device)
