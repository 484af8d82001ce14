"""Options shared by several subcommands, declared once, and the one JSON/human output rule.

`--json` bare writes the JSON document to stdout; `--json PATH` writes it to a file. Logs and progress go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from pdlm_ros.errors import ConfigError

__all__ = ["add_model_options", "add_json_option", "emit_json", "load_captioner", "setup_logging", "add_threads_option",
           "set_threads"]


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="DIR", help="PerceptionDLM checkpoint directory (default: the bundled model)")
    p.add_argument("--preset", choices=["tiny", "small", "8b"], help="use a randomly initialised preset instead")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, auto)")
    p.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "tensorrt"],
                   help="torch (reference), onnxruntime (exported ONNX graphs) or tensorrt (engines)")
    p.add_argument("--engine-path", metavar="DIR",
                   help="export directory of `pdlm-ros export` for onnxruntime/tensorrt (default: export on demand)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                   help="weights dtype (auto: the checkpoint's; float32 for a float16 checkpoint on a CPU)")


DTYPE_NAMES = ("float32", "bfloat16", "float16")


def model_dtype(name: str, device: str):  # noqa: ANN201 (torch.dtype | None; torch imported lazily)
    """--dtype -> torch dtype; auto: None (the checkpoint's), except float32 on a CPU for a float16 checkpoint,
    which CPUs run through slow emulation (the loader decides; see Captioner.load)."""
    if name == "auto":
        return None
    import torch

    return getattr(torch, name)


def add_json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", nargs="?", const="-", metavar="FILE",
                   help="write JSON (bare: to stdout; with FILE: to that file)")


def emit_json(doc: Any, target: str) -> None:
    text = json.dumps(doc, indent=2)
    if target == "-":
        sys.stdout.write(text + "\n")
    else:
        try:
            with open(target, "w") as f:
                f.write(text + "\n")
        except OSError as err:
            raise ConfigError(f"cannot write the JSON file {target}: {err.strerror or err}") from None


def load_captioner(args: argparse.Namespace):  # noqa: ANN201
    from pdlm_ros.runtime import load_captioner as load_backend

    return load_backend(args.checkpoint, backend=getattr(args, "backend", "torch"),
                        engine_path=getattr(args, "engine_path", None), preset=args.preset, device=args.device,
                        dtype=model_dtype(getattr(args, "dtype", "auto"), args.device))


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


def add_threads_option(p: argparse.ArgumentParser, default: int | None = None) -> None:
    p.add_argument("--threads", type=int, default=default, metavar="N",
                   help="CPU threads for the model" + (f" (default {default})" if default else
                                                      " (default: torch's, one per core)"))


def set_threads(n: int | None) -> None:
    """Small models gain little from intra-op threads, and on a busy CPU extra threads spin-wait for cores that
    other work holds: on a loaded 2-core machine 2 threads ran the tiny model ~30x slower than 1."""
    if n is None:
        return
    if n < 1:
        raise ConfigError(f"--threads must be >= 1 (got {n})")
    import torch

    torch.set_num_threads(n)
