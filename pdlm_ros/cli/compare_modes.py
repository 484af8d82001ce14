"""`pdlm-ros compare-modes --checkpoint DIR`: accuracy and speed of every decoding mode of an official checkpoint."""

from __future__ import annotations

import argparse
import sys

from pdlm_ros.cli._common import add_json_option, add_threads_option, emit_json, set_threads, setup_logging

EXAMPLES = """examples:
  pdlm-ros compare-modes --checkpoint runs/tiny-official/checkpoint --regions 300 --json modes.json
  pdlm-ros compare-modes --checkpoint ~/models/PerceptionDLM --device cuda --modes official/global,isolated/global
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="official-layout checkpoint")
    p.add_argument("--regions", type=int, default=300, help="held-out regions scored per mode (default 300)")
    p.add_argument("--modes", metavar="MODE/SAMPLER,...",
                   help="pairs to run (default: official, isolated, cached x global, span, threshold)")
    p.add_argument("--refresh", type=int, default=4, help="mode cached: refresh the cache every N steps (default 4)")
    p.add_argument("--speed-regions", default="1,2,4,8,16", metavar="N,N,...",
                   help="regions per frame of the speed columns (default %(default)s)")
    p.add_argument("--speed-repeats", type=int, default=2, help="measured frames per speed cell (median; default 2)")
    p.add_argument("--frame-size", default="160x120", metavar="WxH", help="frame size of the speed columns")
    p.add_argument("--device", default="cpu", help="torch device")
    add_threads_option(p)
    add_json_option(p)
    p.add_argument("-v", "--verbose", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pdlm_ros.captioner import Captioner
    from pdlm_ros.cli.bench import parse_int_list, parse_size
    from pdlm_ros.errors import ConfigError
    from pdlm_ros.eval.official_modes import MODE_GRID, compare_modes
    from pdlm_ros.types import OFFICIAL_MODES, OFFICIAL_SAMPLERS

    setup_logging(args.verbose)
    set_threads(args.threads)
    if args.regions < 1 or args.refresh < 1 or args.speed_repeats < 1:
        raise ConfigError("--regions, --refresh and --speed-repeats must be >= 1")
    grid = MODE_GRID
    if args.modes:
        grid = []
        for item in args.modes.split(","):
            mode, _, sampler = item.strip().partition("/")
            if mode not in OFFICIAL_MODES or (sampler or "global") not in OFFICIAL_SAMPLERS:
                raise ConfigError(f"--modes item {item!r}: MODE/SAMPLER with MODE in {', '.join(OFFICIAL_MODES)} "
                                  f"and SAMPLER in {', '.join(OFFICIAL_SAMPLERS)}")
            grid.append((mode, sampler or "global"))
    cap = Captioner.load(args.checkpoint, device=args.device)
    speed_regions = parse_int_list(args.speed_regions, "--speed-regions")
    report = compare_modes(cap, regions=args.regions, grid=grid, refresh=args.refresh, speed_regions=speed_regions,
                           speed_repeats=args.speed_repeats, frame_size=parse_size(args.frame_size),
                           progress=sys.stderr.isatty(), log=lambda m: print(m, file=sys.stderr))
    if args.json:
        emit_json(report.to_dict(), args.json)
    m = report.machine
    print(f"{report.model}: {report.regions} held-out regions (masks, rule judge), speed on {report.frame_size[0]}x"
          f"{report.frame_size[1]} frames; {m.get('cpu', '')} {m.get('device', '')}, {m.get('torch_threads', '')} "
          f"threads; refresh {report.refresh}; {report.created}", file=sys.stderr if args.json == "-" else sys.stdout)
    print(report.table(speed_regions), file=sys.stderr if args.json == "-" else sys.stdout)
    return 0
