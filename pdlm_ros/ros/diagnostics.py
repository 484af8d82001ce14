"""Node health: counters, rates, latency percentiles, throttled warnings, and the diagnostic_msgs message.

Counters are totals since activation; rates are computed between two reports. `NodeHealth` is thread-safe: input
callbacks, the worker and the reporter all write to it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdlm_ros.ros import messages as M

__all__ = ["Throttle", "HealthReport", "NodeHealth", "classify_error", "diagnostic_array_msg"]

OK, WARN, ERROR = 0, 1, 2
_ALWAYS = ("images_in", "regions_in", "pairs", "dropped", "frames_out")  # reported even while zero


def classify_error(message: str) -> str:
    """An error kind (a diagnostics key) for a refusal or rejection message."""
    m = message.lower()
    rules = (("region budget", "region_over_budget"), ("minimum region size", "region_too_small"),
             ("angle theta", "region_bad_angle"), ("input.max_pixels", "image_too_large"),
             ("unsupported image encoding", "image_encoding"), ("compressed", "image_compressed"),
             ("truncated", "image_size"), ("longer than expected", "image_size"), ("step", "image_step"),
             ("non-finite", "region_nonfinite_box"), ("outside", "region_out_of_frame"),
             ("zero or negative area", "region_empty_box"), ("mask", "region_bad_mask"), ("size", "image_size"))
    return next((kind for key, kind in rules if key in m), "other")


class Throttle:
    """Logs a kind of message at most once per `period_s`, with the number of repeats it held back."""

    def __init__(self, logger: logging.Logger, period_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.period_s, self.clock = logger, period_s, clock
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    def warning(self, kind: str, msg: str, *args: Any, exc_info: bool = False) -> bool:
        return self.log(logging.WARNING, kind, msg, *args, exc_info=exc_info)

    def info(self, kind: str, msg: str, *args: Any) -> bool:
        return self.log(logging.INFO, kind, msg, *args)

    def log(self, level: int, kind: str, msg: str, *args: Any, exc_info: bool = False) -> bool:
        """Log unless this kind was logged less than `period_s` ago; True when it was logged."""
        now = self.clock()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.period_s:
                self._held[kind] += 1
                return False
            held, self._held[kind] = self._held[kind], 0
            self._last[kind] = now
        suffix = f" ({held} more like this since the last report)" if held else ""
        self.logger.log(level, msg + suffix, *args, exc_info=exc_info)
        return True


@dataclass(frozen=True)
class HealthReport:
    level: int
    message: str
    values: dict[str, str]


class NodeHealth:
    def __init__(self, window: int = 200, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()  # images_in, regions_in, pairs, frames_out, dropped, ...
        self.errors: Counter[str] = Counter()  # by kind
        self._latency: deque[float] = deque(maxlen=window)
        self._regions: deque[int] = deque(maxlen=window)
        self._prev: tuple[float, Counter[str], Counter[str]] = (clock(), Counter(), Counter())

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def error(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self.errors[kind] += n

    def frame(self, latency_ms: float, regions: int) -> None:
        with self._lock:
            self.counts["frames_out"] += 1
            self._latency.append(latency_ms)
            self._regions.append(regions)

    def snapshot(self) -> tuple[Counter[str], Counter[str]]:
        with self._lock:
            return Counter(self.counts), Counter(self.errors)

    def report(self, extra: dict[str, Any] | None = None) -> HealthReport:
        """Values since activation plus rates and new errors since the previous report."""
        now = self.clock()
        with self._lock:
            counts, errors = Counter(self.counts), Counter(self.errors)
            lat = np.array(self._latency, dtype=np.float64)
            regs = np.array(self._regions, dtype=np.float64)
            t0, c0, e0 = self._prev
            self._prev = (now, counts, errors)
        dt = max(now - t0, 1e-9)
        new_errors = errors - e0
        new_drops = counts["dropped"] - c0["dropped"]
        values = {
            "input_image_hz": f"{(counts['images_in'] - c0['images_in']) / dt:.2f}",
            "input_regions_hz": f"{(counts['regions_in'] - c0['regions_in']) / dt:.2f}",
            "output_hz": f"{(counts['frames_out'] - c0['frames_out']) / dt:.2f}",
            "latency_p50_ms": f"{np.percentile(lat, 50):.1f}" if lat.size else "nan",
            "latency_p95_ms": f"{np.percentile(lat, 95):.1f}" if lat.size else "nan",
            "regions_per_frame": f"{regs.mean():.2f}" if regs.size else "nan",
        }
        values.update({k: str(counts[k]) for k in sorted({*_ALWAYS, *counts})})
        values.update({f"errors.{k}": str(v) for k, v in sorted(errors.items())})
        values.update({k: str(v) for k, v in (extra or {}).items()})
        if new_errors.get("inference", 0):
            level, message = ERROR, f"inference failed {new_errors['inference']} times since the last report"
        elif new_errors:
            level = WARN
            kinds = ", ".join(f"{k} x{v}" for k, v in sorted(new_errors.items()))
            message = f"bad input since the last report: {kinds}"
        elif new_drops:
            level, message = WARN, f"dropped {new_drops} frames (inference slower than the input)"
        else:
            level, message = OK, "ok"
        return HealthReport(level, message, values)


def diagnostic_array_msg(report: HealthReport, header: Any, name: str, hardware_id: str = "") -> Any:
    """A diagnostic_msgs/DiagnosticArray with one status for the node."""
    t = M.typestore().types
    kv = t["diagnostic_msgs/msg/KeyValue"]
    status = t["diagnostic_msgs/msg/DiagnosticStatus"](
        level=report.level, name=name, message=report.message, hardware_id=hardware_id,
        values=[kv(key=k, value=v) for k, v in report.values.items()])
    return t[M.DIAGNOSTIC_ARRAY](header=header, status=[status])
