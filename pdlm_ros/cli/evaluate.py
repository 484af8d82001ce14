"""`pdlm-ros eval`: caption held-out synthetic scenes and score them ParaDLC-style, or run a published benchmark.

Held-out scenes are `scene_seeds("heldout", ...)`; `--seed S` moves to a disjoint window of them (S x 1,000,000
seeds on) and seeds the captioner. `--bench paradlc|dlcbench` runs ParaDLC-Bench or DLC-Bench from their official
annotation files with their official judging protocol (`pdlm_ros.eval.published`) and writes a JSON and an HTML
report plus resumable caches into `--out`. Scores go to stdout (a table, or JSON with `--json`); progress and logs
to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from collections.abc import Iterator
from typing import Any

from pdlm_ros.errors import DatasetError, PDLMError

__all__ = ["add_arguments", "run", "EXAMPLES", "SEED_WINDOW"]

SEED_WINDOW = 1_000_000  # held-out seeds per --seed value; larger than any --regions anyone will run
DEFAULT_REGIONS = 400
DEFAULT_JUDGE_URL = "http://127.0.0.1:8000/v1"
DEFAULT_JUDGE_MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # DLC-Bench's reference judge

EXAMPLES = """examples:
  pdlm-ros eval --preset tiny --regions 40                 # quick structural check with a random tiny model
  pdlm-ros eval --checkpoint runs/pdlm --mode sequential --json out/seq.json
  pdlm-ros eval --judge openai --judge-url http://127.0.0.1:8000/v1 --judge-model meta-llama/Llama-3.1-8B-Instruct
  pdlm-ros eval --bench paradlc --annotations ParaDLC-Bench/annotations --images paradlc_images \\
      --checkpoint ckpt/PerceptionDLM --judge-url http://127.0.0.1:8000/v1 --judge-model Qwen/Qwen2.5-VL-7B-Instruct
  pdlm-ros eval --bench dlcbench --annotations DLC-Bench/annotations --images DLC-Bench/images \\
      --judge-url http://127.0.0.1:8007/v1 --judge-model llama3.1-8b
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pdlm_ros.cli._common import add_json_option, add_model_options, add_threads_option
    from pdlm_ros.eval.harness import MODES, REGION_KINDS

    add_model_options(parser)
    add_threads_option(parser)
    parser.add_argument("--regions", type=int, default=None, metavar="N",
                        help="number of regions to evaluate (default: 400 held-out regions; --bench: all)")
    parser.add_argument("--seed", type=int, default=0, help="held-out window and captioner seed (default: 0)")
    parser.add_argument("--mode", choices=MODES, default="auto",
                        help="decoding mode (default: auto, the model's own: parallel for this package's models, "
                             "official for the released checkpoint)")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps (default: the model's, usually the caption length)")
    parser.add_argument("--scenes", default="heldout", metavar="SET",
                        help="synthetic scenes to caption: heldout (drawn like the training scenes, unseen seeds; the "
                             "default), shift (held-out drawing styles the training renderer never uses, all kinds "
                             "in turn) or shift:KIND for one kind (" + ", ".join(_shift_kinds()) + ")")
    parser.add_argument("--region-kind", choices=REGION_KINDS, default="mask",
                        help="give the model masks or only boxes (default: mask)")
    parser.add_argument("--judge", choices=("rule", "openai"), default=None,
                        help="rule: exact offline judge (synthetic only); openai: an OpenAI-compatible LLM "
                             "(default: rule; --bench always uses an OpenAI-compatible judge)")
    parser.add_argument("--judge-url", "--endpoint", dest="judge_url", default=None, metavar="URL",
                        help="OpenAI-compatible base URL of the judge, e.g. http://127.0.0.1:8000/v1 (default for "
                             f"--judge openai: {DEFAULT_JUDGE_URL}); the key, if any, is read from OPENAI_API_KEY")
    parser.add_argument("--judge-model", default=None, metavar="NAME",
                        help=f"judge model name as the server knows it (default for --judge openai: "
                             f"{DEFAULT_JUDGE_MODEL}; required with --bench)")
    parser.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request")
    parser.add_argument("--judge-retries", type=int, default=3, help="extra attempts per request (backoff 1, 2, 4 s..)")
    bench = parser.add_argument_group("published benchmarks")
    bench.add_argument("--bench", choices=("paradlc", "dlcbench"),
                       help="run ParaDLC-Bench or DLC-Bench from their official annotation files")
    bench.add_argument("--annotations", metavar="DIR",
                       help="folder with the benchmark's annotations.json, class_names.json and qa.json")
    bench.add_argument("--images", metavar="DIR", help="folder with the benchmark's images (default: DIR/images)")
    bench.add_argument("--judge-concurrency", type=int, default=8, metavar="N",
                       help="judge requests in flight at once (default: 8)")
    bench.add_argument("--max-judge-calls", type=int, default=None, metavar="N",
                       help="hard limit on judge requests, retries included (default: the official scripts', 5000 "
                            "for paradlc and 1000 for dlcbench); cached answers do not count")
    bench.add_argument("--masks-per-pass", type=int, default=None, metavar="N",
                       help="masks per caption call (default: the official inference's, 1 for dlcbench and as many "
                            "as the model takes for paradlc; 0: as many as the model takes)")
    bench.add_argument("--out", metavar="DIR", default=None,
                       help="report and cache folder (default: out/eval-BENCH); a rerun continues from its caches")
    parser.add_argument("--details", action="store_true", help="include every region's caption and answers in JSON")
    add_json_option(parser)


def _shift_kinds() -> tuple[str, ...]:
    from pdlm_ros.data.scenes import STYLE_SHIFTS

    return tuple(STYLE_SHIFTS)


def _heldout_scenes(n: int, seed: int, scenes: str = "heldout") -> Iterator[Any]:
    from pdlm_ros.data.scenes import generate_scene, generate_shift_scene, scene_seeds

    kind = scenes.partition(":")[2] or None
    # Every scene has >= 1 object, so n seeds always give n regions.
    for s in scene_seeds("heldout", n, offset=seed * SEED_WINDOW):
        yield generate_scene(s) if scenes == "heldout" else generate_shift_scene(s, kind)[1]


def _check_scenes(scenes: str) -> str:
    """--scenes value -> the report's dataset name; DatasetError naming the choices otherwise."""
    if scenes == "heldout":
        return "synthetic-heldout"
    if scenes == "shift" or (scenes.startswith("shift:") and scenes[6:] in _shift_kinds()):
        return f"synthetic-{scenes.replace(':', '-')}"
    raise DatasetError(f"--scenes must be heldout, shift or shift:KIND with KIND one of {', '.join(_shift_kinds())} "
                       f"(got {scenes!r})")


def _confusion_table(d: dict[str, Any], attribute: str) -> Any:
    from rich.table import Table

    from pdlm_ros.eval.harness import NONE, SEVERAL

    rows = d["confusion"].get(attribute, {})
    values = list(rows)
    table = Table(title=f"{attribute}: true value (rows) -> value the caption named (columns), regions",
                  show_header=True)
    table.add_column("true")
    for v in values + [NONE, SEVERAL]:
        table.add_column(v, justify="right")
    table.add_column("right", justify="right")
    for v, row in rows.items():
        total = sum(row.values())
        cells = [str(row.get(c, 0)) or "0" for c in values + [NONE, SEVERAL]]
        table.add_row(v, *cells, f"{100.0 * row.get(v, 0) / total:.1f} %" if total else "n/a")
    return table


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
    table.add_row("regions / frames / questions", f"{d['regions']} / {d['frames']} / {d['questions']}")
    table.add_row("refused regions / failed questions", f"{d['refused']} / {d['failures']}")
    table.add_row("NFE per frame / TPF", f"{d['nfe']:.1f} / {d['tpf']:.2f}")
    table.add_row("seconds (caption / judge)", f"{d['seconds']:.1f} ({d['caption_seconds']:.1f} / "
                                               f"{d['judge_seconds']:.1f})")
    judge = d["judge"]
    table.add_row("judge", " ".join(v for v in (judge["name"], judge["model"], judge["endpoint"]) if v))
    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 140)
    console.print(table)
    if d.get("confusion"):
        console.print(_confusion_table(d, "shape"))


def _bench_table(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from pdlm_ros.eval.report import TABLE2_HEAD, table2_cells

    d = report.to_dict(details=False)
    table = Table(title=f"{d['benchmark']} | judge {d['judge']['model']}", show_header=True)
    for i, head in enumerate(TABLE2_HEAD):
        table.add_column(head, justify="left" if i < 2 else "right")
    table.add_row(*table2_cells(d["table"]))
    Console(file=sys.stdout, width=None if sys.stdout.isatty() else 160).print(table)  # pipes: never wrap headers
    s = d["scores"]
    print(f"{s['regions']} regions ({s['refused']} refused), {d['captioning']['images']} images, "
          f"{s['questions']} questions ({s['parse_failures']} replies named no choice), {s['recognized']} recognised; "
          f"{d['judge']['requests']} judge requests, {d['judge']['cached_answers']} answers from the cache")


def _model_id(args: argparse.Namespace) -> str:
    if args.checkpoint:
        source = str(Path(args.checkpoint).resolve())
    elif args.preset:
        source = f"preset:{args.preset}"
    else:
        source = "bundled"
    return f"{source}|{args.backend}|{args.device}"


def _run_bench(args: argparse.Namespace, progress: bool) -> Any:
    from pdlm_ros.cli._common import load_captioner
    from pdlm_ros.eval.dlcbench import open_benchmark
    from pdlm_ros.eval.harness import resolve_mode
    from pdlm_ros.eval.published import PROTOCOLS, JudgeClient, run_benchmark

    if args.judge == "rule":
        raise DatasetError("the published benchmarks are judged by an LLM: drop --judge rule and give --judge-url "
                           "and --judge-model")
    missing = [flag for flag, value in (("--annotations", args.annotations), ("--judge-url", args.judge_url),
                                        ("--judge-model", args.judge_model)) if not value]
    if missing:
        raise DatasetError(f"--bench {args.bench} needs {', '.join(missing)}")
    bench = open_benchmark(args.bench, args.annotations, args.images)  # read and checked before the model loads
    if args.regions is not None and args.regions < 1:
        raise DatasetError(f"--regions must be >= 1 (got {args.regions}): there is nothing to evaluate")
    if args.masks_per_pass is not None and args.masks_per_pass < 0:
        raise DatasetError(f"--masks-per-pass must be >= 0 (got {args.masks_per_pass})")
    bench.check_images(args.regions)
    client = JudgeClient(base_url=args.judge_url, model=args.judge_model, api_key=os.environ.get("OPENAI_API_KEY"),
                         timeout=args.judge_timeout, retries=args.judge_retries, concurrency=args.judge_concurrency,
                         max_calls=args.max_judge_calls or PROTOCOLS[args.bench].default_max_calls)
    client.check(PROTOCOLS[args.bench])  # before the model is loaded
    captioner = load_captioner(args)
    mode = resolve_mode(captioner, args.mode)
    out = Path(args.out or f"out/eval-{args.bench}")
    weights = args.checkpoint
    if weights is None and not args.preset:
        from pdlm_ros.captioner import DEFAULT_CHECKPOINT

        weights = DEFAULT_CHECKPOINT  # fingerprinted like any checkpoint: a retrained bundle gets new cache keys
    report = run_benchmark(captioner, bench, client, model_id=_model_id(args), checkpoint=weights,
                           mode=mode, steps=args.steps, cache_dir=out / "cache", limit=args.regions,
                           progress=progress, check=False,
                           masks_per_pass="official" if args.masks_per_pass is None else (args.masks_per_pass or None))
    from pdlm_ros.eval.report import write_benchmark_report

    try:
        paths = write_benchmark_report(report, out)
    except OSError as err:
        raise PDLMError(f"cannot write the benchmark report into {out}: {err}") from err
    print(f"report: {paths[0]} and {paths[1]}", file=sys.stderr)
    return report


def run(args: argparse.Namespace) -> int:
    from pdlm_ros.cli._common import emit_json, set_threads, setup_logging
    from pdlm_ros.eval.harness import evaluate, resolve_mode
    from pdlm_ros.eval.judges import Judge, OpenAIJudge, RuleJudge

    setup_logging()
    set_threads(args.threads)
    to_stdout = args.json == "-"
    progress = not to_stdout and sys.stderr.isatty()
    if args.bench:
        report = _run_bench(args, progress)
        if args.json is not None:
            _emit(emit_json, report.to_dict(details=args.details), args.json)
        if not to_stdout:
            _bench_table(report)
        return 0
    if args.annotations or args.images:
        raise DatasetError("--annotations and --images belong to --bench paradlc|dlcbench")
    dataset = _check_scenes(args.scenes)
    regions = DEFAULT_REGIONS if args.regions is None else args.regions
    if regions < 1:
        raise DatasetError(f"--regions must be >= 1 (got {regions}): there is nothing to evaluate")
    if args.seed < 0:
        raise DatasetError(f"--seed must be >= 0 (got {args.seed})")
    judge: Judge
    if (args.judge or "rule") == "rule":
        judge = RuleJudge()
    else:
        judge = OpenAIJudge(base_url=args.judge_url or DEFAULT_JUDGE_URL, model=args.judge_model or DEFAULT_JUDGE_MODEL,
                            api_key=os.environ.get("OPENAI_API_KEY"), timeout=args.judge_timeout,
                            retries=args.judge_retries)
    judge.check()

    from pdlm_ros.cli._common import load_captioner

    captioner = load_captioner(args)  # any backend; --seed picks held-out scenes, not weights
    report = evaluate(captioner, _heldout_scenes(regions, args.seed, args.scenes), judge,
                      mode=resolve_mode(captioner, args.mode), region_kind=args.region_kind, progress=progress,
                      limit=regions, seed=args.seed, steps=args.steps, dataset=dataset)
    if args.json is not None:
        _emit(emit_json, report.to_dict(details=args.details), args.json)
    if not to_stdout:
        _table(report)
    return 0


def _emit(emit_json: Any, doc: Any, target: str) -> None:
    try:
        emit_json(doc, target)
    except OSError as err:
        raise PDLMError(f"cannot write the JSON report to {target}: {err}") from err
