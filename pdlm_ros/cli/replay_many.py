"""`pdlm-ros replay-many BAGS... --out DIR`: many bags on Ray, each replayed as `pdlm-ros replay` does, plus one merged
report (`pdlm_ros.eval.replay_many`)."""

from __future__ import annotations

import argparse
import sys

from pdlm_ros.cli._common import add_json_option, add_model_options, emit_json, setup_logging
from pdlm_ros.cli.replay import add_replay_options, replay_options

EXAMPLES = """examples:
  pdlm-ros replay-many bags/ --out many_out --workers 2                 # every bag in bags/, local Ray
  pdlm-ros replay-many 'fleet/2024-*/run_*' --out out --ray-address auto --workers 8 --gpus-per-worker 1
  pdlm-ros replay-many a.mcap b.bag c_dir --out out --preset tiny --no-cache

output: OUT/<bag>/ per bag as `pdlm-ros replay --out` writes it (bag/, report.json, report.html) plus done.json,
        OUT/report.json and OUT/report.html over all bags. A rerun skips the bags already done.
exit status: 0 when every bag was replayed (or was already done), 1 when any failed (listed in the reports)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bags", nargs="+", metavar="BAGS",
                   help="bags: rosbag2 directories (sqlite3 or MCAP), .mcap or ROS 1 .bag files, directories of "
                        "bags, or glob patterns (quoted)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (one subdirectory per bag)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="join this Ray cluster (e.g. auto, or HEAD_IP:6379); default: start a local Ray")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="captioning actors, each with its own copy of the model (default 2; a local Ray gets N CPUs)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="F",
                   help="GPUs per actor, e.g. 1 or 0.5 (default 0: CPU actors; > 0 runs the model on cuda)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="F",
                   help="CPUs Ray reserves per actor, also its torch threads (default 1)")
    p.add_argument("--batch-frames", type=int, default=4, metavar="N",
                   help="frames per actor call, captioned in shared denoising passes (default 4)")
    add_replay_options(p)
    p.add_argument("--overwrite", action="store_true", help="redo bags that are already done")
    add_model_options(p)
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch threads per actor (default: --cpus-per-worker, at least 1)")
    add_json_option(p)
    p.add_argument("-v", "--verbose", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pdlm_ros.errors import ConfigError
    from pdlm_ros.eval.replay_many import ManyOptions, ModelSpec, replay_many

    setup_logging(args.verbose)
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1 (got {args.threads})")
    options = replay_options(args)
    model = ModelSpec(checkpoint=args.checkpoint, preset=args.preset, backend=args.backend,
                      engine_path=args.engine_path, device=args.device, dtype=args.dtype, threads=args.threads)
    many = ManyOptions(workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                       cpus_per_worker=args.cpus_per_worker, batch_frames=args.batch_frames,
                       ray_address=args.ray_address, overwrite=args.overwrite,
                       progress=sys.stderr.isatty() and args.json != "-")
    result = replay_many(args.bags, args.out, options, model, many)
    from pdlm_ros.eval.replay_many import merged_report

    doc = merged_report(result)
    if args.json:
        emit_json({**doc, "reports": {"json": str(result.json_path), "html": str(result.html_path)}}, args.json)
    if args.json != "-":
        _print(doc)
        print(f"reports: {result.html_path}, {result.json_path}")
    if result.failed:
        print(f"error: {len(result.failed)} of {len(result.bags)} bags failed: "
              + "; ".join(f"{o.bag}: {o.error}" for o in result.failed), file=sys.stderr)
        return 1
    return 0


def _print(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = doc["totals"]
    table = Table(title=f"replay-many: {t['bags']} bags, {t['done']} replayed, {t['skipped']} already done, "
                        f"{t['failed']} failed ({doc['wall_s']:.1f} s)", title_justify="left")
    for col in ("bag", "status", "frames", "regions", "Pos / Neg / Avg %", "error"):
        table.add_column(col, overflow="fold")
    for b in doc["bags"]:
        s = b.get("scores")
        table.add_row(b["bag"], b["status"], str(b.get("frames", "")), str(b.get("regions", "")),
                      "" if not s else f"{s['pos']:.1f} / {s['neg'] if s['neg'] is None else round(s['neg'], 1)} / "
                                       f"{s['avg']:.1f}", b["error"])
    sc = t["scores"]
    if t["frames_per_s"] is not None:
        table.caption = f"this run: {t['frames_per_s']:.2f} frames/s, {t['regions_per_s']:.2f} regions/s" + (
            f"; all bags Pos / Neg / Avg {sc['pos']:.1f} / {sc['neg']} / {sc['avg']:.1f} %" if sc else "")
    Console(file=sys.stdout, width=None if sys.stdout.isatty() else 120).print(table)
