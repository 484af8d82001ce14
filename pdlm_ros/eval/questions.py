"""ParaDLC-style questions about one object of a synthetic scene, in DLC-Bench's multiple-choice form.

Three kinds, per target object:
- positive: one per attribute (shape, color, pattern, size), asking for the target's own value;
- negative ("salient negative"): 2 attribute values the target does not have and no other object of the frame has
  either, drawn deterministically from (scene seed, object index);
- interference: every attribute value of OTHER objects in the same frame that the target does not have
  (deduplicated). A caption that leaks a neighbour's attribute fails these; this is the failure parallel decoding
  must not introduce.

Choices carry DLC-Bench scores (model-anchors.md section 3): positives {correct 1, wrong attribute -1, not mentioned 0},
negatives {not mentioned 1, mentioned -1}. The first choice of a positive is the correct one; the last choice of a
negative/interference question is the avoided one. The same `Question` type carries DLC-Bench's own questions
(`pdlm_ros.eval.dlcbench`), whose attribute and value are empty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pdlm_ros.data.scenes import ATTRIBUTES, Scene
from pdlm_ros.errors import DatasetError

__all__ = ["Question", "QuestionKind", "build_questions", "NEGATIVES_PER_OBJECT"]

QuestionKind = Literal["positive", "negative", "interference"]
NEGATIVES_PER_OBJECT = 2

_NOUN = {"shape": "shape", "color": "color", "pattern": "fill pattern", "size": "size"}


@dataclass(frozen=True)
class Question:
    """One multiple-choice question about a region's caption. `choices` = [(text, score), ...]."""

    kind: QuestionKind
    attribute: str  # "shape" | "color" | "pattern" | "size"; "" for DLC-Bench questions
    value: str  # the attribute value asked about; "" for DLC-Bench questions
    text: str
    choices: list[tuple[str, float]] = field(default_factory=list)
    subtype: str = ""  # DLC-Bench's negative subtype ("negative part", "salient negative"), kept for reports

    @property
    def best_score(self) -> float:
        return max(score for _, score in self.choices)


def _positive(attribute: str, value: str) -> Question:
    noun = _NOUN[attribute]
    return Question(
        kind="positive", attribute=attribute, value=value,
        text=f"What {noun} does the description give the object?",
        choices=[(value, 1.0), (f"a {noun} other than {value}", -1.0), (f"the {noun} is not mentioned", 0.0)],
    )


def _absent(kind: QuestionKind, attribute: str, value: str) -> Question:
    claim = f"the object is a {value}" if attribute == "shape" else f"the object's {_NOUN[attribute]} is {value}"
    return Question(
        kind=kind, attribute=attribute, value=value,
        text=f"Does the description say that {claim}?",
        choices=[(f"yes, it says {claim}", -1.0), (f"no, {value} is not mentioned", 1.0)],
    )


def build_questions(scene: Scene, index: int) -> list[Question]:
    """Positive, negative and interference questions for `scene.objects[index]`, in that order.

    Negatives avoid the values of every object in the frame so they never repeat an interference question; in a
    frame crowded enough to use up the pool there are fewer than 2 (the question list says how many).
    """
    if not 0 <= index < len(scene.objects):
        raise DatasetError(f"object index {index} out of range for a scene with {len(scene.objects)} objects")
    target = scene.objects[index]
    own = {a: getattr(target, a) for a in ATTRIBUTES}
    questions = [_positive(a, own[a]) for a in ATTRIBUTES]

    others: list[tuple[str, str]] = []  # (attribute, value) of other objects the target lacks, first-seen order
    for j, obj in enumerate(scene.objects):
        if j == index:
            continue
        for a in ATTRIBUTES:
            value = getattr(obj, a)
            if value != own[a] and (a, value) not in others:
                others.append((a, value))

    pool = [(a, v) for a, values in ATTRIBUTES.items() for v in values if v != own[a] and (a, v) not in others]
    rng = np.random.default_rng([scene.seed, index])
    picks = rng.choice(len(pool), size=min(NEGATIVES_PER_OBJECT, len(pool)), replace=False) if pool else []
    questions += [_absent("negative", *pool[int(i)]) for i in sorted(picks)]
    questions += [_absent("interference", a, v) for a, v in others]
    return questions
