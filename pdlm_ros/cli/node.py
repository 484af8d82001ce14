"""`pdlm-ros node`: run the ROS 2 captioning node on rclpy or on the ROS-less Cyclone DDS transport."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from pdlm_ros.ros.params import PARAMS

__all__ = ["add_arguments", "run", "EXAMPLES"]

EXAMPLES = """\
examples:
  pdlm-ros node                                  # rclpy when ROS 2 is sourced, else plain DDS
  pdlm-ros node --transport dds --params-file config/pdlm.yaml
  pdlm-ros node --transport dds --ros-args -r image:=/camera/image_raw -r detections:=/yolo/tracking \\
      -r __ns:=/robot -p preset:=tiny -p decoding.steps:=8
  ros2 run pdlm_ros pdlm_node --ros-args --params-file config/pdlm.yaml   # after colcon build

parameters (-p name:=value, or in a params file under /**: ros__parameters:):
""" + "\n".join(f"  {p.name:<22} {p.default!r:<14} {p.description}" for p in PARAMS)


_LEVELS = {"DEBUG": "DEBUG", "INFO": "INFO", "WARN": "WARNING", "WARNING": "WARNING", "ERROR": "ERROR",
           "FATAL": "CRITICAL", "CRITICAL": "CRITICAL"}


def _level(text: str) -> str:
    """A log level in ROS or Python spelling, any case -> the Python name."""
    level = _LEVELS.get(text.strip().upper())
    if level is None:
        raise argparse.ArgumentTypeError(f"unknown log level {text!r}; choose debug, info, warn, error or fatal")
    return level


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transport", choices=["auto", "rclpy", "dds"], default="auto",
                   help="middleware: rclpy (ROS 2 installed) or dds (ROS-less Cyclone DDS); auto prefers rclpy")
    p.add_argument("--params-file", action="append", default=[], metavar="FILE",
                   help="ROS 2 parameters YAML (same as --ros-args --params-file FILE); may repeat")
    p.add_argument("--log-level", default="INFO", type=_level, metavar="LEVEL",
                   help="log level of the node: debug, info, warn, error, fatal (any case)")
    p.add_argument("--ros-args", nargs=argparse.REMAINDER, default=[], metavar="ARGS",
                   help="ROS arguments: -r from:=to, -r __ns:=/ns, -r __node:=name, -p name:=value, "
                        "--params-file FILE (everything after --ros-args)")


def run(args: argparse.Namespace) -> int:
    level = args.log_level
    ros_args = list(args.ros_args)
    if "--log-level" in ros_args[:-1]:
        level = _LEVELS.get(ros_args[ros_args.index("--log-level") + 1].split(":=")[-1].upper(), level)
    logging.basicConfig(level=getattr(logging, level, logging.INFO), stream=sys.stderr,
                        format="[%(levelname)s] [%(asctime)s] [%(name)s]: %(message)s")
    for path in reversed(args.params_file):  # before --ros-args' own files and -p, as if given first there
        ros_args = ["--params-file", path, *ros_args]

    from pdlm_ros.ros.transport import make_transport

    transport = make_transport(args.transport)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # a signal asks the transport to stop, never raises mid-shutdown
        signal.signal(sig, lambda *_: stop.set())
    code = transport.run(ros_args, stop, log_level=level)
    from pdlm_ros.ros.node_core import abandoned_workers

    if abandoned_workers():  # a worker still inside a model call: skip the interpreter shutdown it would abort
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
