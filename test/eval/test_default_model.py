"""The bundled model, end to end on held-out scenes: fails if the model or the pipeline regresses.

Accuracy only: no timing is asserted. The thresholds are the issue's targets (Avg >= 96, Neg >= 97, boxes Avg >= 94,
shape >= 95 %) on fixed samples; the README gives the 300-region figures.
"""

import pytest

from pdlm_ros.captioner import DEFAULT_CHECKPOINT, Captioner
from pdlm_ros.data.scenes import generate_scene, scene_seeds
from pdlm_ros.eval.harness import evaluate
from pdlm_ros.eval.judges import RuleJudge

pytestmark = pytest.mark.skipif(not (DEFAULT_CHECKPOINT / "model.safetensors").is_file(),
                                reason="the bundled default model is not in this checkout")

SCENES = [generate_scene(s) for s in scene_seeds("heldout", 14, offset=777_000_000)]


@pytest.fixture(scope="module")
def default_captioner():
    return Captioner.load()


def test_bundled_model_describes_held_out_regions(default_captioner):
    report = evaluate(default_captioner, SCENES, RuleJudge(), mode="parallel", region_kind="mask", progress=False)
    s = report.scores
    assert s.regions >= 40
    assert s.avg >= 96.0, f"Avg {s.avg:.1f} (Pos {s.pos:.1f}, Neg {s.neg:.1f}, per attribute {s.per_attribute})"
    assert s.neg >= 97.0, f"Neg {s.neg:.1f}"
    for attr in ("color", "pattern", "size"):  # 97 % on the README's 300 regions; this sample has 62
        assert s.per_attribute[attr] >= 95.0, (attr, s.per_attribute)
    assert report.tpf == pytest.approx(report.tokens / report.nfe)


def test_bundled_model_with_boxes_instead_of_masks(default_captioner):
    report = evaluate(default_captioner, SCENES[:8], RuleJudge(), mode="parallel", region_kind="box", progress=False)
    assert report.scores.avg >= 94.0, f"Avg {report.scores.avg:.1f} {report.scores.per_attribute}"


def test_structured_mask_is_what_keeps_regions_apart(default_captioner):
    """The ablation (mask off at inference) must score clearly worse on scenes with several objects."""
    crowded = [s for s in SCENES if len(s.objects) >= 4][:5]
    on = evaluate(default_captioner, crowded, RuleJudge(), mode="parallel", progress=False).scores
    off = evaluate(default_captioner, crowded, RuleJudge(), mode="nomask", progress=False).scores
    assert off.avg < on.avg - 5.0, f"mask on {on.avg:.1f} vs off {off.avg:.1f}"


def _hand_drawn(kind: str, radius: float, rotation: float, background: tuple, colour: tuple) -> tuple:
    """One shape drawn with plain PIL calls (no anti-aliasing, no texture, no colour jitter: nothing of the scene
    renderer) at the centre of a 200 x 120 image; (image, mask)."""
    import math

    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (200, 120), background)
    layer = Image.new("L", img.size, 0)
    draw = ImageDraw.Draw(layer)
    cx, cy = 100, 60
    if kind == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    else:
        n = 3 if kind == "triangle" else 4
        start = rotation + (math.pi / 4 if kind == "square" else 0.0)
        draw.polygon([(cx + radius * math.cos(start + 2 * math.pi * k / n),
                       cy + radius * math.sin(start + 2 * math.pi * k / n)) for k in range(n)], fill=255)
    ImageDraw.Draw(img).bitmap((0, 0), layer, fill=colour)
    return np.asarray(img), np.asarray(layer) > 0


def test_bundled_model_names_plain_hand_drawn_shapes(default_captioner):
    """108 plain drawings a new user might try first: a red, green or blue circle, triangle or square, large (36 and
    42 px across), solid, in three rotations, on near-white and light grey.

    Shape, colour and size must be named right in >= 95 % of each shape's 36 drawings. The fill pattern is the weak
    word: the bundled model calls 9 of the 108 solid shapes dotted, all green squares (squares 27 of 36 solid, at the
    bar), so its bar is 75 % per shape, a regression guard, not a target met.
    """
    import math

    from pdlm_ros.types import RegionInput

    colours = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 225)}
    for kind in ("circle", "triangle", "square"):
        right = {"shape": 0, "colour": 0, "size": 0, "solid": 0}
        drawings = [(name, _hand_drawn(kind, radius, rotation, background, rgb))
                    for name, rgb in colours.items() for radius in (18, 21) for rotation in (-math.pi / 2, 0.0, 0.5)
                    for background in ((245, 245, 240), (200, 200, 200))]
        for name, (image, mask) in drawings:
            words = default_captioner.caption(image, [RegionInput(mask=mask)]).regions[0].caption.split()
            right["shape"] += kind in words
            right["colour"] += name in words
            right["size"] += "large" in words
            right["solid"] += "solid" in words
        n = len(drawings)
        for word in ("shape", "colour", "size"):
            assert right[word] >= 0.95 * n, (kind, right, n)
        assert right["solid"] >= 0.75 * n, (kind, right, n)


SHAPE_SAMPLE = [generate_scene(s) for s in scene_seeds("heldout", 40, offset=777_000_000)]  # 169 regions


def test_bundled_model_shape_accuracy_per_shape(default_captioner):
    """Shape, the attribute that used to fail (57 %, then 90 and 92 %), on a fixed sample of 169 held-out regions with masks.

    The bar is the 95 % target; this model reaches 97.6 % here (every shape >= 90 %: circles 33 of 36, the rest
    called hexagons), so losing five regions fails. On the README's 300 regions it reaches 97.0 %.
    """
    report = evaluate(default_captioner, SHAPE_SAMPLE, RuleJudge(), mode="parallel", region_kind="mask",
                      progress=False)
    assert report.scores.per_attribute["shape"] >= 95.0, report.confusion["shape"]
    for shape, row in report.confusion["shape"].items():
        total = sum(row.values())
        assert total >= 10 and row.get(shape, 0) / total >= 0.85, (shape, row)
