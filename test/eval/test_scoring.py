"""Pos/Neg/Avg aggregation: hand-made judgements for the arithmetic, real scenes + RuleJudge end to end."""

from __future__ import annotations

import pytest

from pdlm_ros.data.scenes import generate_scene, scene_seeds
from pdlm_ros.errors import DatasetError
from pdlm_ros.eval.judges import Judgement, QuestionResult, RuleJudge, refused_judgement
from pdlm_ros.eval.questions import Question, build_questions
from pdlm_ros.eval.scoring import score_judgements, score_region


def _q(kind, attribute="color", value="red"):
    if kind == "positive":
        return Question(kind, attribute, value, "?", [(value, 1.0), ("other", -1.0), ("not mentioned", 0.0)])
    return Question(kind, attribute, value, "?", [("yes", -1.0), ("no", 1.0)])


def _r(question, right, failed=False):
    if failed:
        return QuestionResult(question, None, 0.0, False, failed=True, reason="down")
    if question.kind == "positive":
        return QuestionResult(question, 0 if right else 1, 1.0 if right else -1.0, right)
    return QuestionResult(question, 1 if right else 0, 1.0 if right else -1.0, right)


def _j(key, *results):
    return Judgement(key=key, caption="c", results=list(results))


def test_overall_is_the_mean_over_regions_not_pooled():
    a = _j("a", _r(_q("positive"), True), _r(_q("negative"), True))
    b = _j("b", _r(_q("positive", "shape"), True), _r(_q("positive", "size"), False),
           _r(_q("positive", "pattern"), False), _r(_q("negative"), False), _r(_q("interference"), True))
    s = score_judgements([a, b])
    assert s.pos == pytest.approx(100 * (1 + 1 / 3) / 2, abs=0.01)  # pooled would be 50
    assert s.neg == pytest.approx(100 * (1 + 0.5) / 2)
    assert s.avg == pytest.approx((s.pos + s.neg) / 2, abs=0.01)
    assert s.interference_neg == 100.0  # only region b has one, avoided
    c = s.counts
    assert (c.positive, c.positive_right, c.negative, c.negative_avoided, c.interference, c.interference_avoided) == (
        4, 2, 2, 1, 1, 1)
    assert c.questions == 7 and s.regions == 2
    assert s.per_attribute == {"color": 100.0, "shape": 100.0, "size": 0.0, "pattern": 0.0}
    # DLC-Bench style mean choice scores: region a pos 1, neg 1; region b pos (1-1-1)/3, neg (-1+1)/2.
    assert s.dlc_pos == pytest.approx(100 * (1 - 1 / 3) / 2, abs=0.01)
    assert s.dlc_neg == pytest.approx(50.0)


def test_regions_without_negatives_are_skipped_for_neg():
    a = _j("a", _r(_q("positive"), True))
    b = _j("b", _r(_q("positive"), False), _r(_q("negative"), True))
    s = score_judgements([a, b])
    assert s.pos == 50.0 and s.neg == 100.0 and s.interference_neg is None
    assert score_region(a).neg is None


def test_failures_count_and_are_never_right():
    j = _j("a", _r(_q("positive"), True), _r(_q("positive", "shape"), False, failed=True),
           _r(_q("negative"), False, failed=True))
    s = score_judgements([j])
    assert s.failures == 2 and s.counts.failed == 2
    assert s.pos == 50.0 and s.neg == 0.0


def test_refused_regions_score_nothing_and_are_counted():
    scene = generate_scene(11)
    qs = build_questions(scene, 0)
    ok = RuleJudge().judge(scene.objects[0].caption, qs, key="ok")
    refused = refused_judgement("bad", qs, "empty mask")
    s = score_judgements([ok, refused])
    assert s.refused == 1 and s.failures == len(qs)
    assert s.pos == 50.0 and s.neg == 50.0
    assert all("region refused: empty mask" == r.reason for r in refused.results)


def test_nothing_to_score_is_a_clear_error():
    with pytest.raises(DatasetError, match="no judged regions"):
        score_judgements([])
    with pytest.raises(DatasetError, match="none of the 1 regions has a positive question"):
        score_judgements([_j("a", _r(_q("negative"), True))])


def _heldout(n):
    return [generate_scene(s) for s in scene_seeds("heldout", n)]


def test_perfect_captioner_scores_100():
    judge = RuleJudge()
    judgements = [judge.judge(o.caption, build_questions(sc, i), key=f"{sc.seed}/{i}")
                  for sc in _heldout(25) for i, o in enumerate(sc.objects)]
    s = score_judgements(judgements)
    assert s.pos == s.neg == s.avg == 100.0
    assert s.interference_neg == 100.0
    assert s.per_attribute == {"shape": 100.0, "color": 100.0, "pattern": 100.0, "size": 100.0}
    assert s.counts.positive == 4 * len(judgements) and s.counts.interference > 0


def test_swapped_captions_lose_neg_through_interference():
    judge = RuleJudge()
    judgements = []
    for sc in _heldout(25):
        n = len(sc.objects)
        for i in range(n):
            neighbour = sc.objects[(i + 1) % n].caption  # the caption of another object of the same frame
            judgements.append(judge.judge(neighbour, build_questions(sc, i)))
    s = score_judgements(judgements)
    assert s.neg < 100.0 and s.interference_neg < 100.0
    assert s.pos < 100.0
    # Salient negatives avoid every value in the frame, so only interference questions catch a swapped caption.
    assert s.counts.negative_avoided == s.counts.negative
    assert s.counts.interference_avoided < s.counts.interference


def test_to_dict_is_json_ready():
    import json

    s = score_judgements([_j("a", _r(_q("positive"), True), _r(_q("interference"), False))])
    d = s.to_dict(per_region=True)
    json.dumps(d)
    assert d["pos"] == 100.0 and d["neg"] == 0.0 and d["counts"]["questions"] == 2
    assert d["per_region"][0]["key"] == "a"
