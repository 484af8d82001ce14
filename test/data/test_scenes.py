"""The synthetic scene engine: determinism, geometry rules, colours, patterns, backgrounds, seed splits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pdlm_ros.data.scenes import (
    COLORS,
    PATTERNS,
    SHAPES,
    SIZE_EXTENT_PX,
    SIZES,
    ObjectSpec,
    caption_for,
    generate_scene,
    render_scene,
    sample_specs,
    scene_seeds,
    vocabulary,
)
from pdlm_ros.errors import DatasetError

SEEDS = range(120)


@pytest.fixture(scope="module")
def scenes():
    return [generate_scene(s) for s in SEEDS]


def _erode(mask: np.ndarray) -> np.ndarray:
    """Drop the 1-px rim, where anti-aliasing mixes object and background."""
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    return out


def _chroma(pixels: np.ndarray) -> np.ndarray:
    p = pixels.astype(int)
    return p.max(-1) - p.min(-1)


def test_same_seed_same_scene_and_different_seeds_differ():
    a, b, c = generate_scene(42), generate_scene(42), generate_scene(43)
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.instance_mask, b.instance_mask)
    assert [o.caption for o in a.objects] == [o.caption for o in b.objects]
    assert [o.box for o in a.objects] == [o.box for o in b.objects]
    assert a.image.shape != c.image.shape or not np.array_equal(a.image, c.image)


def test_image_sizes_and_aspect_ratios_vary_within_range(scenes):
    sides, aspects = [], []
    for s in scenes:
        h, w, ch = s.image.shape
        assert s.image.dtype == np.uint8 and ch == 3
        assert 96 <= w <= 176 and 96 <= h <= 176
        sides += [w, h]
        aspects.append(w / h)
    assert 0.6 - 0.01 <= min(aspects) and max(aspects) <= 1.8 + 0.01
    assert min(aspects) < 0.8 and max(aspects) > 1.4, "aspect ratios should spread over the range"
    assert len(set(sides)) > 30


def test_object_counts_cover_one_to_eight(scenes):
    counts = [len(s.objects) for s in scenes]
    assert min(counts) >= 1 and max(counts) <= 8
    assert set(counts) >= {1, 4, 8}
    assert all(len(generate_scene(s, min_objects=3, max_objects=3).objects) == 3 for s in range(10))


def test_masks_boxes_and_instance_mask_agree(scenes):
    for s in scenes:
        union = np.zeros(s.instance_mask.shape, dtype=int)
        for i, o in enumerate(s.objects):
            assert o.mask.shape == s.image.shape[:2] and o.mask.dtype == bool
            assert np.array_equal(o.mask, s.instance_mask == i + 1)
            rows, cols = np.flatnonzero(o.mask.any(1)), np.flatnonzero(o.mask.any(0))
            assert o.box == (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)  # x2/y2 exclusive
            x1, y1, x2, y2 = o.box
            assert x2 - x1 >= 3 and y2 - y1 >= 3
            assert o.visible_fraction >= 0.6
            union += o.mask
        assert union.max() <= 1, "visible masks must not overlap"
        assert np.array_equal(union > 0, s.instance_mask > 0)


def test_captions_match_attributes_and_vocabulary():
    assert caption_for("small", "striped", "blue", "triangle") == "a small striped blue triangle"
    vocab = vocabulary()
    assert vocab == sorted(vocab)
    assert set(vocab) == {"a", *SIZES, *PATTERNS, *COLORS, *SHAPES}
    for o in generate_scene(3).objects:
        assert o.caption == f"a {o.size} {o.pattern} {o.color} {o.shape}"
        assert set(o.caption.split()) <= set(vocab)


def test_tokenizer_knows_every_caption_word():
    from pdlm_ros.model.tokenizer import TINY_WORDS

    assert set(vocabulary()) <= set(TINY_WORDS)


def test_caption_for_rejects_unknown_words():
    with pytest.raises(DatasetError, match="unknown color 'teal'"):
        caption_for("small", "solid", "teal", "circle")
    with pytest.raises(DatasetError, match="unknown shape 'blob'"):
        render_scene([ObjectSpec("blob", "red", "small", "solid", (20, 20), 18, 0.0, "x")], 40, 40, 0)


def test_object_sizes_follow_the_size_word():
    for size, (lo, hi) in SIZE_EXTENT_PX.items():
        for extent in (lo, hi):
            for shape in SHAPES:
                s = render_scene([ObjectSpec(shape, "red", size, "solid", (40, 40), extent, 0.3, "a")], 80, 80, 1)
                x1, y1, x2, y2 = s.objects[0].box
                across = max(x2 - x1, y2 - y1)
                assert 0.55 * extent <= across <= extent + 2, (shape, size, extent, across)
    small_max = SIZE_EXTENT_PX["small"][1]
    large_min = SIZE_EXTENT_PX["large"][0]
    assert small_max + 4 < large_min, "the two sizes must not be confusable"


@pytest.mark.parametrize("color", list(COLORS))
def test_solid_objects_show_their_palette_colour(color):
    s = render_scene([ObjectSpec("square", color, "large", "solid", (30, 30), 36, 0.2, "a")], 60, 60, 5)
    mean = s.image[_erode(s.objects[0].mask)].astype(float).mean(0)
    nearest = min(COLORS, key=lambda c: np.linalg.norm(np.asarray(COLORS[c], dtype=float) - mean))
    assert nearest == color


def test_patterns_stay_visible_at_small_size():
    luma = np.array([0.299, 0.587, 0.114])
    for color in COLORS:
        spread = {}
        for pattern in PATTERNS:
            s = render_scene([ObjectSpec("circle", color, "small", pattern, (20, 20), 16, 0.5, "a")], 40, 40, 2)
            inner = _erode(s.objects[0].mask)
            spread[pattern] = float((s.image[inner] @ luma).std())
        assert spread["solid"] < 5, (color, spread)
        assert spread["striped"] > 20 and spread["dotted"] > 15, (color, spread)


def test_backgrounds_never_use_object_hues():
    # Backgrounds are desaturated: chroma (max - min channel) stays far below every object colour's.
    object_chroma = min(_chroma(np.asarray(c)) for c in COLORS.values())
    for seed in range(60):
        bg = render_scene([], 120, 100, seed).image
        assert _chroma(bg).max() <= 0.2 * 255, seed
    assert object_chroma > 2 * 0.2 * 255


def test_backgrounds_are_textured():
    stds = [float(render_scene([], 100, 100, s).image.astype(float).std()) for s in range(20)]
    assert min(stds) > 1.0  # noise at least
    assert len({round(x) for x in stds}) > 5


def test_render_scene_reports_occlusion_and_generate_scene_forbids_it():
    under = ObjectSpec("square", "red", "large", "solid", (30, 30), 36, 0.0, "under")
    over = ObjectSpec("circle", "blue", "large", "solid", (31, 30), 40, 0.0, "over")
    s = render_scene([under, over], 60, 60, 0)
    assert s.objects[0].visible_fraction < 0.6
    assert s.objects[1].visible_fraction == pytest.approx(1.0)
    hidden = render_scene([ObjectSpec("circle", "red", "small", "solid", (-40, -40), 16, 0.0, "off")], 40, 40, 0)
    assert hidden.objects[0].visible_fraction == 0.0 and not hidden.objects[0].mask.any()
    assert hidden.objects[0].box == (0.0, 0.0, 0.0, 0.0)


def test_objects_rotate():
    a = render_scene([ObjectSpec("triangle", "red", "large", "solid", (30, 30), 36, 0.0, "a")], 60, 60, 0)
    b = render_scene([ObjectSpec("triangle", "red", "large", "solid", (30, 30), 36, math.pi, "a")], 60, 60, 0)
    assert not np.array_equal(a.objects[0].mask, b.objects[0].mask)
    ma, mb = a.objects[0].mask, b.objects[0].mask
    flipped = mb[::-1, ::-1]  # a half turn about the image centre is a point reflection
    assert (ma != flipped).sum() <= 0.05 * ma.sum()
    assert (ma != mb).sum() > 0.3 * ma.sum()


def test_sample_specs_keeps_objects_inside_the_image():
    rng = np.random.default_rng(0)
    for _ in range(30):
        specs = sample_specs(rng, 140, 100, 8)
        assert 1 <= len(specs) <= 8
        for sp in specs:
            r = sp.extent / 2
            assert r <= sp.center[0] <= 140 - r and r <= sp.center[1] <= 100 - r
            lo, hi = SIZE_EXTENT_PX[sp.size]
            assert lo <= sp.extent <= hi
        assert len({sp.track_id for sp in specs}) == len(specs)
    with pytest.raises(DatasetError, match=">= 0"):
        sample_specs(rng, 100, 100, -1)


def test_seed_splits_are_disjoint_and_validated():
    train = set(scene_seeds("train", 1000))
    held = set(scene_seeds("heldout", 1000))
    assert not train & held
    assert scene_seeds("heldout", 3, offset=5) == [min(held) + 5, min(held) + 6, min(held) + 7]
    assert max(scene_seeds("train", 10, offset=10**12 - 10)) < min(held)
    with pytest.raises(DatasetError, match="unknown split 'test'"):
        scene_seeds("test", 3)  # type: ignore[arg-type]
    with pytest.raises(DatasetError, match="offset"):
        scene_seeds("train", 5, offset=10**12 - 2)


def test_generate_scene_validates_object_counts():
    with pytest.raises(DatasetError, match="min_objects"):
        generate_scene(0, min_objects=0)
    with pytest.raises(DatasetError, match="min_objects"):
        generate_scene(0, min_objects=5, max_objects=4)
