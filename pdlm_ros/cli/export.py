"""`pdlm-ros export (--checkpoint DIR | --preset NAME) --out engines/NAME/`: the ONNX graphs and their sidecar."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from pdlm_ros.cli._common import add_json_option, emit_json, setup_logging
from pdlm_ros.errors import ConfigError, EngineError

EXAMPLES = """examples:
  pdlm-ros export --preset tiny --out engines/tiny/
  pdlm-ros export --checkpoint ckpt/ --out engines/pdlm-8b/ --variant both --dtype float16
  pdlm-ros export --preset tiny --out engines/tiny/ --verify --json

Writes vision.onnx, regions.onnx, prefix.onnx, step.onnx (portable) and/or step.trt.onnx (one pdlm::RegionAttention
node per layer, for TensorRT), export.json (shapes, opset, model hash, precision, variants), config.json and
tokenizer.json. Then: `pdlm-ros build-engine --onnx-dir DIR` on the GPU machine.
"""

DTYPES = ("float32", "float16", "bfloat16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", metavar="DIR", help="PerceptionDLM checkpoint directory (default: the bundled model)")
    src.add_argument("--preset", choices=["tiny", "small", "8b"], help="a randomly initialised preset instead")
    p.add_argument("--seed", type=int, default=0, help="seed of a preset's random weights")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created; files are overwritten)")
    p.add_argument("--variant", default="both", choices=["portable", "tensorrt", "both"],
                   help="portable: standard ops only; tensorrt: pdlm::RegionAttention plugin nodes (default: both)")
    p.add_argument("--dtype", choices=DTYPES, help="graph precision (default: the checkpoint's; float16 for TensorRT)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--max-regions", type=int, metavar="N", help="largest regions axis recorded for engine profiles")
    p.add_argument("--verify", action="store_true",
                   help="run the portable graphs in ONNX Runtime on a synthetic frame and compare with PyTorch")
    add_json_option(p)
    p.add_argument("-v", "--verbose", action="store_true")


def _verify(cap, out_dir: str) -> dict[str, float]:  # noqa: ANN001
    import numpy as np

    from pdlm_ros.model.regions import prepare_regions
    from pdlm_ros.runtime.onnxruntime_backend import OnnxRuntimeBackend, compare_with_torch
    from pdlm_ros.types import RegionInput

    rgb = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    if cap.layout == "official":
        from pdlm_ros.runtime.onnxruntime_backend import compare_official_with_torch

        masks = [np.zeros((240, 320), dtype=bool) for _ in range(2)]
        masks[0][20:200, 10:120] = True
        masks[1][30:160, 150:300] = True
        return compare_official_with_torch(cap.model, OnnxRuntimeBackend(out_dir), rgb, masks, cap.tokenizer)
    regions, _ = prepare_regions([RegionInput(box=(10, 20, 120, 200)), RegionInput(box=(150, 30, 300, 160)),
                                  RegionInput(box=(60, 150, 250, 235))], 320, 240)
    return compare_with_torch(cap.model, OnnxRuntimeBackend(out_dir), rgb, regions)


def run(args: argparse.Namespace) -> int:
    import torch

    from pdlm_ros.captioner import Captioner
    from pdlm_ros.runtime.onnx_export import export_model

    setup_logging(args.verbose)
    if args.verify and args.variant == "tensorrt":
        raise ConfigError("--verify runs the portable graphs; export them too (--variant portable or both)")
    cap = Captioner.load(args.checkpoint, preset=args.preset, seed=args.seed)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    print(f"exporting {cap.name} to {args.out} ...", file=sys.stderr)
    manifest = export_model(cap.model, args.out, tokenizer=cap.tokenizer, variant=args.variant, dtype=dtype,
                            opset=args.opset, max_regions=args.max_regions)
    verify = None
    if args.verify:
        verify = _verify(cap, args.out)
    if args.json:
        doc = dataclasses.asdict(manifest)
        doc.pop("config")
        if verify is not None:
            doc["verify_max_abs_diff"] = verify
        emit_json(doc, args.json)
    else:
        print(f"{'graph':<8} {'variant':<9} {'file':<16} {'MiB':>8} {'nodes':>6} {'custom':>6}")
        for g in manifest.graphs:
            print(f"{g.name:<8} {g.variant:<9} {g.file:<16} {g.bytes / 2**20:>8.2f} {g.nodes:>6} {g.custom_nodes:>6}")
        print(f"model {manifest.model_name}, hash {manifest.model_hash[:16]}, precision {manifest.precision}, "
              f"opset {manifest.opset}, ranges {manifest.dims}")
        if verify is not None:
            print("ONNX Runtime vs PyTorch, max |diff|: " + ", ".join(f"{k} {v:.2e}" for k, v in verify.items()))
    if verify is not None:
        tol = 1e-3 if manifest.precision == "float32" else 5e-2
        if verify["logits"] > tol:
            raise EngineError(f"exported step graph differs from PyTorch: max |logit diff| {verify['logits']:.3g} "
                              f"> {tol:g}")
    return 0
