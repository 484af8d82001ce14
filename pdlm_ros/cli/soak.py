"""`pdlm-ros soak [--minutes 3] [--rate-multiplier 49 | --rate HZ] [--json FILE] [--ros-args ...]`."""

from __future__ import annotations

import argparse
import sys

from pdlm_ros.cli._common import add_json_option, emit_json

EXAMPLES = """examples:
  pdlm-ros soak --minutes 3 --rate-multiplier 49 --json soak.json      # the bundled model, best-effort inputs
  pdlm-ros soak --minutes 1 --rate 100 --width 640 --height 480 --reliable
  pdlm-ros soak --ros-args -p checkpoint:=ckpt/PerceptionDLM -p device:=cuda

The node runs in a child process over ROS-less Cyclone DDS on loopback (a domain of its own unless ROS_DOMAIN_ID is
set); this process is the camera and the subscriber. See pdlm_ros/eval/soak.py for what is measured.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--minutes", type=float, default=3.0, help="length of the soak phase (default 3)")
    rate = p.add_mutually_exclusive_group()
    rate.add_argument("--rate-multiplier", type=float, default=49.0, metavar="X",
                      help="camera rate = X times the node's measured capacity (default 49)")
    rate.add_argument("--rate", type=float, metavar="HZ", help="camera rate in frames per second instead")
    p.add_argument("--calibrate-seconds", type=float, default=20.0, metavar="S",
                   help="how long the node's capacity is measured, one frame at a time (default 20)")
    p.add_argument("--width", type=int, default=320, help="frame width in px (default 320)")
    p.add_argument("--height", type=int, default=240, help="frame height in px (default 240)")
    p.add_argument("--objects", type=int, default=3, help="tracked objects per frame (default 3)")
    p.add_argument("--window-seconds", type=float, default=10.0, metavar="S",
                   help="one row of the table every S seconds (default 10)")
    p.add_argument("--reliable", action="store_true",
                   help="reliable camera writers and input.qos: reliable (default best effort, as cameras publish)")
    p.add_argument("--threads", type=int, default=1, metavar="N",
                   help="the node's torch threads (OMP_NUM_THREADS; default 1: on a busy CPU more threads spin-wait; "
                        "0: torch's default)")
    p.add_argument("--node-log", metavar="FILE", help="write the node's log here (default: a temporary file)")
    add_json_option(p)
    p.add_argument("--ros-args", nargs=argparse.REMAINDER, default=[], metavar="ARGS",
                   help="more ROS arguments for the node (-p name:=value ...), everything after --ros-args")


def run(args: argparse.Namespace) -> int:
    from pdlm_ros.eval.soak import SoakConfig, format_table, run_soak

    cfg = SoakConfig(minutes=args.minutes, rate_multiplier=args.rate_multiplier, rate_hz=args.rate,
                     calibrate_s=args.calibrate_seconds, width=args.width,
                     height=args.height, objects=args.objects, window_s=args.window_seconds, reliable=args.reliable,
                     threads=args.threads or None,
                     node_args=tuple(args.ros_args), node_log=args.node_log)
    result = run_soak(cfg, progress=lambda text: print(text, file=sys.stderr, flush=True))
    print(format_table(result), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        emit_json(result.to_dict(), args.json)
    return 0 if result.exit_code == 0 else 1
