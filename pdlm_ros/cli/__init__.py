"""`pdlm-ros`: wiring only. Each subcommand lives in its own module with `add_arguments(parser)` and
`run(args) -> int`; errors the package raises on purpose become one "error: ..." line and exit code 1
(set PDLM_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

__all__ = ["main"]

# (subcommand, module, one-line help). Modules are imported only when their subcommand runs, so
# `pdlm-ros --help` stays fast and a missing optional dependency only affects its own subcommand.
COMMANDS: list[tuple[str, str, str]] = [
    ("demo", "demo", "make a sample bag and replay it with the bundled model (what `make demo` runs)"),
    ("caption", "caption", "caption the regions of one image"),
    ("train", "train", "train a PerceptionDLM on generated multi-region scenes"),
    ("eval", "evaluate", "score captions ParaDLC-style on a held-out generated set"),
    ("node", "node", "run the ROS 2 node (rclpy or ROS-less DDS transport)"),
    ("replay", "replay", "caption every image/detection pair of a bag and write a captioned bag + reports"),
    ("replay-many", "replay_many", "replay many bags on a Ray cluster (or a local Ray), with one merged report"),
    ("make-sample-bag", "sample_bag", "write a bag of generated moving scenes with tracked detections"),
    ("repair-bag", "repair_bag", "make a rosbag2 MCAP directory left by a crash readable (metadata, indexes)"),
    ("bench", "bench", "benchmark parallel vs sequential vs autoregressive decoding"),
    ("compare-ar", "compare_ar", "the diffusion model against its autoregressive twin: accuracy and speed"),
    ("compare-modes", "compare_modes", "accuracy and speed of every decoding mode of an official checkpoint"),
    ("bench-load", "bench_load", "peak memory of loading a sharded checkpoint, against its weight bytes"),
    ("export", "export", "export ONNX graphs (vision, prefix, denoising step)"),
    ("build-engine", "build_engine", "build TensorRT engines from exported ONNX graphs"),
    ("soak", "soak", "run the node over DDS under a camera overload and report memory and latency over time"),
]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    parser = argparse.ArgumentParser(
        prog="pdlm-ros",
        description="Describe every region of a camera frame in one parallel denoising pass (PerceptionDLM).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, module, help_ in COMMANDS:
        sub.add_parser(name, help=help_, add_help=False)
        modules[name] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, modules = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in modules:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_help(sys.stderr)
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name = argv[0]
    mod = importlib.import_module(f"pdlm_ros.cli.{modules[name]}")
    help_ = next(h for n, _, h in COMMANDS if n == name)
    sub = argparse.ArgumentParser(prog=f"pdlm-ros {name}", description=help_,
                                  epilog=getattr(mod, "EXAMPLES", None),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    mod.add_arguments(sub)
    rest = argv[1:]
    if hasattr(mod, "normalize_argv"):  # a subcommand's own spelling rules (values that start with "-")
        rest = mod.normalize_argv(rest)
    args = sub.parse_args(rest)
    from pdlm_ros.errors import PDLMError

    try:
        return int(mod.run(args) or 0)
    except PDLMError as err:
        if os.environ.get("PDLM_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
