"""Stamp pairing of images with region sources: the documented rule, counters, bounds."""

from __future__ import annotations

import pytest

from pdlm_ros.errors import ConfigError
from pdlm_ros.ros.sync import StampSync

MS = 1_000_000


def test_exact_pairs_in_either_arrival_order():
    s = StampSync()
    assert s.add_image(100 * MS, "i100") == []
    (p,) = s.add_regions(100 * MS, "d100")
    assert (p.stamp, p.image, p.regions) == (100 * MS, "i100", "d100")
    assert s.add_regions(133 * MS, "d133") == []
    (p,) = s.add_image(133 * MS, "i133")
    assert (p.image, p.regions) == ("i133", "d133")
    c = s.counters()
    assert (c.matched, c.expired_images, c.expired_regions) == (2, 0, 0)
    assert s.pending() == (0, 0)


def test_exact_does_not_pair_different_stamps():
    s = StampSync()
    s.add_image(100 * MS, "i")
    assert s.add_regions(100 * MS + 1, "d") == []
    assert s.pending() == (1, 1)


def test_a_pair_expires_older_unmatched_messages():
    s = StampSync()
    s.add_image(100 * MS, "i100")  # its detections never come
    s.add_image(133 * MS, "i133")
    s.add_regions(90 * MS, "d90")  # an image that never came
    (p,) = s.add_regions(133 * MS, "d133")
    assert p.image == "i133"
    c = s.counters()
    assert (c.expired_images, c.expired_regions) == (1, 1)
    assert s.pending() == (0, 0)


def test_approximate_picks_closest_within_slop():
    s = StampSync(slop_s=0.010)
    s.add_regions(95 * MS, "d95")
    s.add_regions(104 * MS, "d104")
    (p,) = s.add_image(101 * MS, "i101")
    assert p.regions == "d104" and p.regions_stamp == 104 * MS and p.stamp == 101 * MS
    assert s.counters().expired_regions == 1  # d95 is older than the pair
    assert s.add_image(200 * MS, "i200") == []  # nothing within 10 ms


def test_bounded_queue_counts_overflow_and_stamps_that_never_match():
    s = StampSync(queue_size=3)
    for k in range(10):
        s.add_image(k * 33 * MS, f"i{k}")
        s.add_regions(k * 33 * MS + 5 * MS, f"d{k}")  # a detector that restamps: never equal
    assert s.pending() == (3, 3)
    c = s.counters()
    assert c.matched == 0 and c.expired_images == 7 and c.expired_regions == 7
    assert c.pending_delta_ns == -5 * MS
    assert s.flush() == 6 and s.counters().expired_images == 10


def test_repeated_stamp_replaces_the_queued_copy():
    s = StampSync()
    s.add_image(100 * MS, "old")
    s.add_image(100 * MS, "new")
    (p,) = s.add_regions(100 * MS, "d")
    assert p.image == "new" and s.counters().expired_images == 1


def test_time_jump_back_resets_queues():
    s = StampSync(reset_after_s=1.0)
    s.add_image(50_000 * MS, "late")
    s.add_image(10 * MS, "restart")  # publisher restarted with a fresh clock
    assert s.counters().resets == 1 and s.pending() == (1, 0)
    (p,) = s.add_regions(10 * MS, "d")
    assert p.image == "restart"


def test_out_of_order_delivery_still_pairs():
    s = StampSync()
    s.add_image(200 * MS, "i200")
    s.add_image(100 * MS, "i100")
    (p,) = s.add_regions(100 * MS, "d100")
    assert p.image == "i100" and s.pending() == (1, 0)


@pytest.mark.parametrize("kw,match", [({"slop_s": -1}, "slop"), ({"queue_size": 0}, "queue_size"),
                                      ({"reset_after_s": 0}, "reset_after")])
def test_bad_settings(kw, match):
    with pytest.raises(ConfigError, match=match):
        StampSync(**kw)
