"""`pdlm::RegionAttention` as a TensorRT Quickly Deployable Plugin with an ahead-of-time Triton kernel.

Needs TensorRT >= 10.9 (`tensorrt.plugin` with `aot_impl`, and the ONNX parser's support for AOT Python plugins).
The kernel is compiled to PTX at engine build time and stored in the plan, so running the engine needs neither
Python nor this module (trtexec can run it). Older TensorRT (10.3 on JetPack 6) has no `tensorrt.plugin`: the engine
builder then uses the portable step graph instead (see docs/deployment.md for what that costs).

The functions below are plain Python so their parameter lists can be checked against the declared signature
without TensorRT installed; `register_plugin()` attaches the annotations TensorRT reads and registers them.
Names, namespace and attribute types all come from `signature.REGION_ATTENTION`.
"""

from __future__ import annotations

import logging
from typing import Any

from pdlm_ros.runtime.plugin.signature import REGION_ATTENTION

__all__ = ["MIN_TENSORRT", "plugin_supported", "describe", "autotune", "aot_impl", "register_plugin"]

log = logging.getLogger(__name__)

MIN_TENSORRT = (10, 9)  # first release with AOT QDPs and parser support for them
_registered = False


def _version_tuple(version: str) -> tuple[int, int]:
    parts = (version.split(".") + ["0", "0"])[:2]
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except ValueError:
        return (0, 0)


def plugin_supported(tensorrt_version: str) -> bool:
    """Whether this TensorRT version can build an engine with the AOT plugin."""
    return _version_tuple(tensorrt_version) >= MIN_TENSORRT


# -- the plugin, as TensorRT calls it ------------------------------------------------------------------------------
def describe(q: Any, k: Any, v: Any, prefix_k: Any, prefix_v: Any, num_heads: int, head_dim: int,
             scale: float) -> Any:
    """Output descriptor: same shape and dtype as q."""
    return q.like()


def autotune(q: Any, k: Any, v: Any, prefix_k: Any, prefix_v: Any, outputs: Any) -> list[Any]:
    """One dtype for all six tensors (five inputs, one output), linear layout."""
    import tensorrt.plugin as trtp

    types = "|".join(("FP32", "FP16", "BF16"))
    return [trtp.AutoTuneCombination(", ".join([types] * (len(REGION_ATTENTION.inputs) + 1)), "LINEAR")]


def aot_impl(q: Any, k: Any, v: Any, prefix_k: Any, prefix_v: Any, num_heads: int, head_dim: int, scale: float,
             outputs: Any, tactic: int) -> tuple[bytes, bytes, Any, Any]:
    """Compile the Triton kernel for this dtype and GPU; sizes stay symbolic, resolved per inference."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from pdlm_ros.runtime.engine_cache import device_capability
    from pdlm_ros.runtime.triton_attention import compile_aot

    names = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16"}
    if q.dtype not in names:
        raise TypeError(f"{REGION_ATTENTION.qualified_name}: unsupported dtype {q.dtype}")
    kernel = compile_aot(names[q.dtype], head_dim, scale, device_capability())
    n, h, s = q.shape_expr[0], q.shape_expr[1], q.shape_expr[2]
    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(s, kernel.config.block_m)
    launch.grid_y = n * h
    launch.block_x = kernel.num_warps * 32
    launch.shared_mem = kernel.shared_mem
    # int32 kernel arguments after the five input pointers, in KERNEL_ARGS order: N, H, S, P
    sizes = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in (n, h, s, prefix_k.shape_expr[1])])
    return kernel.name.encode(), kernel.ptx.encode(), launch, sizes


def register_plugin() -> bool:
    """Register the plugin with TensorRT's registry. False (and a log line) when TensorRT cannot host it."""
    global _registered
    if _registered:
        return True
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as err:
        log.info("TensorRT plugin %s not registered: %s", REGION_ATTENTION.qualified_name, err)
        return False
    if not plugin_supported(trt.__version__):
        log.warning("TensorRT %s predates AOT Python plugins (%d.%d); the portable step graph will be used",
                    trt.__version__, *MIN_TENSORRT)
        return False
    sig = REGION_ATTENTION
    kinds = {"int": int, "float": float}
    describe.__annotations__ = {**{name: trtp.TensorDesc for name in sig.input_names},
                                **{a.name: kinds[a.type] for a in sig.attributes}, "return": trtp.TensorDesc}
    # The other two keep no annotations: TensorRT checks any it finds, and these are strings here.
    autotune.__annotations__ = {}
    aot_impl.__annotations__ = {}
    trtp.register(sig.qualified_name)(describe)
    trtp.autotune(sig.qualified_name)(autotune)
    trtp.aot_impl(sig.qualified_name)(aot_impl)
    _registered = True
    return True
