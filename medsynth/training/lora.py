"""Low-rank adapters (LoRA) for MONAI's DiffusionModelUNet, in plain torch.

Why our own module and not peft: peft is not installed in this environment, and even where it
is, its ``target_modules`` match ``nn.Linear``/``nn.Conv2d`` by name inside MONAI's
``Convolution`` wrappers, its ``save_pretrained`` writes a diffusers/transformers-shaped folder
(adapter_config.json keyed by a ``base_model_name_or_path``), and merging goes through its
``PeftModel`` class. We need ~100 lines: wrap chosen layers, keep the base frozen, save only the
adapter tensors next to our own ``config.json``, and merge into a plain UNet that
:func:`medsynth.diffusion.unet.build_unet` can rebuild. A wrapped layer computes

    y = base(x) + (alpha / rank) * B(A(x))

(computed as one layer call with the weight ``W + (alpha / rank) * B A``), with ``A``
initialised like a layer (Kaiming uniform) and ``B`` zero, so a fresh adapter leaves the base's
output unchanged. For a ``Conv2d`` base, ``A`` is a conv with the base's kernel,
stride and padding into ``rank`` channels and ``B`` a 1x1 conv back out, so the product is again
one ``Conv2d`` kernel and merges exactly (up to float rounding).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# LoRA target group -> suffixes of module names inside MONAI's DiffusionModelUNet (1.6).
TARGET_SUFFIXES = {
    "attention": ("attn.to_q", "attn.to_k", "attn.to_v", "attn.out_proj"),
    "conv": ("conv1.conv", "conv2.conv"),
    "time": ("time_emb_proj",),
}
ADAPTER_KEY = "lora_"  # every adapter tensor's state-dict key contains this


class LoRALayer(nn.Module):
    """A frozen ``nn.Linear`` or ``nn.Conv2d`` (groups 1) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        if isinstance(base, nn.Linear):
            self.lora_A = nn.Linear(base.in_features, rank, bias=False)
            self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d) and base.groups == 1:
            self.lora_A = nn.Conv2d(
                base.in_channels,
                rank,
                base.kernel_size,
                base.stride,
                base.padding,
                base.dilation,
                bias=False,
            )
            self.lora_B = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA supports nn.Linear and nn.Conv2d (groups=1), not {base}")
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(base.weight), self.lora_B.to(base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One call with the updated weight rather than base(x) + B(A(x)): at these layer sizes the
        # (out x in x k x k) weight is far smaller than the activations, so forming W + scale*BA
        # costs less than two extra convolutions (measured: benchmarks/adapt.py).
        weight = self.base.weight + self.delta_weight()
        if isinstance(self.base, nn.Linear):
            return F.linear(x, weight, self.base.bias)
        return self.base._conv_forward(x, weight, self.base.bias)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B A`` in the base weight's shape."""
        a, b = self.lora_A.weight, self.lora_B.weight
        if isinstance(self.base, nn.Linear):
            return self.scale * b @ a
        # (out, r, 1, 1) x (r, in, kh, kw) -> (out, in, kh, kw)
        return self.scale * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base layer with the update added to its weight (a plain, trainable layer)."""
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        return self.base.requires_grad_(True)


def _targets(model: nn.Module, targets: list[str]) -> list[str]:
    unknown = sorted(set(targets) - set(TARGET_SUFFIXES))
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; valid: {', '.join(TARGET_SUFFIXES)}")
    suffixes = tuple(s for t in targets for s in TARGET_SUFFIXES[t])
    return [
        name
        for name, mod in model.named_modules()
        if name.endswith(suffixes) and isinstance(mod, nn.Linear | nn.Conv2d)
    ]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def inject_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> list[str]:
    """Freeze ``model`` and wrap the target layers in :class:`LoRALayer`; return their names.

    Only the adapters (and whatever the caller unfreezes afterwards) then require grad.
    """
    model.requires_grad_(False)
    names = _targets(model, targets)
    if not names:
        raise ValueError(f"LoRA targets {targets} match no layer of this network")
    for name in names:
        _set(model, name, LoRALayer(model.get_submodule(name), rank, alpha))
    return names


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer, in place; the result has the base's state keys."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoRALayer):
            _set(model, name, mod.merged())
    return model


def is_adapter_key(key: str) -> bool:
    return ADAPTER_KEY in key
