"""`pdlm-ros train --out DIR [--steps N] ...`: train a PerceptionDLM on generated scenes."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

from pdlm_ros.cli._common import setup_logging
from pdlm_ros.train import TrainConfig, train

EXAMPLES = """examples:
  # the bundled model's recipe (see README)
  pdlm-ros train --out runs/v4-diffusion --objective diffusion --antithetic --steps 6500 --lr 0.0015 \\
      --scenes-per-step 8 --augment 0.5 --eval-every 1000 --eval-scenes 16 --max-minutes 62 --threads 2
  # its autoregressive twin (pdlm-ros compare-ar measures one against the other)
  pdlm-ros train --out runs/v5-ar --objective ar --steps 8400 --lr 0.0015 --scenes-per-step 8 --augment 0.5 \\
      --eval-every 1000 --eval-scenes 16 --max-minutes 54 --threads 2
  # continue after an interruption or the time cap: the same command plus --resume (reads OUT/checkpoint)
  pdlm-ros train --out runs/v4-diffusion --objective diffusion --antithetic --steps 6500 --lr 0.0015 \\
      --scenes-per-step 8 --augment 0.5 --eval-every 1000 --eval-scenes 16 --max-minutes 62 --threads 2 --resume
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run directory (checkpoint/, curve.json)")
    defaults = TrainConfig(out="")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "out":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):  # a switch: `type=bool` would read "--x False" as True
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f"(default {default})")
            continue
        p.add_argument(flag, type=type(default), default=default, help=f"(default {default})")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint (an error if there is none or it is damaged)")
    p.add_argument("-v", "--verbose", action="store_true")


def write_training_record(ckpt: Path, command: str) -> dict:
    """Write CKPT/training.json: the command, machine, date, length, curve and held-out checks of the run, beside the
    weights, so a copied checkpoint (the bundled one) says how it was made. Returns the trainer state."""
    import torch

    from pdlm_ros.eval.bench import _cpu_model

    saved = json.loads((ckpt / "trainer_state.json").read_text())
    state = saved["state"]
    record = {"command": command,
              "machine": f"{os.cpu_count()}-core {platform.machine()} CPU ({_cpu_model()}), no GPU, torch "
                         f"{torch.__version__}", "date": datetime.date.today().isoformat(),
              "minutes": round(state["seconds"] / 60, 1), "steps": state["step"], "evals": state["evals"],
              "config": saved.get("config", {}), "curve": state["curve"]}
    (ckpt / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return state


def run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    cfg.validate(as_flags=True)  # ConfigError naming the flag, before anything is built or written
    ckpt = train(cfg, resume=args.resume)
    state = write_training_record(ckpt, "pdlm-ros train " + " ".join(shlex.quote(a) for a in sys.argv[2:]))
    Path(cfg.out, "curve.json").write_text(json.dumps({"curve": state["curve"], "evals": state["evals"]}, indent=1))
    print(f"checkpoint: {ckpt} (step {state['step']}, {state['seconds'] / 60:.1f} min)")
    return 0
