"""`pdlm-ros demo`: make a small sample bag, replay it with the bundled model, show captions and where things went.

What `make demo` runs. It needs no ROS and no GPU, and finishes in a few minutes on 2 CPU cores. When the bundled
model files are missing it says so and uses the tiny random preset, whose captions are noise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pdlm_ros.cli._common import add_threads_option, setup_logging
from pdlm_ros.errors import CheckpointError

EXAMPLES = """examples:
  pdlm-ros demo                      # writes ./pdlm-demo/
  pdlm-ros demo --out /tmp/demo --frames 10
"""

SHOWN_FRAMES = 3  # frames whose captions are printed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="pdlm-demo", metavar="DIR",
                   help="demo directory; its sample bag and replay output are replaced on each run (default "
                        "./pdlm-demo)")
    p.add_argument("--frames", type=int, default=20, help="frames in the sample bag (default 20)")
    p.add_argument("--objects", type=int, default=3, help="moving objects (default 3)")
    p.add_argument("--preset", choices=["tiny"], help="use the tiny random model instead of the bundled one")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    add_threads_option(p, default=1)  # robust on a busy machine; see set_threads
    p.add_argument("-v", "--verbose", action="store_true")


def _captioner(args: argparse.Namespace):  # noqa: ANN202
    from pdlm_ros.captioner import Captioner

    if args.preset:
        return Captioner.load(preset=args.preset, device=args.device), True
    try:
        return Captioner.load(device=args.device), False
    except CheckpointError as err:
        print(f"note: {err}", file=sys.stderr)
        print("note: using the tiny preset instead: its captions come from a RANDOM, untrained model and mean "
              "nothing; they only show the pipeline at work", file=sys.stderr)
        return Captioner.load(preset="tiny", device=args.device), True


def run(args: argparse.Namespace) -> int:
    from pdlm_ros.cli._common import set_threads
    from pdlm_ros.cli.replay import print_summary
    from pdlm_ros.data.bags import SampleBagSpec, load_annotations, write_sample_bag
    from pdlm_ros.eval.replay import ReplayOptions, replay
    from pdlm_ros.eval.report import build_report, summary_rows, write_reports

    setup_logging(args.verbose)
    set_threads(args.threads)
    t0 = time.perf_counter()
    out = Path(args.out)
    progress = sys.stderr.isatty()
    print(f"[1/3] writing a sample bag ({args.frames} frames, {args.objects} moving objects) ...", file=sys.stderr)
    sample = write_sample_bag(out / "sample", SampleBagSpec(frames=args.frames, objects=args.objects),
                              overwrite=True, progress=progress)
    print("[2/3] loading the model ...", file=sys.stderr)
    captioner, random_model = _captioner(args)
    print(f"[3/3] replaying with {captioner.name} ...", file=sys.stderr)
    options = ReplayOptions(image_topic=sample.topics["image"], detections_topic=sample.topics["detections"],
                            annotated=True)
    result = replay(sample.bag, out / "replay", captioner, options, overwrite=True, progress=progress)
    truth = load_annotations(sample.annotations)
    report = build_report(result, truth)
    paths = write_reports(report, out / "replay")

    for frame in result.frames[:SHOWN_FRAMES]:
        print(f"frame {frame.index} (stamp {frame.stamp_ns} ns, {frame.latency_ms:.0f} ms):")
        for c in frame.regions:
            track = truth.tracks.get(c.region_id)
            text = f"ERROR {c.error}" if c.error else repr(c.caption)
            print(f"  track {c.region_id} [{c.class_id}]: {text}"
                  + (f"   (truth: {track.caption!r})" if track else ""))
    if random_model:
        print("(captions above come from a random model: they show the pipeline, not the model's quality)")
    print_summary(summary_rows(report), title="demo replay summary")
    print(f"sample bag:    {sample.bag}  (annotations {sample.annotations})")
    print(f"captioned bag: {result.out_bag}  (ros2 bag play {result.out_bag})")
    print(f"reports:       {paths.html}  {paths.json}")
    print(f"demo took {time.perf_counter() - t0:.0f} s")
    return 0
