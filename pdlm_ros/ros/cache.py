"""Captions of tracked regions, reused until the track is due for a new description.

A region is re-described when it has no track id, when its caption is older than `max_age_s` (measured in frame
stamps, so replaying a bag gives the same result at any speed), when its box has moved or changed shape enough that
the IoU with the box it was described at falls below `iou_threshold`, or when the stamp went backwards. Refused
regions are never cached. Memory is bounded: at most `max_tracks` tracks, least recently used forgotten first.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pdlm_ros.types import RegionCaption, RegionInput

__all__ = ["CachedCaption", "CaptionCache", "iou", "region_box", "reuse_cached", "remember"]

Box = tuple[float, float, float, float]


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes; 0 when either is empty or not finite."""
    if not all(math.isfinite(v) for v in (*a, *b)):
        return 0.0
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def region_box(region: RegionInput) -> Box | None:
    """The region's box: its mask's bounding box when it has a mask (the mask wins), else its box."""
    if region.mask is not None:
        m = np.asarray(region.mask, dtype=bool)
        if m.ndim != 2 or not m.any():
            return None
        ys, xs = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        return float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1)
    if region.box is None:
        return None
    try:
        x1, y1, x2, y2 = (float(v) for v in region.box)
    except (TypeError, ValueError):
        return None
    return x1, y1, x2, y2


@dataclass(frozen=True)
class CachedCaption:
    caption: RegionCaption
    box: Box  # the box the caption was computed for
    stamp: int  # ns, stamp of the frame it was computed on


class CaptionCache:
    def __init__(self, max_age_s: float = 2.0, iou_threshold: float = 0.5, max_tracks: int = 512) -> None:
        self.max_age_ns = round(max_age_s * 1e9)
        self.iou_threshold = iou_threshold
        self.max_tracks = max_tracks
        self._tracks: OrderedDict[str, CachedCaption] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tracks)

    # Both take the region's track id and its `region_box` (computed once per region by the caller: for a mask it
    # is a scan of the whole mask).
    def lookup(self, region_id: str, box: Box | None, stamp: int) -> CachedCaption | None:
        """The cached caption of this track if it is still valid at `stamp` for a region at `box`, else None."""
        if not region_id or box is None:
            return None
        hit = self._tracks.get(region_id)
        if hit is None:
            return None
        age = stamp - hit.stamp
        if age < 0 or age > self.max_age_ns or iou(box, hit.box) < self.iou_threshold:
            return None
        self._tracks.move_to_end(region_id)
        return hit

    def store(self, region_id: str, box: Box | None, caption: RegionCaption, stamp: int) -> None:
        """Remember a fresh caption; refused regions and regions without a track id or box are not stored."""
        if not region_id or caption.error or box is None:
            return
        self._tracks[region_id] = CachedCaption(caption, box, stamp)
        self._tracks.move_to_end(region_id)
        while len(self._tracks) > self.max_tracks:
            self._tracks.popitem(last=False)

    def clear(self) -> None:
        self._tracks.clear()


def reuse_cached(cache: CaptionCache, regions: Sequence[RegionInput], stamp: int
                 ) -> tuple[dict[int, tuple[RegionCaption, float]], list[int], list[Box | None]]:
    """The rule the live node and bag replay share: for each region still valid in `cache` at `stamp`, its cached
    caption (marked `cached`, placed at this region's index and box) and its age in seconds; the indices of the
    regions to describe now; every region's box (for `remember`)."""
    boxes = [region_box(reg) for reg in regions]
    cached: dict[int, tuple[RegionCaption, float]] = {}
    todo: list[int] = []
    for i, reg in enumerate(regions):
        hit = cache.lookup(reg.region_id, boxes[i], stamp)
        if hit is None:
            todo.append(i)
        else:
            cap = dataclasses.replace(hit.caption, index=i, box=boxes[i], source_index=reg.source_index,
                                      class_id=reg.class_id, score=reg.score, cached=True)
            cached[i] = (cap, (stamp - hit.stamp) / 1e9)
    return cached, todo, boxes


def remember(cache: CaptionCache, regions: Sequence[RegionInput], boxes: Sequence[Box | None],
             fresh: Mapping[int, RegionCaption], stamp: int) -> None:
    """Store the fresh captions (refused ones are skipped by `CaptionCache.store`)."""
    for i, cap in fresh.items():
        cache.store(regions[i].region_id, boxes[i], cap, stamp)
