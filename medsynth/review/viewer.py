"""Full-resolution viewing for the review dashboard: window/level in the image's own units,
presets, a SYNTHETIC banner outside the image, tiles with a status strip, a zoom/pan viewer.

Window/level are modality values (after RescaleSlope/Intercept): for a medsynth instance that
is the training scale [-1, 1]; for a CT it would be HU. Images are PNG at native resolution
(never JPEG, never upscaled on the server); the browser zooms and pans them.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from medsynth.dicom.read import DecodeOptions, load_unit_image, read_header

STATUS_COLOURS = {  # tile strip colours (RGB): green, red, amber, grey
    "accept": (46, 160, 67),
    "reject": (210, 50, 50),
    "unsure": (230, 160, 20),
    "unreviewed": (120, 120, 120),
}
BANNER_PX = 14  # least height of a banner (grows with the image so it stays readable)


@dataclass(frozen=True)
class ValueRange:
    """Modality-value range of an image file and its stored window (same units)."""

    low: float
    high: float
    center: float
    width: float


def value_range(path: str | Path) -> ValueRange:
    """The range the stored bits can reach after the modality rescale, and the file's window."""
    h = read_header(
        path,
        (
            "BitsStored",
            "PixelRepresentation",
            "RescaleSlope",
            "RescaleIntercept",
            "WindowCenter",
            "WindowWidth",
        ),
    )
    bits = int(h["BitsStored"] or 8)
    lo, hi = (
        (-(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1)
        if h["PixelRepresentation"] == "1"
        else (0.0, 2.0**bits - 1)
    )
    slope, icpt = float(h["RescaleSlope"] or 1), float(h["RescaleIntercept"] or 0)
    low, high = sorted((lo * slope + icpt, hi * slope + icpt))
    first = lambda v: float(v.strip("[]").split(",")[0]) if v else None  # noqa: E731
    c, w = first(h["WindowCenter"]), first(h["WindowWidth"])
    if c is None or not w:
        c, w = (low + high) / 2, high - low
    return ValueRange(low, high, c, w)


def presets(path: str | Path) -> dict[str, tuple[float, float]]:
    """Named (center, width) windows in modality units: stored, full range, auto (1–99 %)."""
    vr = value_range(path)
    full = load_unit_image(
        path,
        DecodeOptions(
            intensity="window", window_center=(vr.low + vr.high) / 2, window_width=vr.high - vr.low
        ),
    )[0]
    p1, p99 = (vr.low + q * (vr.high - vr.low) for q in np.percentile(full, [1, 99]))
    return {
        "stored window": (vr.center, vr.width),
        "full range": ((vr.low + vr.high) / 2, vr.high - vr.low),
        "auto (1–99 %)": ((p1 + p99) / 2, max(p99 - p1, (vr.high - vr.low) / 1000)),
    }


def windowed(path: str | Path, center: float, width: float) -> np.ndarray:
    """``(H, W)`` (grey) or ``(H, W, 3)`` (RGB) float32 in [0, 1]: the image through a window
    given in modality units (stored values 0..255 for an RGB instance, per channel)."""
    rgb = read_header(path, ("SamplesPerPixel",))["SamplesPerPixel"] == "3"
    opts = DecodeOptions(
        intensity="window", window_center=center, window_width=width, color="rgb" if rgb else "grey"
    )
    unit = load_unit_image(path, opts)
    return np.ascontiguousarray(unit.transpose(1, 2, 0)) if rgb else unit[0]


def banner_px(width: int) -> int:
    """Banner height for an image ``width`` px wide: 14 px, or 1/24 of the width if larger."""
    return max(BANNER_PX, width // 24)


def _banner(im: Image.Image, text: str, colour: tuple[int, int, int]) -> Image.Image:
    """A strip with ``text`` above ``im`` (so no label covers the anatomy)."""
    h = banner_px(im.width)
    out = Image.new("RGB", (im.width, im.height + h), colour)
    out.paste(im.convert("RGB"), (0, h))
    font = ImageFont.load_default(size=max(10, h - 4))
    ImageDraw.Draw(out).text((4, 1), text, fill=(255, 255, 255), font=font)
    return out


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1)  # speed over size: viewed once, cached
    return buf.getvalue()


def full_png(path: str | Path, center: float, width: float, marker: str = "SYNTHETIC") -> bytes:
    """PNG at the image's native resolution, windowed, with the marker banner above it."""
    img = (windowed(path, center, width) * 255).round().astype(np.uint8)
    return _png(_banner(Image.fromarray(img), marker, (200, 30, 30)))


def tile_png(img01: np.ndarray, status: str, size: int = 112, marker: str = "SYNTHETIC") -> bytes:
    """A grid tile: ``(H, W)`` or ``(H, W, 3)`` in [0, 1] resized to ``size`` (area-averaged when shrinking),
    a red ``marker`` banner above (EDITED for a patient-derived edit) and a strip below coloured
    by review status."""
    im = Image.fromarray((img01 * 255).round().astype(np.uint8))
    resample = Image.Resampling.BOX if im.width > size else Image.Resampling.NEAREST
    im = _banner(im.resize((size, size), resample), marker, (200, 30, 30))
    out = Image.new("RGB", (im.width, im.height + BANNER_PX), STATUS_COLOURS[status])
    out.paste(im, (0, 0))
    ImageDraw.Draw(out).text((3, im.height + 1), status, fill=(255, 255, 255))
    return _png(out)


def zoom_pan_html(png: bytes, height_px: int = 640, element_id: str = "fullres") -> str:
    """Self-contained HTML: the PNG in a box, wheel to zoom, drag to pan, buttons fit / 1:1 / ±.

    Nearest-neighbour when magnified, so pixels stay pixels.
    """
    b64 = base64.b64encode(png).decode()
    return f"""
<div style="font:13px sans-serif;margin-bottom:4px">
 <button id="fit">Fit</button> <button id="one">1:1</button>
 <button id="in">+</button> <button id="out">−</button>
 <span id="zl"></span> · wheel zooms, drag pans</div>
<div id="box" style="position:relative;overflow:hidden;height:{height_px}px;background:#111;cursor:grab">
 <img id="{element_id}" src="data:image/png;base64,{b64}"
  style="position:absolute;left:0;top:0;transform-origin:0 0;image-rendering:pixelated"></div>
<script>
const box=document.getElementById('box'), im=document.getElementById('{element_id}');
let z=1,x=0,y=0,drag=null;
function show(){{im.style.transform=`translate(${{x}}px,${{y}}px) scale(${{z}})`;
 document.getElementById('zl').textContent=Math.round(z*100)+' %';}}
function fit(){{z=Math.min(box.clientWidth/im.naturalWidth, box.clientHeight/im.naturalHeight);
 x=(box.clientWidth-im.naturalWidth*z)/2; y=(box.clientHeight-im.naturalHeight*z)/2; show();}}
function zoomAt(f,cx,cy){{x=cx-(cx-x)*f; y=cy-(cy-y)*f; z*=f; show();}}
im.onload=fit; if(im.complete) fit();
document.getElementById('fit').onclick=fit;
document.getElementById('one').onclick=()=>{{zoomAt(1/z,box.clientWidth/2,box.clientHeight/2);}};
document.getElementById('in').onclick=()=>zoomAt(1.5,box.clientWidth/2,box.clientHeight/2);
document.getElementById('out').onclick=()=>zoomAt(1/1.5,box.clientWidth/2,box.clientHeight/2);
box.addEventListener('wheel',e=>{{e.preventDefault(); const r=box.getBoundingClientRect();
 zoomAt(e.deltaY<0?1.2:1/1.2,e.clientX-r.left,e.clientY-r.top);}},{{passive:false}});
box.onmousedown=e=>{{drag=[e.clientX-x,e.clientY-y]; box.style.cursor='grabbing';}};
window.onmouseup=()=>{{drag=null; box.style.cursor='grab';}};
window.onmousemove=e=>{{if(drag){{x=e.clientX-drag[0]; y=e.clientY-drag[1]; show();}}}};
</script>"""
