#!/usr/bin/env python3
"""Throughput of `pdlm-ros replay-many` over N sample bags against N sequential `pdlm-ros replay` runs, in one run.

Both sides run as the commands a user types, in fresh processes, on the same bags and model: the sequential side is
N `pdlm-ros replay BAG --out ...` one after the other (each loads the model), once per --threads value (1 and all
cores by default: on a busy machine either can be the faster), the Ray side one `pdlm-ros replay-many BAGS --out ...
--workers W` (a local Ray started and stopped inside it, one torch thread per worker). Wall times include everything
(process start, model loading, Ray start-up, reading and writing the bags). The captions of every output bag are
compared between the sides, and the ratio is the fastest sequential time / the replay-many time.

    .venv/bin/python scripts/bench_replay_many.py                      # 4 bags of 45 frames, bundled model
    .venv/bin/python scripts/bench_replay_many.py --bags 4 --frames 20 --preset tiny --json out.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "pdlm_ros.cli"]


def cpu_model() -> str:
    from pdlm_ros.eval.bench import _cpu_model

    return _cpu_model()


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def captions(out_bag: Path) -> list[tuple[int, list[str]]]:
    from rosbags.highlevel import AnyReader

    rows = []
    with AnyReader([out_bag]) as reader:
        conns = [c for c in reader.connections if c.topic == "/pdlm/captions"]
        for conn, _, raw in reader.messages(connections=conns):
            m = reader.deserialize(raw, conn.msgtype)
            rows.append((m.header.stamp.sec * 10**9 + m.header.stamp.nanosec, [r.caption for r in m.regions]))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bags", type=int, default=4, help="sample bags (default 4)")
    p.add_argument("--frames", type=int, default=45, help="frames per bag (default 45, the sample bag's)")
    p.add_argument("--workers", type=int, default=2, help="replay-many workers (default 2)")
    p.add_argument("--threads", default=f"1,{os.cpu_count() or 1}",
                   help="torch threads of the sequential replays, one sequential pass per value (default: 1 and all "
                        "cores)")
    p.add_argument("--preset", help="a random preset instead of the bundled model")
    p.add_argument("--checkpoint", help="a checkpoint instead of the bundled model")
    p.add_argument("--work", help="keep the bags and outputs here (default: a temporary directory)")
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args()
    model = (["--preset", args.preset] if args.preset else []) + (["--checkpoint", args.checkpoint]
                                                                   if args.checkpoint else [])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        bags = []
        for i in range(args.bags):
            bag = work / f"bag{i}"
            if not bag.exists():
                timed([*CLI, "make-sample-bag", str(bag), "--frames", str(args.frames), "--seed", str(i)])
            bags.append(bag)
        load_before = os.getloadavg()
        seq: dict[int, float] = {}
        for threads in dict.fromkeys(int(t) for t in args.threads.split(",")):
            seq[threads] = sum(timed([*CLI, "replay", str(bag), "--out", str(work / f"seq{threads}" / bag.name),
                                      "--overwrite", "--threads", str(threads), *model]) for bag in bags)
        many_s = timed([*CLI, "replay-many", *map(str, bags), "--out", str(work / "many"), "--overwrite",
                        "--workers", str(args.workers), *model])
        load_after = os.getloadavg()
        same = all(captions(work / f"seq{t}" / b.name / "bag") == captions(work / "many" / b.name / "bag")
                   for b in bags for t in seq)
        frames = sum(len(captions(work / "many" / b.name / "bag")) for b in bags)
    best = min(seq, key=seq.get)
    seq_s = seq[best]
    doc = {"date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "machine": f"{cpu_model()}, {os.cpu_count()} cores, {platform.platform()}",
           "load_average_before": [round(v, 2) for v in load_before],
           "load_average_after": [round(v, 2) for v in load_after],
           "model": args.checkpoint or args.preset or "bundled default", "bags": args.bags,
           "frames_per_bag": args.frames, "frames": frames, "workers": args.workers,
           "sequential_s_by_threads": {str(t): round(v, 2) for t, v in seq.items()}, "sequential_threads": best,
           "sequential_s": round(seq_s, 2), "replay_many_s": round(many_s, 2),
           "sequential_frames_per_s": round(frames / seq_s, 3), "replay_many_frames_per_s": round(frames / many_s, 3),
           "ratio": round(seq_s / many_s, 3), "identical_captions": same}
    print(f"{doc['date_utc']}  {doc['machine']}  load average {doc['load_average_before']} -> "
          f"{doc['load_average_after']}")
    print(f"model {doc['model']}; {args.bags} bags x {args.frames} frames ({frames} pairs)")
    for t, v in seq.items():
        print(f"{args.bags} sequential `replay` runs, {t} thread(s): {v:.1f} s, {frames / v:.2f} frames/s")
    print(f"one `replay-many` ({args.workers} workers): {many_s:.1f} s, {doc['replay_many_frames_per_s']:.2f} frames/s")
    print(f"ratio (fastest sequential time, {best} thread(s) / replay-many time): {doc['ratio']:.2f}; captions "
          f"identical: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
