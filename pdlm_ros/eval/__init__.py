"""Evaluation: ParaDLC-style questions on synthetic scenes, DLC-Bench reading, judges, Pos/Neg/Avg scoring.

`evaluate()` / `evaluate_dlc_bench()` run a captioner over a dataset and return an `EvalReport`; `pdlm-ros eval`
is a thin wrapper around them.
"""

from pdlm_ros.eval.dlcbench import DLCBench, DLCBenchItem, DLCBenchSample, rle_decode, rle_encode
from pdlm_ros.eval.harness import MODES, REGION_KINDS, EvalReport, evaluate, evaluate_dlc_bench
from pdlm_ros.eval.judges import Judge, Judgement, OpenAIJudge, QuestionResult, RuleJudge
from pdlm_ros.eval.questions import Question, build_questions
from pdlm_ros.eval.scoring import Counts, RegionScore, Scores, score_judgements

__all__ = [
    "MODES",
    "REGION_KINDS",
    "Counts",
    "DLCBench",
    "DLCBenchItem",
    "DLCBenchSample",
    "EvalReport",
    "Judge",
    "Judgement",
    "OpenAIJudge",
    "Question",
    "QuestionResult",
    "RegionScore",
    "RuleJudge",
    "Scores",
    "build_questions",
    "evaluate",
    "evaluate_dlc_bench",
    "rle_decode",
    "rle_encode",
    "score_judgements",
]
