"""Held-out drawing styles: each one really differs from the training renderer in the way its name says."""

import numpy as np
import pytest

from pdlm_ros.data.scenes import (SIZE_EXTENT_PX, STYLE_SHIFTS, generate_scene, generate_shift_scene, render_scene,
                                  sample_specs)
from pdlm_ros.errors import DatasetError

SEED = 10**12 + 41  # a held-out seed


def test_seeds_cycle_through_every_kind():
    kinds = [generate_shift_scene(SEED + i)[0] for i in range(len(STYLE_SHIFTS))]
    assert sorted(kinds) == sorted(STYLE_SHIFTS)
    with pytest.raises(DatasetError, match="unknown style shift 'watercolour'"):
        generate_shift_scene(SEED, "watercolour")


def test_jpeg_changes_pixels_not_layout():
    plain = generate_scene(SEED)
    _, jpeg = generate_shift_scene(SEED, "jpeg")
    assert all((a.mask == b.mask).all() for a, b in zip(plain.objects, jpeg.objects))
    diff = np.abs(plain.image.astype(int) - jpeg.image.astype(int))
    assert diff.mean() > 1.0  # quality 15..35 leaves visible artefacts


def test_hard_edges_have_no_partial_coverage():
    rng = np.random.default_rng(0)
    specs = sample_specs(rng, 120, 100, 3)
    soft = render_scene(specs, 120, 100, background_seed=1)
    hard = render_scene(specs, 120, 100, background_seed=1, style=STYLE_SHIFTS["hard_edges"])
    assert (soft.image != hard.image).any()
    # anti-aliased edges blend object and background colours; without it every object pixel has its own colour
    for obj_soft, obj_hard in zip(soft.objects, hard.objects):
        assert obj_hard.mask.sum() == pytest.approx(obj_soft.mask.sum(), rel=0.15)


def test_sizes_lie_outside_the_training_ranges():
    rng = np.random.default_rng(2)
    specs = sample_specs(rng, 176, 176, 8, STYLE_SHIFTS["sizes"])
    assert specs
    for spec in specs:
        low, high = SIZE_EXTENT_PX[spec.size]
        assert spec.extent < low if spec.size == "small" else spec.extent > high


def test_plain_background_is_flat_and_occlusion_is_heavier():
    _, scene = generate_shift_scene(SEED, "plain_background")
    bg = scene.image[scene.instance_mask == 0].reshape(-1, 3)
    _, counts = np.unique(bg, axis=0, return_counts=True)
    assert counts.max() > 0.9 * len(bg)  # one colour, bar the anti-aliased rims of the objects
    for i in range(4):
        _, scene = generate_shift_scene(SEED + i, "occlusion")
        assert min(o.visible_fraction for o in scene.objects) < 0.6  # training keeps every object >= 60 % visible
        assert min(o.visible_fraction for o in scene.objects) >= 0.35
