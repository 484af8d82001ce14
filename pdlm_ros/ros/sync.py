"""Pairing of images with their region source (detections or an instance mask) by header stamp.

Plain Python, no ROS: the node (every transport) and bag replay use this one implementation.

Pairing rule (stamps are int nanoseconds, taken from the messages' headers):
1. Each stream keeps a bounded queue (`queue_size` per stream) of messages still waiting for a partner.
2. A new message pairs with the queued message of the OTHER stream whose stamp is closest to its own, if the
   difference is at most `slop_ns` (0 by default: exact-time sync, the rule of message_filters' TimeSynchronizer;
   detectors copy the image header into their output, so stamps are equal). Ties go to the older message.
3. A pair at stamps (a, b) expires every queued message of either stream stamped before min(a, b): streams are in
   stamp order, so such a message can only have had a partner that is already gone.
4. A full queue expires its oldest message to make room. A message whose stamp repeats one already queued on its
   stream replaces it (the older copy expires).
5. A stamp that jumps back by more than `reset_after_s` (a restarted publisher, a looping bag, sim time reset)
   starts a new timeline: queued messages of either stream stamped more than `reset_after_s` after it belong to
   the old timeline and expire, so they cannot block or mis-pair the new one.
Expired messages are counted per stream; nothing leaves the sync silently. Choose `slop` below half the frame
period, otherwise a message may pair with a neighbour frame's partner before its own arrives.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from pdlm_ros.errors import ConfigError

__all__ = ["Pair", "SyncCounters", "StampSync"]

I = TypeVar("I")  # image payload
R = TypeVar("R")  # region-source payload


@dataclass(frozen=True)
class Pair(Generic[I, R]):
    """An image and its region source. `stamp` is the image's stamp (the output header copies it)."""

    stamp: int
    image: I
    regions: R
    regions_stamp: int


@dataclass(frozen=True)
class SyncCounters:
    """Totals since the sync was made; a snapshot."""

    images: int = 0  # images received
    regions: int = 0  # region messages received
    matched: int = 0  # pairs made
    expired_images: int = 0  # images that left without a partner
    expired_regions: int = 0  # region messages that left without a partner
    resets: int = 0  # timeline resets (rule 5)
    last_image_stamp: int | None = None
    last_regions_stamp: int | None = None

    @property
    def pending_delta_ns(self) -> int | None:
        """Latest image stamp minus latest region stamp: large and steady when stamps never match."""
        if self.last_image_stamp is None or self.last_regions_stamp is None:
            return None
        return self.last_image_stamp - self.last_regions_stamp


class StampSync(Generic[I, R]):
    """Thread-safe two-stream stamp synchronizer; `add_image`/`add_regions` return the pairs they complete."""

    def __init__(self, slop_s: float = 0.0, queue_size: int = 10, reset_after_s: float = 1.0) -> None:
        if not slop_s >= 0.0:
            raise ConfigError(f"sync slop must be >= 0 seconds (got {slop_s})")
        if queue_size < 1:
            raise ConfigError(f"sync queue_size must be >= 1 (got {queue_size})")
        if not reset_after_s > 0.0:
            raise ConfigError(f"sync reset_after must be > 0 seconds (got {reset_after_s})")
        self.slop_ns = round(slop_s * 1e9)
        self.queue_size = queue_size
        self.reset_after_ns = round(reset_after_s * 1e9)
        self._queues: tuple[deque[tuple[int, object]], deque[tuple[int, object]]] = (deque(), deque())
        self._lock = threading.Lock()
        self._n = {"images": 0, "regions": 0, "matched": 0, "expired_images": 0, "expired_regions": 0, "resets": 0}
        self._last: list[int | None] = [None, None]

    # -- public -------------------------------------------------------------------------------------------------
    def add_image(self, stamp: int, image: I) -> list[Pair[I, R]]:
        return self._add(0, int(stamp), image)

    def add_regions(self, stamp: int, regions: R) -> list[Pair[I, R]]:
        return self._add(1, int(stamp), regions)

    def counters(self) -> SyncCounters:
        with self._lock:
            return SyncCounters(**self._n, last_image_stamp=self._last[0], last_regions_stamp=self._last[1])

    @property
    def resets(self) -> int:
        """Timeline resets so far (rule 5): cheap to read after every message."""
        return self._n["resets"]

    def pending(self) -> tuple[int, int]:
        """Queued (images, region messages) still waiting for a partner."""
        with self._lock:
            return len(self._queues[0]), len(self._queues[1])

    def flush(self) -> int:
        """Expire everything still queued (end of a bag); returns how many messages that was."""
        with self._lock:
            n = len(self._queues[0]) + len(self._queues[1])
            self._expire(0, len(self._queues[0]))
            self._expire(1, len(self._queues[1]))
            return n

    # -- rule implementation ----------------------------------------------------------------------------------
    def _expire(self, side: int, count: int) -> None:
        q = self._queues[side]
        for _ in range(count):
            q.popleft()
        self._n["expired_images" if side == 0 else "expired_regions"] += count

    def _add(self, side: int, stamp: int, item: object) -> list[Pair[I, R]]:
        with self._lock:
            self._n["images" if side == 0 else "regions"] += 1
            last = self._last[side]
            if last is not None and last - stamp > self.reset_after_ns:  # rule 5
                for side_k, q in enumerate(self._queues):
                    keep = [e for e in q if e[0] - stamp <= self.reset_after_ns]
                    self._n["expired_images" if side_k == 0 else "expired_regions"] += len(q) - len(keep)
                    q.clear()
                    q.extend(keep)
                self._n["resets"] += 1
            self._last[side] = stamp if last is None or stamp > last or last - stamp > self.reset_after_ns else last
            own, other = self._queues[side], self._queues[1 - side]
            best = None
            for k, (s, _) in enumerate(other):  # rule 2; queues are short (queue_size)
                d = abs(s - stamp)
                if d <= self.slop_ns and (best is None or d < best[1]):
                    best = (k, d)
            if best is None:
                for k, (s, _) in enumerate(own):  # rule 4: a repeated stamp replaces the queued copy
                    if s == stamp:
                        del own[k]
                        self._n["expired_images" if side == 0 else "expired_regions"] += 1
                        break
                if len(own) >= self.queue_size:
                    self._expire(side, len(own) - self.queue_size + 1)
                own.append((stamp, item))
                own_sorted = sorted(own, key=lambda e: e[0])  # keep stamp order even if delivery reorders
                own.clear()
                own.extend(own_sorted)
                return []
            other_stamp, other_item = other[best[0]]
            del other[best[0]]
            floor = min(stamp, other_stamp)  # rule 3
            for side_k in (0, 1):
                q = self._queues[side_k]
                n_old = sum(1 for s, _ in q if s < floor)
                self._expire(side_k, n_old)  # queues are sorted, so the old ones are at the front
            self._n["matched"] += 1
            if side == 0:
                return [Pair(stamp, item, other_item, other_stamp)]  # type: ignore[arg-type]
            return [Pair(other_stamp, other_item, item, stamp)]  # type: ignore[arg-type]
