"""Annotated images: boxes and labels land where the regions are; refused regions are marked."""

from __future__ import annotations

import math

import numpy as np

from pdlm_ros.types import RegionCaption
from pdlm_ros.viz import draw_captions, track_color


def test_draws_boxes_in_track_colours_without_touching_the_input():
    img = np.zeros((60, 80, 3), np.uint8)
    regions = [RegionCaption(0, "car-1", (10.0, 30.0, 40.0, 55.0), "a red car", 0.9),
               RegionCaption(1, "", (math.nan,) * 4, "", 0.0, error="box has non-finite coordinates"),
               RegionCaption(2, "x", (500.0, 500.0, 520.0, 530.0), "", 0.0, error="outside")]
    out = draw_captions(img, regions)
    assert out.shape == img.shape and out.dtype == np.uint8 and not img.any()
    assert tuple(out[40, 10]) == track_color("car-1")  # left edge of the box
    assert tuple(out[45, 25]) == (0, 0, 0)  # inside stays untouched
    assert (out[:12] == (255, 0, 0)).all(axis=2).any()  # the refused region's red label, top left


def test_track_colour_is_stable():
    assert track_color("track-7") == track_color("track-7")
    assert track_color("", 3) == track_color("", 3)
