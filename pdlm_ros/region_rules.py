"""Region input rules, without torch: validation against the image, the minimum region size, the per-frame budget.

The captioner applies them to every call (`pdlm_ros.model.regions` re-exports them); the node applies the budget
before its own per-region work (the caption cache), so one message of 10,000 boxes costs a bounded amount of work
before any model runs. A refused region keeps its place in the result with the reason; none is dropped.

Rules, in order: a region carrying a `refusal` (the message conversion's or a budget's) is refused with it; a mask
wins over a box, must match the image size and have a pixel set; a box needs four finite numbers with x1 < x2 and
y1 < y2, is clipped to the image, and is refused when nothing of it is inside or when its clipped width or height
is under MIN_REGION_SIDE pixels. Of the usable regions at most `budget` are captioned: those with a finite detector
score first, highest first, then the others by area (a mask's pixel count, a box's clipped area), largest first,
ties in request order; the kept ones stay in request order.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pdlm_ros.errors import RegionInputError
from pdlm_ros.types import RegionInput

__all__ = ["MIN_REGION_SIDE", "DEFAULT_REGION_BUDGET", "PreparedRegion", "mask_box", "prepare_regions",
           "budget_refusal", "select_within_budget", "apply_region_budget"]

# A region narrower or lower than one pixel inside the image holds no pixel of its own to describe: the RoI grid
# would sample one pixel's neighbourhood and the caption would be about whatever surrounds it.
MIN_REGION_SIDE = 1.0
# Regions captioned per frame unless the caller says otherwise: 16 passes of the tiny model's 16 regions, so one
# frame of 10,000 detections costs a bounded amount of work; the rest are refused with the reason, never dropped.
DEFAULT_REGION_BUDGET = 256


@dataclass(frozen=True)
class PreparedRegion:
    index: int  # position in the request
    box: tuple[float, float, float, float]  # clipped to the image, x2/y2 exclusive
    mask: np.ndarray | None  # (H, W) bool, or None for a box region


def _fmt_box(box: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in box) + ")"


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """The pixel box (x1, y1, x2, y2), exclusive ends, around a mask's set pixels; None for an empty mask."""
    ys = np.flatnonzero(mask.any(axis=1))
    if ys.size == 0:
        return None
    xs = np.flatnonzero(mask.any(axis=0))
    return (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1))


def prepare_regions(regions: Sequence[RegionInput], width: int, height: int) -> tuple[list[PreparedRegion], dict[int, str]]:
    """Validate regions against a width x height image.

    Returns the usable regions and, for every refused one, an error message by request index. Rules: a region
    carrying a `refusal` (set by the message conversion or a region budget) is refused with it; a mask wins over a
    box and must match the image size and have at least one pixel; a box must have finite coordinates with x1 < x2
    and y1 < y2; a box partly outside the image is clipped, one entirely outside is refused, and so is one whose
    clipped width or height is under MIN_REGION_SIDE pixels.
    """
    good: list[PreparedRegion] = []
    errors: dict[int, str] = {}
    for i, reg in enumerate(regions):
        if getattr(reg, "refusal", ""):
            errors[i] = reg.refusal
            continue
        if reg.mask is not None:
            mask = np.asarray(reg.mask)
            if mask.shape != (height, width):
                errors[i] = f"mask shape {mask.shape} does not match the {width}x{height} image (expected {(height, width)})"
                continue
            mask = mask.astype(bool, copy=False)
            box = mask_box(mask)
            if box is None:
                errors[i] = "mask is empty (no pixel set)"
                continue
            good.append(PreparedRegion(i, box, mask))
            continue
        if reg.box is None:
            errors[i] = "region has neither a box nor a mask"
            continue
        try:
            x1, y1, x2, y2 = (float(v) for v in reg.box)
        except (TypeError, ValueError):
            errors[i] = f"box must be four numbers x1, y1, x2, y2; got {reg.box!r}"
            continue
        if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
            errors[i] = f"box has non-finite coordinates {_fmt_box((x1, y1, x2, y2))}"
            continue
        if x2 <= x1 or y2 <= y1:
            errors[i] = f"box {_fmt_box((x1, y1, x2, y2))} has zero or negative area (need x1 < x2 and y1 < y2)"
            continue
        cx1, cy1, cx2, cy2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))
        if cx2 <= cx1 or cy2 <= cy1:
            errors[i] = f"box {_fmt_box((x1, y1, x2, y2))} lies outside the {width}x{height} image"
            continue
        if cx2 - cx1 < MIN_REGION_SIDE or cy2 - cy1 < MIN_REGION_SIDE:
            errors[i] = (f"box {_fmt_box((x1, y1, x2, y2))} is {cx2 - cx1:.3g} x {cy2 - cy1:.3g} px inside the image, "
                         f"under the minimum region size of {MIN_REGION_SIDE:g} px per side")
            continue
        good.append(PreparedRegion(i, (cx1, cy1, cx2, cy2), None))
    return good, errors


def budget_refusal(budget: int, total: int, rank: int) -> str:
    """The error of a region left out by the per-frame region budget."""
    return (f"over the per-frame region budget: the {budget} best of the frame's {total} usable regions are "
            f"captioned (highest detector score first, then largest area); this one ranked {rank}")


def _rank_key(prepared: PreparedRegion, regions: Sequence[RegionInput]) -> tuple[int, float, float, int]:
    score = float(regions[prepared.index].score)
    if prepared.mask is not None:
        area = float(np.count_nonzero(prepared.mask))
    else:
        x1, y1, x2, y2 = prepared.box
        area = (x2 - x1) * (y2 - y1)
    return (0, -score, -area, prepared.index) if math.isfinite(score) else (1, 0.0, -area, prepared.index)


def select_within_budget(prepared: list[PreparedRegion], regions: Sequence[RegionInput],
                         budget: int) -> tuple[list[PreparedRegion], dict[int, str]]:
    """At most `budget` of the usable regions, still in request order, and the refusal of each one left out.

    Rank: regions with a finite detector score first, highest score first; then the others, largest area first
    (a mask's pixel count, a box's clipped area); ties in request order. Unusable regions never count.
    """
    if budget < 1:
        raise RegionInputError(f"the region budget must be at least 1 region (got {budget!r})")
    if len(prepared) <= budget:
        return prepared, {}
    ranked = sorted(prepared, key=lambda p: _rank_key(p, regions))
    keep = {p.index for p in ranked[:budget]}
    refused = {p.index: budget_refusal(budget, len(prepared), rank)
               for rank, p in enumerate(ranked[budget:], start=budget + 1)}
    return [p for p in prepared if p.index in keep], refused


def apply_region_budget(regions: Sequence[RegionInput], width: int, height: int,
                        budget: int) -> tuple[list[RegionInput], int, int]:
    """`regions` with every one past the budget (`select_within_budget`'s rule) carrying its refusal, how many
    that was, and how many usable regions are left: for callers that must bound their own per-region work before
    captioning (the node's cache)."""
    prepared, _ = prepare_regions(regions, width, height)
    kept, refused = select_within_budget(prepared, regions, budget)
    if not refused:
        return list(regions), 0, len(kept)
    return [dataclasses.replace(r, refusal=refused[i]) if i in refused else r for i, r in enumerate(regions)], \
        len(refused), len(kept)
