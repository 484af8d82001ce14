"""Evaluation: ParaDLC-style questions on synthetic scenes, the published benchmarks, judges, Pos/Neg/Avg scoring.

`evaluate()` runs a captioner over synthetic held-out scenes and returns an `EvalReport`; `run_benchmark()` runs
ParaDLC-Bench or DLC-Bench (read by `open_benchmark()`) with the official judging protocol and returns a
`BenchReport`. `pdlm-ros eval` is a thin wrapper around both.
"""

from pdlm_ros.eval.dlcbench import (
    Benchmark,
    BenchItem,
    BenchSample,
    DLCBench,
    ParaDLCBench,
    open_benchmark,
    rle_decode,
    rle_encode,
)
from pdlm_ros.eval.harness import MODES, REGION_KINDS, EvalReport, evaluate
from pdlm_ros.eval.judges import Judge, Judgement, OpenAIJudge, QuestionResult, RuleJudge
from pdlm_ros.eval.published import PROTOCOLS, BenchReport, JudgeClient, run_benchmark
from pdlm_ros.eval.questions import Question, build_questions
from pdlm_ros.eval.scoring import BenchmarkScores, Counts, RegionScore, Scores, benchmark_scores, score_judgements

__all__ = [
    "MODES",
    "PROTOCOLS",
    "REGION_KINDS",
    "BenchItem",
    "BenchReport",
    "BenchSample",
    "Benchmark",
    "BenchmarkScores",
    "Counts",
    "DLCBench",
    "EvalReport",
    "Judge",
    "JudgeClient",
    "Judgement",
    "OpenAIJudge",
    "ParaDLCBench",
    "Question",
    "QuestionResult",
    "RegionScore",
    "RuleJudge",
    "Scores",
    "benchmark_scores",
    "build_questions",
    "evaluate",
    "open_benchmark",
    "rle_decode",
    "rle_encode",
    "run_benchmark",
    "score_judgements",
]
