"""The ``edit:`` protocol section: inpainting and SDEdit variations of real training images.

Kept beside ``protocol.py`` (which imports it) so that file stays under the size the house rules
ask for. Knob names are the keyword arguments of ``medsynth.diffusion.edit`` and
``medsynth.generation.edit``.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MASK_PATTERN = re.compile(r"^(boxes|png|rect):(.+)$")

# A stage's arithmetic precision; shared with protocol.py (which imports this module).
Precision = Literal["auto", "fp32", "bf16"]


def precision_field(default: str) -> Any:
    """The ``precision`` key of a stage section, with its help text."""
    return Field(
        default, description="auto = bf16 autocast where the CPU/GPU has native bf16, else fp32"
    )


class _EditBase(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True, validate_default=True)


class InpaintSettings(_EditBase):
    """``medsynth edit inpaint``: RePaint inside a mask, the rest of the source kept exactly."""

    pool: str = Field("inpaint", pattern=r"^[A-Za-z0-9_.-]+$", description="pool folder name")
    mask: str | None = Field(
        None,
        description="boxes:TABLE.csv (x, y, width, height in original pixels), png:FILE.png "
        "(spatial_size square, nonzero = edit) or rect:x0,y0,x1,y1 (model pixels, end exclusive)",
    )
    box_key_column: str | None = Field(
        None, description="box table column holding the join key (default dataset.join_column)"
    )
    to_class: str = Field("other", description="same | other (two classes) | a class name")
    jump_length: int = Field(10, ge=1, description="RePaint j: levels per jump back")
    resamplings: int = Field(5, ge=1, description="RePaint r: passes per jump (1 = none)")

    @field_validator("mask")
    @classmethod
    def _mask(cls, v: str | None) -> str | None:
        if v is not None and not MASK_PATTERN.match(v):
            raise ValueError(
                f"mask {v!r} is not boxes:PATH, png:PATH or rect:x0,y0,x1,y1 (model pixels)"
            )
        return v


class VarySettings(_EditBase):
    """``medsynth edit vary``: SDEdit variations (same class) or counterfactuals (another)."""

    pool: str = Field("vary", pattern=r"^[A-Za-z0-9_.-]+$", description="pool folder name")
    strength: float = Field(0.5, gt=0, le=1, description="SDEdit s: noise level / T")
    to_class: str = Field("same", description="same | other (two classes) | a class name")


class EditSection(_EditBase):
    """Which training images to edit, and how to sample; one subsection per edit command."""

    source_classes: list[str] = Field(
        default_factory=list, description="classes whose train images are edited (empty: all)"
    )
    max_sources: int | None = Field(
        None, ge=1, description="at most this many sources (a seeded subset of the train split)"
    )
    per_source: int = Field(1, ge=1, description="edits (seeds) per source image")
    steps: int = Field(50, ge=1, description="denoising levels of a full-strength run")
    guidance_scale: float = Field(1.0, ge=0)
    batch_size: int = Field(32, ge=1, description="edits per write batch")
    net_batch: int = Field(16, ge=1, description="rows per network call; part of edit identity")
    precision: Precision = precision_field("fp32")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    inpaint: InpaintSettings = Field(default_factory=InpaintSettings)
    vary: VarySettings = Field(default_factory=VarySettings)
