"""`pdlm-ros eval`: caption held-out synthetic scenes (or DLC-Bench) and score them ParaDLC-style.

Held-out scenes are `scene_seeds("heldout", ...)`; `--seed S` moves to a disjoint window of them (S x 1,000,000
seeds on) and seeds the captioner. Scores go to stdout (a table, or JSON with `--json`); progress and logs to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from typing import Any

from pdlm_ros.errors import DatasetError, PDLMError

__all__ = ["add_arguments", "run", "EXAMPLES", "SEED_WINDOW"]

SEED_WINDOW = 1_000_000  # held-out seeds per --seed value; larger than any --regions anyone will run

EXAMPLES = """examples:
  pdlm-ros eval --preset tiny --regions 40                 # quick structural check with a random tiny model
  pdlm-ros eval --checkpoint runs/pdlm --mode sequential --json out/seq.json
  pdlm-ros eval --judge openai --endpoint http://127.0.0.1:8000/v1 --judge-model meta-llama/Llama-3.1-8B-Instruct
  pdlm-ros eval --dlc-bench data/DLC-Bench --endpoint http://127.0.0.1:8000/v1   # DLC-Bench needs an LLM judge
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pdlm_ros.cli._common import add_json_option, add_model_options
    from pdlm_ros.eval.harness import MODES, REGION_KINDS

    add_model_options(parser)
    parser.add_argument("--regions", type=int, default=400, metavar="N",
                        help="number of held-out regions to evaluate (default: 400; DLC-Bench: at most all)")
    parser.add_argument("--seed", type=int, default=0, help="held-out window and captioner seed (default: 0)")
    parser.add_argument("--mode", choices=MODES, default="parallel", help="decoding mode (default: parallel)")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps (default: the model's, usually the caption length)")
    parser.add_argument("--region-kind", choices=REGION_KINDS, default="mask",
                        help="give the model masks or only boxes (default: mask)")
    parser.add_argument("--judge", choices=("rule", "openai"), default=None,
                        help="rule: exact offline judge (synthetic only); openai: an OpenAI-compatible LLM "
                             "(default: rule, or openai with --dlc-bench)")
    parser.add_argument("--endpoint", default="http://127.0.0.1:8000/v1",
                        help="OpenAI-compatible base URL for --judge openai (default: %(default)s); the key, if "
                             "any, is read from OPENAI_API_KEY")
    parser.add_argument("--judge-model", default="meta-llama/Llama-3.1-8B-Instruct",
                        help="judge model name (default: %(default)s, DLC-Bench's reference judge)")
    parser.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request")
    parser.add_argument("--judge-retries", type=int, default=3, help="extra attempts per question")
    parser.add_argument("--dlc-bench", metavar="DIR", help="evaluate on a DLC-Bench folder instead")
    parser.add_argument("--details", action="store_true", help="include every region's caption and answers in JSON")
    add_json_option(parser)


def _heldout_scenes(n: int, seed: int) -> Iterator[Any]:
    from pdlm_ros.data.scenes import generate_scene, scene_seeds

    # Every scene has >= 1 object, so n seeds always give n regions.
    for s in scene_seeds("heldout", n, offset=seed * SEED_WINDOW):
        yield generate_scene(s)


def _table(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    d = report.to_dict()
    table = Table(title=f"{d['dataset']} | {d['model'] or 'model'} | {d['mode']} | {d['region_kind']}",
                  show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f} %"

    table.add_row("Pos", pct(d["pos"]))
    table.add_row("Neg", pct(d["neg"]))
    table.add_row("Avg", pct(d["avg"]))
    table.add_row("Neg (interference only)", pct(d["interference_neg"]))
    for attribute, value in d["per_attribute"].items():
        table.add_row(f"{attribute} accuracy", pct(value))
    if d["dataset"] == "dlc-bench":
        ds = d["dlc_score"]
        table.add_row("DLC-Bench score Pos/Neg/Avg",
                      f"{ds['pos'] / 100:.3f} / {(ds['neg'] or 0) / 100:.3f} / {ds['avg'] / 100:.3f}")
    table.add_row("regions / frames / questions", f"{d['regions']} / {d['frames']} / {d['questions']}")
    table.add_row("refused regions / failed questions", f"{d['refused']} / {d['failures']}")
    table.add_row("NFE per frame / TPF", f"{d['nfe']:.1f} / {d['tpf']:.2f}")
    table.add_row("seconds (caption / judge)", f"{d['seconds']:.1f} ({d['caption_seconds']:.1f} / "
                                               f"{d['judge_seconds']:.1f})")
    judge = d["judge"]
    table.add_row("judge", " ".join(v for v in (judge["name"], judge["model"], judge["endpoint"]) if v))
    Console(file=sys.stdout).print(table)


def run(args: argparse.Namespace) -> int:
    from pdlm_ros.cli._common import emit_json, setup_logging
    from pdlm_ros.eval.harness import evaluate, evaluate_dlc_bench
    from pdlm_ros.eval.judges import Judge, OpenAIJudge, RuleJudge

    setup_logging()
    if args.regions < 1:
        raise DatasetError(f"--regions must be >= 1 (got {args.regions}): there is nothing to evaluate")
    if args.seed < 0:
        raise DatasetError(f"--seed must be >= 0 (got {args.seed})")
    judge_kind = args.judge or ("openai" if args.dlc_bench else "rule")
    if args.dlc_bench and judge_kind == "rule":
        raise DatasetError("DLC-Bench questions are free-form and need an LLM judge: use --judge openai "
                           "--endpoint URL")
    judge: Judge
    if judge_kind == "rule":
        judge = RuleJudge()
    else:
        judge = OpenAIJudge(base_url=args.endpoint, model=args.judge_model, api_key=os.environ.get("OPENAI_API_KEY"),
                            timeout=args.judge_timeout, retries=args.judge_retries)
    bench = None
    if args.dlc_bench:
        from pdlm_ros.eval.dlcbench import DLCBench

        bench = DLCBench(args.dlc_bench)  # read (and validated) before the model is loaded
    judge.check()

    from pdlm_ros.cli._common import load_captioner

    captioner = load_captioner(args)  # any backend; --seed picks held-out scenes, not weights
    to_stdout = args.json == "-"
    progress = not to_stdout and sys.stderr.isatty()
    if bench is not None:
        report = evaluate_dlc_bench(captioner, bench, judge, mode=args.mode, region_kind=args.region_kind,
                                    progress=progress, limit=args.regions, steps=args.steps)
    else:
        report = evaluate(captioner, _heldout_scenes(args.regions, args.seed), judge, mode=args.mode,
                          region_kind=args.region_kind, progress=progress, limit=args.regions, seed=args.seed,
                          steps=args.steps)

    if args.json is not None:
        try:
            emit_json(report.to_dict(details=args.details), args.json)
        except OSError as err:
            raise PDLMError(f"cannot write the JSON report to {args.json}: {err}") from err
    if not to_stdout:
        _table(report)
    return 0
