"""`pdlm-ros bench-load`: peak host memory of loading a sharded checkpoint, against its weight bytes."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

EXAMPLES = """examples:
  pdlm-ros bench-load                          # a ~0.2 B-parameter bf16 checkpoint in 4 shards, in a temp dir
  pdlm-ros bench-load --dtype float32 --json load.json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the checkpoint and of the loaded model (default bfloat16)")
    p.add_argument("--shards", type=int, default=4, help="number of safetensors shards (default 4)")
    p.add_argument("--dir", metavar="DIR", help="where to write the checkpoint (default: a temporary directory)")
    from pdlm_ros.cli._common import add_json_option

    add_json_option(p)


def run(args: argparse.Namespace) -> int:
    import torch

    from pdlm_ros.cli._common import emit_json
    from pdlm_ros.errors import ConfigError
    from pdlm_ros.eval.load_bench import measure_load, medium_config, write_checkpoint

    if args.shards < 1:
        raise ConfigError(f"--shards must be >= 1 (got {args.shards})")
    with tempfile.TemporaryDirectory(prefix="pdlm-load-") as tmp:
        directory = Path(args.dir) if args.dir else Path(tmp) / "ckpt"
        weight_bytes = write_checkpoint(directory, medium_config(), getattr(torch, args.dtype), args.shards)
        m = measure_load(directory, weight_bytes, args.dtype)
    if args.json:
        emit_json(m.to_dict(), args.json)
    print(f"checkpoint {weight_bytes / 2**20:.0f} MiB ({args.dtype}, {args.shards} shards); loaded model "
          f"{m.param_bytes / 2**20:.0f} MiB")
    print(f"peak RSS {m.rss_before_mib:.0f} MiB before loading, {m.rss_loaded_mib:.0f} MiB loaded, "
          f"{m.rss_peak_mib:.0f} MiB with every weight read: +{m.rss_peak_mib - m.rss_before_mib:.0f} MiB = "
          f"{m.ratio:.2f}x the weight bytes")
    return 0
