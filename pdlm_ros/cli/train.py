"""`pdlm-ros train --out DIR [--steps N] ...`: train a PerceptionDLM on generated scenes."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from pdlm_ros.cli._common import setup_logging
from pdlm_ros.train import TrainConfig, train

EXAMPLES = """examples:
  # the bundled model's recipe (see README)
  pdlm-ros train --out runs/tiny --steps 1800 --lr 0.0015 --scenes-per-step 8 --eval-every 450 \\
      --eval-scenes 16 --max-minutes 42 --threads 2
  # continue after an interruption or the time cap: the same command plus --resume (reads runs/tiny/checkpoint)
  pdlm-ros train --out runs/tiny --steps 1800 --lr 0.0015 --scenes-per-step 8 --eval-every 450 \\
      --eval-scenes 16 --max-minutes 42 --threads 2 --resume
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory (checkpoint/, curve.json)")
    defaults = TrainConfig(out="")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "out":
            continue
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(flag, type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name),
                       help=f"(default {getattr(defaults, f.name)})")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint (an error if there is none or it is damaged)")
    p.add_argument("-v", "--verbose", action="store_true")


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    cfg.validate(as_flags=True)  # ConfigError naming the flag, before anything is built or written
    ckpt = train(cfg, resume=args.resume)
    state = json.loads((ckpt / "trainer_state.json").read_text())["state"]
    Path(cfg.out, "curve.json").write_text(json.dumps({"curve": state["curve"], "evals": state["evals"]}, indent=1))
    print(f"checkpoint: {ckpt} (step {state['step']}, {state['seconds'] / 60:.1f} min)")
    return 0
