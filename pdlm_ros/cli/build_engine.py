"""`pdlm-ros build-engine --onnx-dir engines/NAME/`: TensorRT engines for an export, cached under `<dir>/trt/`."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from pdlm_ros.cli._common import add_json_option, emit_json, setup_logging

EXAMPLES = """examples:
  pdlm-ros build-engine --onnx-dir engines/pdlm-8b/
  pdlm-ros build-engine --onnx-dir engines/pdlm-8b/ --max-regions 8 --workspace 4096
  pdlm-ros build-engine --onnx-dir engines/tiny/ --fp16 --force-rebuild --json

Plans are keyed by GPU, compute capability, TensorRT version, model hash, precision, profile and builder settings;
a plan whose sidecar does not match is rebuilt (or refused with --no-rebuild). On TensorRT >= 10.9 the step engine
uses the pdlm::RegionAttention plugin (AOT Triton kernel); older TensorRT builds the portable step graph.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--onnx-dir", required=True, metavar="DIR", help="export directory (`pdlm-ros export --out`)")
    prec = p.add_mutually_exclusive_group()
    prec.add_argument("--fp16", dest="precision", action="store_const", const="float16",
                      help="build in float16 (a float32 export is lowered on TensorRT 10; export float16 instead)")
    prec.add_argument("--bf16", dest="precision", action="store_const", const="bfloat16", help="build in bfloat16")
    prec.add_argument("--fp32", dest="precision", action="store_const", const="float32", help="build in float32")
    p.add_argument("--max-regions", type=int, metavar="N", help="regions per pass the engines accept")
    p.add_argument("--workspace", type=int, metavar="MiB", help="builder workspace limit in MiB")
    p.add_argument("--opt-level", type=int, default=3, metavar="N", help="builder optimisation level 0..5 (default 3)")
    p.add_argument("--step-variant", default="auto", choices=["auto", "tensorrt", "portable"],
                   help="step graph: plugin (tensorrt), standard ops (portable), or the best available (auto)")
    p.add_argument("--plugin-lib", metavar="SO", help="C++ library registering pdlm::RegionAttention (TensorRT < 10.9)")
    reb = p.add_mutually_exclusive_group()
    reb.add_argument("--force-rebuild", action="store_true", help="rebuild every engine even when the cache is valid")
    reb.add_argument("--no-rebuild", action="store_true", help="fail instead of building a missing or stale engine")
    p.add_argument("--no-timing-cache", action="store_true", help="do not read or write the timing cache")
    add_json_option(p)
    p.add_argument("-v", "--verbose", action="store_true")


def run(args: argparse.Namespace) -> int:
    from pdlm_ros.runtime.tensorrt_build import BuildSettings, build_engines

    setup_logging(args.verbose)
    settings = BuildSettings(precision=args.precision, max_regions=args.max_regions, workspace_mib=args.workspace,
                             optimization_level=args.opt_level, step_variant=args.step_variant,
                             plugin_library=args.plugin_lib, timing_cache=not args.no_timing_cache)
    print(f"building TensorRT engines for {args.onnx_dir} ...", file=sys.stderr)
    built = build_engines(args.onnx_dir, settings, force_rebuild=args.force_rebuild,
                          allow_rebuild=not args.no_rebuild)
    if args.json:
        emit_json({"export_dir": str(built.export_dir), "step_variant": built.step_variant,
                   "step_reason": built.step_reason, "max_regions": built.max_regions,
                   "engines": {name: {"plan": str(path), "action": built.actions[name],
                                      "key": dataclasses.asdict(built.keys[name])}
                               for name, path in built.paths.items()}}, args.json)
        return 0
    for name, path in built.paths.items():
        size = path.stat().st_size / 2**20 if path.is_file() else 0.0
        print(f"{name:<8} {built.actions[name]:<40} {size:>8.1f} MiB  {path}")
    print(f"step graph: {built.step_variant} ({built.step_reason}); up to {built.max_regions} regions per pass")
    return 0
