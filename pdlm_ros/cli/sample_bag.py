"""`pdlm-ros make-sample-bag OUT`: a bag of generated moving scenes with tracked detections, plus its annotations."""

from __future__ import annotations

import argparse
import sys

from pdlm_ros.cli._common import add_json_option, emit_json, setup_logging
from pdlm_ros.errors import ConfigError

EXAMPLES = """examples:
  pdlm-ros make-sample-bag sample                       # rosbag2 MCAP directory + sample.annotations.json
  pdlm-ros make-sample-bag sample_db --storage sqlite3 --frames 30 --fps 10
  pdlm-ros make-sample-bag sample.bag --ros1            # ROS 1 bag file
  pdlm-ros replay sample --out replay_out --annotations sample.annotations.json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", metavar="OUT", help="bag to write: a rosbag2 directory, or a .bag file with --ros1")
    p.add_argument("--frames", type=int, default=45, help="number of camera frames (default 45)")
    p.add_argument("--fps", type=float, default=15.0, help="camera rate in Hz (default 15)")
    p.add_argument("--seed", type=int, default=0, help="scene seed: the same seed writes the same bag (default 0)")
    p.add_argument("--objects", type=int, default=3, help="moving objects (default 3)")
    p.add_argument("--size", default="160x120", metavar="WxH", help="image size in px (default 160x120)")
    p.add_argument("--storage", choices=["mcap", "sqlite3"], default="mcap", help="rosbag2 storage (default mcap)")
    p.add_argument("--ros1", action="store_true", help="write a ROS 1 bag file instead of a rosbag2 directory")
    p.add_argument("--no-mask", action="store_true", help="leave out the /camera/instance_mask topic")
    p.add_argument("--overwrite", action="store_true", help="replace OUT and its annotations if they exist")
    add_json_option(p)
    p.add_argument("-v", "--verbose", action="store_true")


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size must look like WIDTHxHEIGHT, e.g. 160x120 (got {text!r})") from None
    return w, h


def run(args: argparse.Namespace) -> int:
    from pdlm_ros.data.bags import SampleBagSpec, write_sample_bag

    setup_logging(args.verbose)
    width, height = parse_size(args.size)
    spec = SampleBagSpec(frames=args.frames, fps=args.fps, seed=args.seed, width=width, height=height,
                         objects=args.objects, storage=args.storage, ros1=args.ros1, with_mask=not args.no_mask)
    bag = write_sample_bag(args.out, spec, overwrite=args.overwrite, progress=sys.stderr.isatty())
    doc = {"bag": str(bag.bag), "annotations": str(bag.annotations), "storage": bag.storage, "frames": bag.frames,
           "detections": bag.detections, "topics": bag.topics}
    if args.json:
        emit_json(doc, args.json)
        if args.json == "-":
            return 0
    print(f"wrote {bag.bag} ({bag.storage}, {bag.frames} frames at {spec.fps:g} Hz, {bag.detections} detections)")
    print(f"annotations: {bag.annotations}")
    for role, topic in bag.topics.items():
        print(f"  {role:<10} {topic}")
    print(f"next: pdlm-ros replay {bag.bag} --out {bag.bag.with_name(bag.bag.name.removesuffix('.bag') + '_replay')}"
          f" --annotations {bag.annotations}")
    return 0
