"""Hypothesis settings and memory probes of the property tests.

Examples are drawn at random within each test's strategy (no database written into the checkout); the number of
examples keeps the directory at a few seconds on a 2-core machine. `PDLM_HYPOTHESIS_EXAMPLES=N` asks for more.
"""

from __future__ import annotations

import os
import re
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("pdlm", max_examples=int(os.environ.get("PDLM_HYPOTHESIS_EXAMPLES", "120")), deadline=None,
                          database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("pdlm")


def traced_peak(fn: Callable[[], Any]) -> tuple[Any, BaseException | None, int]:
    """(result, exception, peak bytes allocated through Python's allocators, numpy's arrays included) of fn()."""
    tracemalloc.start()
    try:
        try:
            return fn(), None, tracemalloc.get_traced_memory()[1]
        except Exception as err:  # noqa: BLE001 - the caller checks which kinds are allowed
            return None, err, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


_STATUS = Path("/proc/self/status")


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", _STATUS.read_text()).group(1))


def rss_peak_growth(fn: Callable[[], Any]) -> tuple[Any, BaseException | None, int]:
    """(result, exception, bytes the process's peak RSS rose above its RSS before the call) of fn(): sees C
    allocations too (PIL's decoders), which tracemalloc does not. Linux: the peak is reset through clear_refs."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _kib("VmRSS")
    try:
        out, err = fn(), None
    except Exception as e:  # noqa: BLE001
        out, err = None, e
    return out, err, (_kib("VmHWM") - before) * 1024


@pytest.fixture(scope="session")
def rss_probe():
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _kib("VmHWM")
    except (OSError, AttributeError):
        pytest.skip("peak RSS cannot be reset here (needs Linux /proc/self/clear_refs)")
    return rss_peak_growth
