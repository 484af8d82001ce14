"""Captions of tracked regions, reused until the track is due for a new description.

A region is re-described when its caption is older than `max_age_s` (measured in frame stamps, so replaying a bag
gives the same result at any speed), when its box has moved or changed shape enough that the IoU with the box it was
described at falls below `iou_threshold`, or when the stamp went backwards. Refused regions are never cached. Memory
is bounded: at most `max_tracks` entries, least recently used forgotten first.

Regions without a track id (detectors that publish none, as Isaac ROS's do) are matched by their box instead: to a
cached untracked caption of the same class whose box overlaps with IoU >= `untracked_iou` (stricter than a
track's, since nothing else says it is the same object), each cached caption serving at most one region per frame;
`untracked_iou` 0 turns this off.
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
    def __init__(self, max_age_s: float = 2.0, iou_threshold: float = 0.5, max_tracks: int = 512,
                 untracked_iou: float = 0.9) -> None:
        self.max_age_ns = round(max_age_s * 1e9)
        self.iou_threshold = iou_threshold
        self.max_tracks = max_tracks
        self.untracked_iou = untracked_iou
        self._tracks: OrderedDict[str, CachedCaption] = OrderedDict()
        self._untracked = 0  # keys of untracked entries: "\x00<n>", never a detector's id

    def __len__(self) -> int:
        return len(self._tracks)

    # Both take the region's track id and its `region_box` (computed once per region by the caller: for a mask it
    # is a scan of the whole mask).
    def lookup(self, region_id: str, box: Box | None, stamp: int, class_id: str = "",
               taken: set[str] | None = None) -> CachedCaption | None:
        """The cached caption of this track if it is still valid at `stamp` for a region at `box`, else None.

        Without a track id: the best-overlapping valid untracked caption of the same class not in `taken` (the keys
        already used this frame; the one returned is added)."""
        if box is None:
            return None
        if not region_id:
            return self._lookup_untracked(box, stamp, class_id, taken if taken is not None else set())
        hit = self._tracks.get(region_id)
        if hit is None or not self._valid(hit, box, stamp, self.iou_threshold):
            return None
        self._tracks.move_to_end(region_id)
        return hit

    def _valid(self, hit: CachedCaption, box: Box, stamp: int, threshold: float) -> bool:
        age = stamp - hit.stamp
        return 0 <= age <= self.max_age_ns and iou(box, hit.box) >= threshold

    def _lookup_untracked(self, box: Box, stamp: int, class_id: str, taken: set[str]) -> CachedCaption | None:
        if self.untracked_iou <= 0:
            return None
        best, best_iou = None, 0.0
        for key, hit in self._tracks.items():
            if key[:1] != "\x00" or key in taken or hit.caption.class_id != class_id:
                continue
            overlap = iou(box, hit.box)
            if overlap > best_iou and self._valid(hit, box, stamp, self.untracked_iou):
                best, best_iou = key, overlap
        if best is None:
            return None
        taken.add(best)
        self._tracks.move_to_end(best)
        return self._tracks[best]

    def store(self, region_id: str, box: Box | None, caption: RegionCaption, stamp: int) -> None:
        """Remember a fresh caption; refused regions and regions without a box are not stored, nor regions without
        a track id when untracked matching is off."""
        if caption.error or box is None or (not region_id and self.untracked_iou <= 0):
            return
        if not region_id:
            self._untracked += 1
            region_id = f"\x00{self._untracked}"
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
    regions to describe now (a region carrying a refusal is never looked up); every region's box (for
    `remember`)."""
    boxes = [region_box(reg) for reg in regions]
    cached: dict[int, tuple[RegionCaption, float]] = {}
    todo: list[int] = []
    taken: set[str] = set()  # untracked captions already given to a region of this frame
    for i, reg in enumerate(regions):
        if reg.refusal:  # refused whatever the cache holds (a budget's refusal stays one); no lookup work either
            todo.append(i)
            continue
        hit = cache.lookup(reg.region_id, boxes[i], stamp, reg.class_id, taken)
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
