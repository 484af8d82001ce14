"""The TensorRT side of `pdlm::RegionAttention`: its declared signature and its registrations.

Three ways to provide the plugin behind the one ONNX node (all registered under name RegionAttention, namespace
pdlm, version 1, so the parser finds whichever is loaded):
- TensorRT >= 10.9: the Quickly Deployable Plugin in `region_attention_qdp` (AOT Triton kernel, baked into the plan);
- any TensorRT 10.x: a C++ IPluginV3 shared library, loaded with `load_plugin_library` (none is shipped yet);
- neither: the portable step graph (standard ONNX ops) is built instead.
"""

from __future__ import annotations

from pathlib import Path

from pdlm_ros.errors import EngineError
from pdlm_ros.runtime.plugin.region_attention_qdp import MIN_TENSORRT, plugin_supported, register_plugin
from pdlm_ros.runtime.plugin.signature import REGION_ATTENTION, AttrSpec, PluginSignature, TensorSpec

__all__ = ["REGION_ATTENTION", "PluginSignature", "TensorSpec", "AttrSpec", "MIN_TENSORRT", "plugin_supported",
           "register_plugin", "load_plugin_library", "plugin_source_hash"]


def load_plugin_library(path: str | Path) -> None:
    """Load a C++ plugin library that registers pdlm::RegionAttention (e.g. for TensorRT 10.3 on JetPack 6)."""
    import tensorrt as trt

    path = Path(path)
    if not path.is_file():
        raise EngineError(f"plugin library not found: {path}")
    if trt.get_plugin_registry().load_library(str(path)) is None:
        raise EngineError(f"TensorRT could not load plugin library {path} (wrong TensorRT/CUDA build, or already "
                          "loaded)")


def plugin_source_hash() -> str:
    """sha256 of the kernel and plugin sources: an engine built with an older kernel must not be reused."""
    import hashlib

    from pdlm_ros.runtime import triton_attention
    from pdlm_ros.runtime.plugin import region_attention_qdp, signature

    h = hashlib.sha256()
    for mod in (triton_attention, region_attention_qdp, signature):
        h.update(Path(str(mod.__file__)).read_bytes())
    return h.hexdigest()
