"""Draw regions and their captions on a frame (the node's annotated_image, reports, the CLI).

PIL only: boxes in a colour fixed per region id (a track keeps its colour across frames), the caption in a filled
label above the box (inside it when the box touches the top edge); refused regions are drawn in red with their error.
Cached captions are marked with a trailing "*".
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pdlm_ros.types import RegionCaption

__all__ = ["draw_captions", "track_color"]

_PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40))
_ERROR = (255, 0, 0)


def track_color(region_id: str, index: int = 0) -> tuple[int, int, int]:
    """A stable colour per region id (crc32, not hash(): Python salts str hashes per process)."""
    key = region_id if region_id else f"#{index}"
    return _PALETTE[zlib.crc32(key.encode()) % len(_PALETTE)]


def _label(r: RegionCaption, max_chars: int) -> str:
    head = f"{r.region_id}: " if r.region_id else ""
    text = f"{head}{r.error}" if r.error else f"{head}{r.caption}{' *' if r.cached else ''}"
    return text if len(text) <= max_chars else text[: max_chars - 1] + "…"


def draw_captions(image: np.ndarray, regions: Sequence[RegionCaption], max_chars: int = 60) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> a copy with every region's box and caption drawn."""
    canvas = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    w, h = canvas.size
    for r in regions:
        color = _ERROR if r.error else track_color(r.region_id, r.index)
        text = _label(r, max_chars)
        finite = all(math.isfinite(v) for v in r.box)
        if finite:
            x1, y1, x2, y2 = (min(max(v, -1.0), float(lim)) for v, lim in zip(r.box, (w, h, w, h)))
            if x2 > x1 and y2 > y1:
                draw.rectangle((x1, y1, x2 - 1, y2 - 1), outline=color, width=2)
            anchor = (max(x1, 0.0), max(y1, 0.0))
        else:
            anchor = (0.0, 0.0)
        tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), text, font=font)
        tw, th = tx1 - tx0 + 4, ty1 - ty0 + 4
        x, y = anchor
        y = y - th if y - th >= 0 else y  # above the box when there is room
        x = min(x, max(w - tw, 0))
        draw.rectangle((x, y, x + tw, y + th), fill=color)
        luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        draw.text((x + 2 - tx0, y + 2 - ty0), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)
    return np.asarray(canvas)
