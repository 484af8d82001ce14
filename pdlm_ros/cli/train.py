"""`pdlm-ros train --out DIR [--steps N] ...`: train a PerceptionDLM on generated scenes."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from pdlm_ros.cli._common import setup_logging
from pdlm_ros.train import TrainConfig, train

EXAMPLES = """examples:
  pdlm-ros train --out runs/tiny --steps 1500            # the bundled model's recipe (see README)
  pdlm-ros train --out runs/tiny --steps 1500 --resume   # continue after an interruption
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
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("-v", "--verbose", action="store_true")


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    ckpt = train(cfg, resume=args.resume)
    state = json.loads((ckpt / "trainer_state.json").read_text())["state"]
    Path(cfg.out, "curve.json").write_text(json.dumps({"curve": state["curve"], "evals": state["evals"]}, indent=1))
    print(f"checkpoint: {ckpt} (step {state['step']}, {state['seconds'] / 60:.1f} min)")
    return 0
