"""ParaDLC-style questions: positives, salient negatives and interference, built from real rendered scenes."""

from __future__ import annotations

import pytest

from pdlm_ros.data.scenes import ATTRIBUTES, COLORS, PATTERNS, SHAPES, ObjectSpec, generate_scene, render_scene
from pdlm_ros.errors import DatasetError
from pdlm_ros.eval.questions import NEGATIVES_PER_OBJECT, build_questions


def _spec(shape, color, size, pattern, x, tid):
    extent = 18.0 if size == "small" else 34.0
    return ObjectSpec(shape, color, size, pattern, (x, 40.0), extent, 0.0, tid)


@pytest.fixture
def three_objects():
    return render_scene([
        _spec("circle", "red", "small", "solid", 20, "t"),
        _spec("circle", "blue", "small", "solid", 60, "o1"),
        _spec("star", "red", "large", "striped", 110, "o2"),
    ], 140, 80, 0)


def _by_kind(questions, kind):
    return [q for q in questions if q.kind == kind]


def test_positives_ask_for_each_own_attribute(three_objects):
    pos = _by_kind(build_questions(three_objects, 0), "positive")
    assert [(q.attribute, q.value) for q in pos] == [
        ("shape", "circle"), ("color", "red"), ("pattern", "solid"), ("size", "small")]
    for q in pos:
        assert sorted(score for _, score in q.choices) == [-1.0, 0.0, 1.0]
        assert q.choices[0] == (q.value, 1.0)
        assert q.value in q.choices[0][0]


def test_interference_lists_other_objects_values_the_target_lacks(three_objects):
    inter = _by_kind(build_questions(three_objects, 0), "interference")
    assert {(q.attribute, q.value) for q in inter} == {
        ("color", "blue"), ("shape", "star"), ("pattern", "striped"), ("size", "large")}
    assert len(inter) == 4  # red (shared with o2) and circle/solid/small (shared with o1) are not asked
    for q in inter:
        assert sorted(score for _, score in q.choices) == [-1.0, 1.0]
        assert q.value in q.text


def test_interference_is_seen_from_each_object(three_objects):
    inter = _by_kind(build_questions(three_objects, 2), "interference")  # the large striped red star
    assert {(q.attribute, q.value) for q in inter} == {
        ("shape", "circle"), ("color", "blue"), ("pattern", "solid"), ("size", "small")}


def test_negatives_are_absent_from_the_whole_frame_and_deterministic():
    for seed in range(40):
        scene = generate_scene(seed)
        present = {(a, getattr(o, a)) for o in scene.objects for a in ATTRIBUTES}
        for i in range(len(scene.objects)):
            qs = build_questions(scene, i)
            neg = _by_kind(qs, "negative")
            assert len(neg) == NEGATIVES_PER_OBJECT
            assert len({(q.attribute, q.value) for q in neg}) == NEGATIVES_PER_OBJECT
            for q in neg:
                assert q.value in ATTRIBUTES[q.attribute]
                assert (q.attribute, q.value) not in present
            assert qs == build_questions(scene, i)


def test_negatives_vary_between_objects_and_scenes():
    drawn = set()
    for seed in range(30):
        scene = generate_scene(seed)
        for i in range(len(scene.objects)):
            drawn.add(tuple((q.attribute, q.value) for q in _by_kind(build_questions(scene, i), "negative")))
    assert len(drawn) > 20


def test_a_frame_that_uses_every_value_leaves_no_negatives():
    colors = list(COLORS)
    others = [_spec(SHAPES[k % 6], colors[k], "small" if k % 2 else "large", PATTERNS[k % 3], 20 + 30 * k, f"o{k}")
              for k in range(8)]
    target = _spec("circle", "red", "small", "solid", 20, "t")
    scene = render_scene([target, *others], 280, 80, 0)
    qs = build_questions(scene, 0)
    assert _by_kind(qs, "negative") == []
    assert len(_by_kind(qs, "positive")) == 4
    # Every value except the target's own: 5 shapes, 7 colours, 2 patterns, 1 size.
    assert len(_by_kind(qs, "interference")) == 5 + 7 + 2 + 1


def test_single_object_scene_has_no_interference():
    scene = render_scene([_spec("hexagon", "green", "large", "dotted", 40, "t")], 80, 80, 0)
    qs = build_questions(scene, 0)
    assert _by_kind(qs, "interference") == []
    assert len(_by_kind(qs, "negative")) == NEGATIVES_PER_OBJECT


def test_index_out_of_range_is_a_clear_error(three_objects):
    with pytest.raises(DatasetError, match="object index 3 out of range for a scene with 3 objects"):
        build_questions(three_objects, 3)
