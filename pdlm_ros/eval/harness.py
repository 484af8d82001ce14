"""Caption, judge and score the synthetic held-out scenes (the published benchmarks: `pdlm_ros.eval.published`).

Every frame is captioned in ONE `Captioner.caption` call with all of its regions (what the node does), so the
reported NFE/TPF are those of parallel multi-region decoding in the chosen mode. NFE and tokens are summed from the
captioner's own per-frame stats; TPF = tokens / NFE over the run.

A region the captioner refuses keeps its questions, all failed (never right), and is counted in `refused`; a frame
whose caption call raises is logged and refused as a whole, and the run goes on.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from pdlm_ros.data.scenes import ATTRIBUTES, Scene
from pdlm_ros.errors import CheckpointError, ConfigError, DatasetError, PDLMError
from pdlm_ros.eval.judges import Judge, Judgement, QuestionResult, refused_judgement
from pdlm_ros.eval.questions import Question, build_questions
from pdlm_ros.eval.scoring import Scores, score_judgements
from pdlm_ros.types import CaptionerLike, RegionInput

__all__ = ["EvalReport", "evaluate", "resolve_mode", "MODES", "REGION_KINDS"]

log = logging.getLogger(__name__)

# The modes `pdlm-ros eval` offers; the harness passes any mode through and the captioner rejects unknown ones.
MODES = ("auto", "parallel", "sequential", "threshold", "nomask", "official", "ar")
REGION_KINDS = ("mask", "box")
RegionKind = Literal["mask", "box"]


@dataclass(frozen=True)
class _Frame:
    """One image with the regions to caption and what to ask about each."""

    image: np.ndarray
    regions: list[RegionInput]
    keys: list[str]
    questions: list[list[Question]]
    class_names: list[str | None]
    truth: list[dict[str, str]] = field(default_factory=list)  # synthetic scenes: each region's attributes


@dataclass(frozen=True)
class EvalReport:
    """The outcome of one evaluation run; `to_dict()` is what `pdlm-ros eval --json` prints."""

    dataset: str
    model: str
    mode: str
    region_kind: str
    judge: dict[str, str]
    scores: Scores
    judgements: list[Judgement] = field(repr=False)
    frames: int
    nfe: int  # decoder forward passes, summed over frames
    tokens: int  # caption tokens committed, summed over frames
    seconds: float  # whole run
    caption_seconds: float
    judge_seconds: float
    seed: int | None = None
    steps: int | None = None  # denoising steps asked for (None: the model's default)
    # attribute -> true value -> value the caption named (or NONE / SEVERAL) -> regions; synthetic scenes only
    confusion: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)

    @property
    def tpf(self) -> float:
        return self.tokens / self.nfe if self.nfe else 0.0

    def to_dict(self, details: bool = False) -> dict[str, Any]:
        s = self.scores
        out: dict[str, Any] = {
            "pos": s.pos, "neg": s.neg, "avg": s.avg,
            "interference_neg": s.interference_neg,
            "per_attribute": dict(s.per_attribute),
            "regions": s.regions, "frames": self.frames,
            "questions": s.counts.questions, "failures": s.failures, "refused": s.refused,
            "nfe": round(self.nfe / self.frames, 3) if self.frames else 0.0,  # per frame
            "nfe_total": self.nfe, "tokens": self.tokens, "tpf": round(self.tpf, 4),
            "judge": dict(self.judge), "mode": self.mode, "region_kind": self.region_kind,
            "model": self.model, "dataset": self.dataset, "seed": self.seed, "steps": self.steps,
            "seconds": round(self.seconds, 3), "caption_seconds": round(self.caption_seconds, 3),
            "judge_seconds": round(self.judge_seconds, 3),
            "dlc_score": {"pos": s.dlc_pos, "neg": s.dlc_neg, "avg": s.dlc_avg},
            "counts": s.to_dict()["counts"],
            "confusion": self.confusion,
        }
        if details:
            out["per_region"] = [_judgement_dict(j, r) for j, r in zip(self.judgements, s.per_region)]
        return out


def _result_dict(r: QuestionResult) -> dict[str, Any]:
    q = r.question
    return {"kind": q.kind, "attribute": q.attribute, "value": q.value, "question": q.text, "choice": r.choice_text,
            "score": r.score, "right": r.right, "failed": r.failed, "reason": r.reason, "reply": r.reply}


def _judgement_dict(j: Judgement, score: Any) -> dict[str, Any]:
    return {"key": j.key, "caption": j.caption, "class_name": j.class_name, "recognized": j.recognized,
            "refused": j.refused, "pos": score.pos, "neg": score.neg, "interference": score.interference,
            "questions": [_result_dict(r) for r in j.results]}


NONE, SEVERAL = "(none)", "(several)"  # a caption that names no value of an attribute, or more than one


def confusion_matrices(pairs: Iterable[tuple[dict[str, str], str]]) -> dict[str, dict[str, dict[str, int]]]:
    """(true attributes, caption) pairs -> attribute -> true value -> named value -> count. A refused region (empty
    caption) counts as naming nothing."""
    out: dict[str, dict[str, dict[str, int]]] = {a: {v: {} for v in values} for a, values in ATTRIBUTES.items()}
    for truth, caption in pairs:
        words = set(caption.split())
        for attr, value in truth.items():
            named = [v for v in ATTRIBUTES[attr] if v in words]
            key = named[0] if len(named) == 1 else (NONE if not named else SEVERAL)
            row = out[attr][value]
            row[key] = row.get(key, 0) + 1
    return out


def resolve_mode(captioner: CaptionerLike, mode: str) -> str:
    """`auto` -> the model's own first mode (parallel for native models, official for the released layout), so
    reports and cache keys name the mode that ran; other modes are checked by the captioner."""
    resolve = getattr(captioner, "resolve_mode", None)
    if callable(resolve):
        return str(resolve(mode))
    return "parallel" if mode == "auto" else mode


def _check_options(region_kind: str) -> None:
    if region_kind not in REGION_KINDS:
        raise ConfigError(f"unknown region kind {region_kind!r}; expected one of {', '.join(REGION_KINDS)}")


def _region(mask: np.ndarray, box: tuple[float, float, float, float], kind: str, region_id: str,
            index: int) -> RegionInput:
    if kind == "mask":
        return RegionInput(mask=mask, region_id=region_id, source_index=index)
    return RegionInput(box=box, region_id=region_id, source_index=index)


def _scene_frames(scenes: Iterable[Scene], region_kind: str, limit: int | None) -> Iterator[_Frame]:
    left = limit
    for scene in scenes:
        if left is not None and left <= 0:
            return
        objects = scene.objects if left is None else scene.objects[:left]
        if left is not None:
            left -= len(objects)
        yield _Frame(
            image=scene.image,
            regions=[_region(o.mask, o.box, region_kind, o.track_id, i) for i, o in enumerate(objects)],
            keys=[f"{scene.seed}/{o.track_id}" for o in objects],
            questions=[build_questions(scene, i) for i in range(len(objects))],
            class_names=[None] * len(objects),
            truth=[{a: getattr(o, a) for a in ATTRIBUTES} for o in objects],
        )


def _run(captioner: CaptionerLike, frames: Iterable[_Frame], judge: Judge, *, dataset: str, mode: str,
         region_kind: str, progress: bool, total: int | None, seed: int | None, steps: int | None) -> EvalReport:
    _check_options(region_kind)
    judge.check()  # fail before any captioning is spent when the judge is down
    start = time.perf_counter()
    judgements: list[Judgement] = []
    named: list[tuple[dict[str, str], str]] = []  # (true attributes, caption) for the confusion matrices
    nfe = tokens = n_frames = 0
    caption_s = judge_s = 0.0
    bar = tqdm(total=total, unit="region", desc=f"eval {mode}", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    try:
        for frame in frames:
            n_frames += 1
            reason = ""
            t0 = time.perf_counter()
            try:
                result = captioner.caption(frame.image, frame.regions, mode=mode, steps=steps)
            except (CheckpointError, ConfigError):
                raise  # the model or the options are wrong: every frame would fail the same way
            except PDLMError as err:
                log.warning("frame of %s refused: %s", frame.keys[0] if frame.keys else "?", err)
                result = None
                reason = str(err)
            caption_s += time.perf_counter() - t0
            if result is not None:
                if len(result.regions) != len(frame.regions):
                    raise PDLMError(f"captioner returned {len(result.regions)} captions for {len(frame.regions)} "
                                    "regions; it must return one per region, in order")
                nfe += int(result.stats.nfe)
                tokens += int(result.stats.tokens)
            t0 = time.perf_counter()
            for i, (key, questions, class_name) in enumerate(zip(frame.keys, frame.questions, frame.class_names)):
                if result is None:
                    judgements.append(refused_judgement(key, questions, reason, class_name or ""))
                    continue
                region = result.regions[i]
                if i < len(frame.truth):
                    named.append((frame.truth[i], region.caption))
                if region.error:
                    judgements.append(refused_judgement(key, questions, region.error, class_name or ""))
                else:
                    judgements.append(judge.judge(region.caption, questions, key=key, class_name=class_name))
            judge_s += time.perf_counter() - t0
            bar.update(len(frame.keys))
    finally:
        bar.close()
    if not judgements:
        raise DatasetError(f"the {dataset} dataset is empty: no regions to evaluate")
    scores = score_judgements(judgements)
    return EvalReport(
        dataset=dataset, model=str(getattr(captioner, "name", "")), mode=mode, region_kind=region_kind,
        judge=judge.describe(), scores=scores, judgements=judgements, frames=n_frames, nfe=nfe, tokens=tokens,
        seconds=time.perf_counter() - start, caption_seconds=caption_s, judge_seconds=judge_s, seed=seed,
        steps=steps, confusion=confusion_matrices(named) if named else {})


def evaluate(captioner: CaptionerLike, scenes: Iterable[Scene], judge: Judge, *, mode: str = "parallel",
             region_kind: RegionKind = "mask", progress: bool = True, limit: int | None = None,
             seed: int | None = None, steps: int | None = None, dataset: str = "synthetic-heldout") -> EvalReport:
    """Evaluate on synthetic scenes (all objects of a scene captioned in one call), at most `limit` regions.

    `steps` overrides the model's denoising steps (None: its default); `seed` is only recorded in the report.

    Questions always come from the whole scene, so interference questions cover objects cut by `limit` too.
    """
    if limit is not None and limit < 1:
        raise DatasetError(f"number of regions to evaluate must be >= 1 (got {limit})")
    total = limit
    if total is None and isinstance(scenes, (list, tuple)):
        total = sum(len(s.objects) for s in scenes)
    return _run(captioner, _scene_frames(scenes, region_kind, limit), judge, dataset=dataset,
                mode=mode, region_kind=region_kind, progress=progress, total=total, seed=seed, steps=steps)
