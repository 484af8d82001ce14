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
