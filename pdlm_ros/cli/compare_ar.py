"""`pdlm-ros compare-ar --twin DIR`: the diffusion model against its autoregressive twin, accuracy and speed."""

from __future__ import annotations

import argparse
import sys

from pdlm_ros.cli._common import add_json_option, add_threads_option, emit_json, set_threads, setup_logging

EXAMPLES = """examples:
  pdlm-ros train --out runs/ar --objective ar ...        # the twin: same preset and data, causal, next token
  pdlm-ros compare-ar --twin runs/ar/checkpoint --regions 300 --json twin.json
  pdlm-ros compare-ar --checkpoint runs/tiny/checkpoint --twin runs/ar/checkpoint --speed-regions 1,4,8,16
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--twin", required=True, metavar="DIR", help="autoregressive twin checkpoint (objective ar)")
    p.add_argument("--checkpoint", metavar="DIR", default=None,
                   help="diffusion checkpoint (default: the bundled model)")
    p.add_argument("--regions", type=int, default=300, help="held-out regions scored per row (default 300)")
    p.add_argument("--speed-regions", default="1,4,8,16", metavar="N,N,...",
                   help="regions per frame of the speed columns (default %(default)s)")
    p.add_argument("--speed-frames", type=int, default=5,
                   help="timed frames per speed cell, after one warm-up frame (default 5)")
    add_threads_option(p)
    add_json_option(p)
    p.add_argument("-v", "--verbose", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pdlm_ros.captioner import Captioner
    from pdlm_ros.cli.bench import parse_int_list
    from pdlm_ros.eval.ar_compare import compare_twin

    setup_logging(args.verbose)
    set_threads(args.threads)
    speed_regions = parse_int_list(args.speed_regions, "--speed-regions")
    twin = Captioner.load(args.twin)
    diffusion = Captioner.load(args.checkpoint)
    report = compare_twin(diffusion, twin, regions=args.regions, speed_regions=speed_regions,
                          speed_frames=args.speed_frames, progress=sys.stderr.isatty(),
                          log=lambda m: print(m, file=sys.stderr))
    if args.json:
        emit_json(report.to_dict(), args.json)
    out = sys.stderr if args.json == "-" else sys.stdout
    m = report.machine
    print(f"{report.diffusion} vs {report.twin}: {report.regions} held-out regions (masks, rule judge); speed: median "
          f"ms per frame and caption tokens/s over {report.speed_frames} frames; {m.get('cpu', '')}, "
          f"{m.get('torch_threads', '')} threads; {report.created}", file=out)
    print(report.table(speed_regions), file=out)
    return 0
