"""Inpainting masks at model resolution from a box table, a PNG or a rectangle.

A mask is ``(S, S)`` uint8 in {0, 1} (1 = region to regenerate), ``S`` the ingest
``spatial_size``. Box tables hold boxes in *original* pixel coordinates (RSNA: x, y, width,
height in the 1024 x 1024 image); they are mapped to the cache with the same geometry as
``fit_to_square`` (pad / crop / stretch). Boxes reaching outside the image are clipped with a
warning; a mask that ends up empty, or a PNG of another size than the model's, is a
:class:`MaskError` naming the file and the reason.
"""

from __future__ import annotations

import csv
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medsynth.protocol_edit import MASK_PATTERN


class MaskError(ValueError):
    """A mask that cannot be used; the message names the file (or rectangle) and why."""


@dataclass(frozen=True)
class Box:
    x: float  # left, original pixels
    y: float  # top, original pixels
    width: float
    height: float


def read_box_table(path: str | Path, key_column: str) -> dict[str, list[Box]]:
    """``key -> boxes`` from a CSV with ``key_column, x, y, width, height`` (original pixels)."""
    path = Path(path)
    if not path.is_file():
        raise MaskError(f"box table {path} does not exist")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        cols = list(reader.fieldnames or [])
        need = [key_column, "x", "y", "width", "height"]
        missing = [c for c in need if c not in cols]
        if missing:
            raise MaskError(
                f"box table {path} lacks columns {missing} (it has {cols}); it needs {need} with "
                "boxes in original pixel coordinates"
            )
        out: dict[str, list[Box]] = {}
        for line, r in enumerate(reader, start=2):
            try:
                box = Box(*(float(r[c]) for c in ("x", "y", "width", "height")))
            except (TypeError, ValueError):
                raise MaskError(
                    f"box table {path} line {line}: x/y/width/height not numbers"
                ) from None
            if not all(math.isfinite(v) for v in (box.x, box.y, box.width, box.height)):
                raise MaskError(f"box table {path} line {line}: a coordinate is not finite")
            out.setdefault(r[key_column], []).append(box)
    return out


def _geometry(h: int, w: int, size: int, resize_mode: str) -> tuple[float, float, float, float]:
    """(scale_y, scale_x, offset_y, offset_x) taking original pixels to cache pixels."""
    if resize_mode == "stretch" or h == w:
        return size / h, size / w, 0.0, 0.0
    scale = size / max(h, w) if resize_mode == "pad" else size / min(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    sy, sx = nh / h, nw / w
    if resize_mode == "pad":
        return sy, sx, float((size - nh) // 2), float((size - nw) // 2)
    return sy, sx, -float((nh - size) // 2), -float((nw - size) // 2)


def box_mask(
    boxes: list[Box],
    image_hw: tuple[int, int],
    size: int,
    resize_mode: str = "pad",
    where: str = "box table",
) -> np.ndarray:
    """``(size, size)`` uint8 mask covering every box (in pixels of an ``image_hw`` image).

    A box cell is on when the box overlaps it at all (boxes never shrink below one pixel).
    Boxes partly outside the image are clipped with a warning; wholly outside ones are dropped
    with a warning; no box left is a :class:`MaskError`.
    """
    h, w = image_hw
    sy, sx, oy, ox = _geometry(h, w, size, resize_mode)
    mask = np.zeros((size, size), np.uint8)
    for b in boxes:
        x0, y0 = max(b.x, 0.0), max(b.y, 0.0)
        x1, y1 = min(b.x + b.width, float(w)), min(b.y + b.height, float(h))
        if (x0, y0, x1, y1) != (b.x, b.y, b.x + b.width, b.y + b.height):
            warnings.warn(
                f"{where}: box (x={b.x:g}, y={b.y:g}, w={b.width:g}, h={b.height:g}) reaches "
                f"outside the {w}x{h} image; clipped",
                stacklevel=2,
            )
        if x1 <= x0 or y1 <= y0:
            continue
        r0, r1 = math.floor(y0 * sy + oy), math.ceil(y1 * sy + oy)
        c0, c1 = math.floor(x0 * sx + ox), math.ceil(x1 * sx + ox)
        mask[max(r0, 0) : max(min(r1, size), 0), max(c0, 0) : max(min(c1, size), 0)] = 1
    if not mask.any():
        raise MaskError(f"{where}: the mask is empty (no box inside the image); nothing to edit")
    return mask


def rect_mask(spec: str, size: int) -> np.ndarray:
    """``x0,y0,x1,y1`` in model pixels (end exclusive) -> mask; clipped to the image."""
    try:
        x0, y0, x1, y1 = (int(v) for v in spec.split(","))
    except ValueError:
        raise MaskError(f"rectangle {spec!r} is not x0,y0,x1,y1 in whole model pixels") from None
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        warnings.warn(
            f"rectangle {spec} reaches outside the {size}x{size} model image; clipped", stacklevel=2
        )
    mask = np.zeros((size, size), np.uint8)
    if cx1 > cx0 and cy1 > cy0:
        mask[cy0:cy1, cx0:cx1] = 1
    if not mask.any():
        raise MaskError(f"rectangle {spec}: the mask is empty inside the {size}x{size} image")
    return mask


def png_mask(path: str | Path, size: int) -> np.ndarray:
    """A grey (or RGB/alpha: any channel) PNG of exactly ``size x size``; nonzero = edit."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MaskError(f"mask file {path} does not exist")
    try:
        with Image.open(path) as im:
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise MaskError(f"mask file {path} is not a readable image ({exc})") from None
    if arr.shape[:2] != (size, size):
        raise MaskError(
            f"mask file {path} is {arr.shape[1]}x{arr.shape[0]} pixels but the model works at "
            f"{size}x{size} (dataset.spatial_size); resize the mask to the model's size"
        )
    mask = (arr.reshape(size, size, -1) > 0).any(-1).astype(np.uint8)
    if not mask.any():
        raise MaskError(f"mask file {path} is empty (all zero); nothing to edit")
    return mask


class MaskSource:
    """Resolves a protocol mask spec (``boxes:``, ``png:``, ``rect:``) per source image.

    For a box table, a source without boxes of its own (a normal image: "insert a finding")
    borrows the boxes of a source that has some, chosen by its cache row, so the choice is
    deterministic and recorded (``describe``) by cache row only.
    """

    def __init__(self, spec: str, size: int, resize_mode: str = "pad", key_column: str = ""):
        m = MASK_PATTERN.match(spec or "")
        if not m:
            raise MaskError(
                f"no usable mask {spec!r}: give boxes:PATH, png:PATH or rect:x0,y0,x1,y1"
            )
        self.kind, self.arg = m.groups()
        self.size, self.resize_mode = size, resize_mode
        self.fixed = None
        if self.kind == "png":
            self.fixed = png_mask(self.arg, size)
        elif self.kind == "rect":
            self.fixed = rect_mask(self.arg, size)
        else:
            self.table = read_box_table(self.arg, key_column)
            if not self.table:
                raise MaskError(f"box table {self.arg} holds no boxes")

    def for_rows(self, rows: list[dict], key_attribute: str) -> dict[int, tuple[np.ndarray, str]]:
        """``cache row -> (mask, description)`` for index rows (``key_attribute``: join key)."""
        if self.fixed is not None:
            desc = f"{self.kind}:{Path(self.arg).name if self.kind == 'png' else self.arg}"
            return {int(r["row"]): (self.fixed, desc) for r in rows}
        own = [r for r in rows if r[key_attribute] in self.table]
        if not own:
            raise MaskError(
                f"box table {self.arg}: none of the {len(rows)} source images has a box (joined "
                f"on {key_attribute}); check box_key_column"
            )
        out = {}
        for r in rows:
            donor = r if r[key_attribute] in self.table else own[int(r["row"]) % len(own)]
            hw = (int(donor["Rows"]), int(donor["Columns"]))
            boxes = self.table[donor[key_attribute]]
            where = f"box table {self.arg} (cache row {donor['row']})"
            mask = box_mask(boxes, hw, self.size, self.resize_mode, where)
            how = "own" if donor is r else f"from-row-{donor['row']}"
            out[int(r["row"])] = (mask, f"boxes:{how}:{len(boxes)}")
        return out
