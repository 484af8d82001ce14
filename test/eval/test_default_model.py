"""The bundled model, end to end on held-out scenes: fails if the model or the pipeline regresses.

Accuracy only: no timing is asserted. The thresholds sit a little under the 300-region figures in the README, since
this sample is small (about 60 regions).
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
    assert s.avg >= 85.0, f"Avg {s.avg:.1f} (Pos {s.pos:.1f}, Neg {s.neg:.1f}, per attribute {s.per_attribute})"
    assert s.neg >= 90.0, f"Neg {s.neg:.1f}"
    assert report.tpf == pytest.approx(report.tokens / report.nfe)


def test_bundled_model_with_boxes_instead_of_masks(default_captioner):
    report = evaluate(default_captioner, SCENES[:8], RuleJudge(), mode="parallel", region_kind="box", progress=False)
    assert report.scores.avg >= 80.0, f"Avg {report.scores.avg:.1f} {report.scores.per_attribute}"


def test_structured_mask_is_what_keeps_regions_apart(default_captioner):
    """The ablation (mask off at inference) must score clearly worse on scenes with several objects."""
    crowded = [s for s in SCENES if len(s.objects) >= 4][:5]
    on = evaluate(default_captioner, crowded, RuleJudge(), mode="parallel", progress=False).scores
    off = evaluate(default_captioner, crowded, RuleJudge(), mode="nomask", progress=False).scores
    assert off.avg < on.avg - 5.0, f"mask on {on.avg:.1f} vs off {off.avg:.1f}"


def _hand_drawn() -> tuple:
    """A red circle, a green triangle and a blue square, large and solid, drawn with plain PIL calls on a light
    background: nothing of the scene renderer (no anti-aliasing, no texture, no colour jitter)."""
    import numpy as np
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (200, 120), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    shapes = []
    for kind, colour, bbox in (("circle", (220, 30, 30), (12, 40, 48, 76)), ("triangle", (30, 160, 50), None),
                               ("square", (40, 70, 225), (140, 42, 172, 74))):
        layer = Image.new("L", img.size, 0)
        ld = ImageDraw.Draw(layer)
        if kind == "circle":
            ld.ellipse(bbox, fill=255)
        elif kind == "triangle":
            ld.polygon([(100, 38), (80, 76), (120, 76)], fill=255)
        else:
            ld.rectangle(bbox, fill=255)
        draw.bitmap((0, 0), layer, fill=colour)
        shapes.append((kind, np.asarray(layer) > 0))
    return np.asarray(img), shapes


def test_bundled_model_names_plain_hand_drawn_shapes(default_captioner):
    from pdlm_ros.types import RegionInput

    image, shapes = _hand_drawn()
    res = default_captioner.caption(image, [RegionInput(mask=m) for _, m in shapes])
    captions = [r.caption for r in res.regions]
    for (kind, _), caption, colour in zip(shapes, captions, ("red", "green", "blue")):
        words = caption.split()
        assert kind in words and colour in words, captions


SHAPE_SAMPLE = [generate_scene(s) for s in scene_seeds("heldout", 40, offset=777_000_000)]  # 169 regions


def test_bundled_model_shape_accuracy_per_shape(default_captioner):
    """Shape, the attribute that used to fail (57 %), on a fixed sample of 169 held-out regions with masks.

    The bar is the level this model reaches (89 % overall on this sample, 90.3 % on the README's 300 regions; every
    shape >= 78 % here), a few points under, so a regression fails. It is below the 95 % target: circles and
    hexagons are still confused (the README's confusion matrix).
    """
    report = evaluate(default_captioner, SHAPE_SAMPLE, RuleJudge(), mode="parallel", region_kind="mask",
                      progress=False)
    assert report.scores.per_attribute["shape"] >= 85.0, report.confusion["shape"]
    for shape, row in report.confusion["shape"].items():
        total = sum(row.values())
        assert total >= 10 and row.get(shape, 0) / total >= 0.7, (shape, row)
