"""`pdlm-ros repair-bag DIR`: make a rosbag2 MCAP directory that a crash left behind readable by every tool."""

from __future__ import annotations

import argparse

from pdlm_ros.cli._common import add_json_option, emit_json, setup_logging

EXAMPLES = """examples:
  pdlm-ros repair-bag recording_2026_12_01     # killed `ros2 bag record`: no metadata.yaml, MCAP without footer
  pdlm-ros repair-bag out                      # a replay output directory (its bag/ is repaired)

A bag that opens as it is is left alone (a killed replay's unfinished segment is removed). Otherwise every complete
message is copied into new MCAP files with a new metadata.yaml; the original files are moved to DIR/damaged/.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="DIR", help="rosbag2 directory (or a replay output directory holding bag/)")
    add_json_option(p)
    p.add_argument("-v", "--verbose", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pdlm_ros.data.bag_writer import repair_bag
    from pdlm_ros.eval.replay import replay_state

    setup_logging(args.verbose)
    result = repair_bag(args.path)
    state = replay_state(result.path)
    doc = {"bag": str(result.path), "action": result.action, "messages": result.messages, "files": result.files,
           "damage": result.damage, "originals": str(result.kept) if result.kept else None,
           "replay": None if state is None else {"status": state.status, "frames": state.frames}}
    if args.json:
        emit_json(doc, args.json)
        if args.json == "-":
            return 0
    said = {"none": "opens as it is; nothing to repair", "cleaned": "opens; its unfinished segment was removed",
            "rewritten": f"rewritten; the original files are in {result.kept}"}[result.action]
    print(f"{result.path}: {said} ({result.messages} messages in {len(result.files)} files)")
    for note in result.damage:
        print(f"  {note}")
    if state is not None and state.unfinished:
        print(f"  an interrupted replay: {state.describe()}; rerun it with --resume to continue")
    return 0
