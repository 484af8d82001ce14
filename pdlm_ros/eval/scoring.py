"""Pos / Neg / Avg from judged questions, per region and overall (DLC-Bench's aggregation).

Per region: Pos = share of its positive questions answered right; Neg = share of its negative + interference
questions avoided; Interference = share of its interference questions avoided. Overall = mean over regions (a region
without questions of a kind is skipped for that kind, as DLC-Bench skips regions without negatives);
Avg = (Pos + Neg) / 2. The DLC-Bench score means (choice scores in [-1, 1], e.g. DAM-3B 0.510 / 0.830 / 0.670) are
kept beside them, so numbers on DLC-Bench compare with published ones. Reports use percentages.
Raw per-question counts are kept too: means over regions hide how many questions stand behind them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from pdlm_ros.errors import DatasetError
from pdlm_ros.eval.judges import Judgement, QuestionResult

__all__ = ["Counts", "RegionScore", "Scores", "score_region", "score_judgements", "BenchmarkScores", "benchmark_scores"]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _pct(value: float | None) -> float | None:
    return None if value is None else round(100.0 * value, 2)


@dataclass(frozen=True)
class Counts:
    """Raw question counts over all regions."""

    positive: int = 0
    positive_right: int = 0
    negative: int = 0  # salient negatives only
    negative_avoided: int = 0
    interference: int = 0
    interference_avoided: int = 0
    failed: int = 0  # questions the judge could not answer (or the captioner refused the region); never right

    @property
    def questions(self) -> int:
        return self.positive + self.negative + self.interference


@dataclass(frozen=True)
class RegionScore:
    """One region's shares in [0, 1] (None: the region had no question of that kind)."""

    key: str
    pos: float | None
    neg: float | None  # negative + interference
    interference: float | None
    dlc_pos: float | None  # mean choice score, DLC-Bench style
    dlc_neg: float | None
    failures: int
    refused: bool


def _split(results: Sequence[QuestionResult]) -> tuple[list[QuestionResult], list[QuestionResult],
                                                        list[QuestionResult]]:
    pos = [r for r in results if r.question.kind == "positive"]
    neg = [r for r in results if r.question.kind == "negative"]
    inter = [r for r in results if r.question.kind == "interference"]
    return pos, neg, inter


def score_region(judgement: Judgement) -> RegionScore:
    pos, neg, inter = _split(judgement.results)
    absent = neg + inter
    return RegionScore(
        key=judgement.key,
        pos=_mean([float(r.right) for r in pos]),
        neg=_mean([float(r.right) for r in absent]),
        interference=_mean([float(r.right) for r in inter]),
        dlc_pos=_mean([r.score for r in pos]),
        dlc_neg=_mean([r.score for r in absent]),
        failures=judgement.failures,
        refused=bool(judgement.refused),
    )


@dataclass(frozen=True)
class Scores:
    """Overall scores in percent; `per_region` holds the per-region shares behind them."""

    pos: float
    neg: float | None
    avg: float
    interference_neg: float | None
    dlc_pos: float
    dlc_neg: float | None
    dlc_avg: float
    per_attribute: dict[str, float]  # positive accuracy per attribute (synthetic questions only)
    counts: Counts
    regions: int
    refused: int
    per_region: list[RegionScore]

    @property
    def failures(self) -> int:
        return self.counts.failed

    def to_dict(self, per_region: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pos": self.pos, "neg": self.neg, "avg": self.avg, "interference_neg": self.interference_neg,
            "dlc_score": {"pos": self.dlc_pos, "neg": self.dlc_neg, "avg": self.dlc_avg},
            "per_attribute": dict(self.per_attribute),
            "counts": {**asdict(self.counts), "questions": self.counts.questions},
            "regions": self.regions, "refused": self.refused, "failures": self.failures,
        }
        if per_region:
            out["per_region"] = [asdict(r) for r in self.per_region]
        return out


def score_judgements(judgements: Sequence[Judgement]) -> Scores:
    """Aggregate judged regions; raises DatasetError when nothing can be scored."""
    if not judgements:
        raise DatasetError("no judged regions to score (empty dataset?)")
    regions = [score_region(j) for j in judgements]
    pos = _mean([r.pos for r in regions if r.pos is not None])
    if pos is None:
        raise DatasetError(f"none of the {len(regions)} regions has a positive question; nothing to score")
    neg = _mean([r.neg for r in regions if r.neg is not None])
    dlc_pos = _mean([r.dlc_pos for r in regions if r.dlc_pos is not None]) or 0.0
    dlc_neg = _mean([r.dlc_neg for r in regions if r.dlc_neg is not None])

    all_results = [r for j in judgements for r in j.results]
    p, n, i = _split(all_results)
    counts = Counts(
        positive=len(p), positive_right=sum(r.right for r in p),
        negative=len(n), negative_avoided=sum(r.right for r in n),
        interference=len(i), interference_avoided=sum(r.right for r in i),
        failed=sum(r.failed for r in all_results),
    )
    per_attribute: dict[str, float] = {}
    for attribute in dict.fromkeys(r.question.attribute for r in p if r.question.attribute):
        hits = [r.right for r in p if r.question.attribute == attribute]
        per_attribute[attribute] = round(100.0 * sum(hits) / len(hits), 2)

    return Scores(
        pos=_pct(pos) or 0.0,
        neg=_pct(neg),
        avg=_pct(pos if neg is None else (pos + neg) / 2) or 0.0,
        interference_neg=_pct(_mean([r.interference for r in regions if r.interference is not None])),
        dlc_pos=_pct(dlc_pos) or 0.0,
        dlc_neg=_pct(dlc_neg),
        dlc_avg=_pct(dlc_pos if dlc_neg is None else (dlc_pos + dlc_neg) / 2) or 0.0,
        per_attribute=per_attribute,
        counts=counts,
        regions=len(regions),
        refused=sum(r.refused for r in regions),
        per_region=regions,
    )


# ----------------------------------------------------------------------------------------- published benchmarks
@dataclass(frozen=True)
class BenchmarkScores:
    """ParaDLC-Bench / DLC-Bench scores by the official rules, in percent (the paper's Table 2 reports Avg in %).

    A question scores its chosen choice's score (positives: 1 right, 0.5 part mentioned, 0 not mentioned, -1 wrong;
    negatives: 1 not mentioned, 0 object absent, -1 mentioned); no parsable choice scores 0; when the recognition
    answer is not "Yes" every score of the region is capped at 0. Region Pos / Neg = mean over its positive /
    negative questions (Pos 0 without positives, Neg left out without negatives); Pos = mean of region Pos over all
    regions, Neg = mean of region Neg over regions that have negatives (0 if none has), Avg = (Pos + Neg) / 2.
    """

    pos: float
    neg: float
    avg: float
    regions: int
    regions_with_negatives: int
    recognized: int  # regions whose recognition answer was "Yes"
    questions: int
    parse_failures: int  # replies that named no choice (scored 0)
    refused: int  # regions the captioner refused (every question scored 0, none sent to the judge)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def benchmark_scores(judgements: Sequence[Judgement]) -> BenchmarkScores:
    if not judgements:
        raise DatasetError("no judged regions to score (empty benchmark?)")
    region_pos: list[float] = []
    region_neg: list[float] = []
    for j in judgements:
        pos = [r.score for r in j.results if r.question.kind == "positive"]
        neg = [r.score for r in j.results if r.question.kind != "positive"]
        region_pos.append(sum(pos) / len(pos) if pos else 0.0)
        if neg:
            region_neg.append(sum(neg) / len(neg))
    pos_mean = sum(region_pos) / len(region_pos)
    neg_mean = sum(region_neg) / len(region_neg) if region_neg else 0.0
    return BenchmarkScores(
        pos=100.0 * pos_mean, neg=100.0 * neg_mean, avg=100.0 * (pos_mean + neg_mean) / 2,
        regions=len(judgements), regions_with_negatives=len(region_neg),
        recognized=sum(j.recognized is True for j in judgements),
        questions=sum(len(j.results) for j in judgements),
        parse_failures=sum(r.failed for j in judgements if not j.refused for r in j.results),
        refused=sum(bool(j.refused) for j in judgements),
    )
