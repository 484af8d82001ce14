"""`pdlm-ros replay BAG --out OUT`: caption every image/detection pair of a bag; write a captioned bag and reports."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pdlm_ros.errors import BagError, ConfigError
from pdlm_ros.types import MODES
from pdlm_ros.cli._common import (add_json_option, add_model_options, add_threads_option, emit_json, load_captioner,
                                  set_threads, setup_logging)

EXAMPLES = """examples:
  pdlm-ros replay sample --out replay_out --annotations sample.annotations.json
  pdlm-ros replay run.mcap_dir --image-topic /cam/image_raw --detections-topic /tracker/detections --out out
  pdlm-ros replay sample --mask-topic /camera/instance_mask --out out_masks --preset tiny --annotated
  pdlm-ros replay recording.bag --out out --slop 0.02 --json out/summary.json   # ROS 1 bag, near-equal stamps

output: OUT/bag/ (rosbag2 MCAP: `ros2 bag play OUT/bag`), OUT/report.html, OUT/report.json,
        OUT/latency_vs_regions.png

a killed replay leaves OUT/bag readable with every frame committed before it (at most --checkpoint-every seconds
of work lost); `pdlm-ros replay ... --resume` with the same arguments continues it.
"""



def add_replay_options(p: argparse.ArgumentParser) -> None:
    """How pairs are formed and captioned: the options `replay` and `replay-many` share (`replay_options` reads
    them back)."""
    p.add_argument("--image-topic", default="/camera/image_raw", metavar="T",
                   help="sensor_msgs/Image or CompressedImage topic (default /camera/image_raw)")
    p.add_argument("--detections-topic", metavar="T",
                   help="vision_msgs/Detection2DArray topic (default /detections; with --mask-topic: none, or this "
                        "one copied along)")
    p.add_argument("--mask-topic", metavar="T",
                   help="instance-mask image topic; when given, regions come from it instead of the detections")
    p.add_argument("--mode", choices=MODES, default="auto",
                   help="decoding mode (default auto: parallel, or official for the released PerceptionDLM)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--sampler", choices=["global", "span", "threshold"],
                   help="official checkpoints: how tokens are committed (default global, the official re-masking)")
    p.add_argument("--refresh", type=int, help="official checkpoints, mode cached: refresh the cache every N steps")
    p.add_argument("--slop", type=float, default=0.0, metavar="SECONDS",
                   help="pair stamps that differ by at most this much (default 0: exact)")
    p.add_argument("--annotated", action="store_true", help="also write annotated images to the output bag")
    p.add_argument("--no-cache", action="store_true",
                   help="describe every region of every pair (default: reuse tracked regions' captions by the live "
                        "node's cache rules, cache.max_age 2 s and cache.iou_threshold 0.5)")


def replay_options(args: argparse.Namespace):  # noqa: ANN201 (ReplayOptions; imported lazily)
    """The ReplayOptions of `add_replay_options`'s flags."""
    from pdlm_ros.eval.replay import ReplayOptions

    detections = args.detections_topic or (None if args.mask_topic else "/detections")
    return ReplayOptions(image_topic=args.image_topic, detections_topic=detections, mask_topic=args.mask_topic,
                         mode=args.mode, steps=args.steps, annotated=args.annotated, slop_s=args.slop,
                         cache=not args.no_cache, sampler=args.sampler, refresh=args.refresh)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bag", metavar="BAG", help="input bag: rosbag2 directory (sqlite3 or MCAP) or ROS 1 .bag file")
    p.add_argument("--out", required=True, metavar="OUT", help="output directory")
    p.add_argument("--annotations", metavar="FILE",
                   help="ground truth (from make-sample-bag) to score captions ParaDLC-style")
    add_replay_options(p)
    p.add_argument("--overwrite", action="store_true", help="replace earlier replay output in OUT")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted replay in OUT (same bag, options and model); a new one if none")
    p.add_argument("--checkpoint-every", type=float, default=None, metavar="SECONDS",
                   help="commit the output bag after this much work (default 30; 0: after every frame); a kill "
                        "loses at most this much")
    add_model_options(p)
    add_threads_option(p)
    add_json_option(p)
    p.add_argument("-v", "--verbose", action="store_true")


def write_report_files(report, out: str):  # noqa: ANN001, ANN201 (ReplayReport -> ReportPaths; lazy imports)
    """write_reports, with a failed write (a full disk) as one line; a half-written report file is removed."""
    from pdlm_ros.eval.replay import OUTPUT_BAG, REPORT_FILES
    from pdlm_ros.eval.report import write_reports

    try:
        return write_reports(report, out)
    except OSError as err:
        for name in REPORT_FILES:
            (Path(out) / name).unlink(missing_ok=True)
        raise BagError(f"cannot write the reports in {out}: {err.strerror or err}; the captioned bag "
                       f"{Path(out) / OUTPUT_BAG} is complete. Free space, then rerun with --overwrite for the "
                       "reports") from None


def print_summary(rows: Sequence[tuple[str, str]], title: str = "replay summary") -> None:
    """The summary table on stdout (rich; plain text when stdout is not a terminal)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", overflow="fold")
    for k, v in rows:
        table.add_row(k, v)
    Console(file=sys.stdout, width=None if sys.stdout.isatty() else 120).print(table)


def run(args: argparse.Namespace) -> int:
    from pdlm_ros.data.bags import load_annotations
    from pdlm_ros.eval.replay import CHECKPOINT_S, OUTPUT_BAG, check_request, replay, replay_state
    from pdlm_ros.eval.report import build_report, summary_rows

    setup_logging(args.verbose)
    if args.overwrite and args.resume:
        raise ConfigError("--overwrite and --resume exclude each other: start again, or continue")
    checkpoint_s = CHECKPOINT_S if args.checkpoint_every is None else args.checkpoint_every
    if not checkpoint_s >= 0:
        raise ConfigError(f"--checkpoint-every must be >= 0 seconds (got {checkpoint_s})")
    annotations = load_annotations(args.annotations) if args.annotations else None  # fail before the model loads
    options = replay_options(args)
    # the bag, its topics and OUT are checked before the model loads (minutes for a large one)
    check_request(args.bag, args.out, options, overwrite=args.overwrite, resume=args.resume)
    set_threads(args.threads)
    captioner = load_captioner(args)
    try:
        result = replay(args.bag, args.out, captioner, options, overwrite=args.overwrite, resume=args.resume,
                        progress=sys.stderr.isatty(), checkpoint_s=checkpoint_s)
    except KeyboardInterrupt:
        state = replay_state(Path(args.out) / OUTPUT_BAG)
        if state is not None:
            print(f"replay interrupted: {Path(args.out) / OUTPUT_BAG} keeps {state.describe()}; rerun with --resume "
                  "to continue", file=sys.stderr)
        raise
    report = build_report(result, annotations)
    paths = write_report_files(report, args.out)
    if args.json:
        emit_json({**report.to_dict(), "reports": {"json": str(paths.json), "html": str(paths.html),
                                                   "plot": str(paths.plot)}}, args.json)
        if args.json == "-":
            return 0
    print_summary(summary_rows(report))
    print(f"captioned bag: {result.out_bag}  (ros2 bag play {result.out_bag})")
    print(f"reports: {paths.html}, {paths.json}")
    return 0
