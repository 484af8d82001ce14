"""TensorRT runtime: deserialize the cached plans and run them by tensor name.

Per run: `set_input_shape` for every input (within the engine's profile), `set_tensor_address` for inputs and for
outputs sized from `get_tensor_shape`, then `execute_async_v3` on a CUDA stream. Two buffer owners:
- torch (`TrtEngine.run`): inputs and outputs are torch CUDA tensors on torch's current stream, so the sampler's
  tensors never leave the GPU and the caching allocator orders memory reuse after the launch;
- cuda-python (`TrtEngine.run_numpy`): numpy in, numpy out, for hosts without torch. NVIDIA's own samples moved
  from pycuda to cuda-python (TensorRT 10.13/10.14), so pycuda is not used.
TensorRT is imported only when an engine is opened.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pdlm_ros.errors import EngineError
from pdlm_ros.runtime import GraphCaptioner, load_export_tokenizer, read_manifest
from pdlm_ros.runtime.engine_cache import EngineCache
from pdlm_ros.runtime.tensorrt_build import BuildSettings, build_engines, import_tensorrt

__all__ = ["TrtEngine", "TensorRTBackend", "TensorRTCaptioner", "TRT_TO_TORCH", "TRT_TO_NUMPY"]

log = logging.getLogger(__name__)

# TensorRT DataType member names -> element types
TRT_TO_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                "INT32": torch.int32, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
TRT_TO_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT64": np.int64, "INT32": np.int32, "INT8": np.int8,
                "UINT8": np.uint8, "BOOL": np.bool_}


def _dtype_name(dt: Any) -> str:
    return str(dt).rsplit(".", 1)[-1]  # "DataType.HALF" -> "HALF"


class TrtEngine:
    """One deserialized engine with one execution context (one optimisation profile)."""

    def __init__(self, plan: bytes, name: str = "engine") -> None:
        trt = import_tensorrt()
        self.name = name
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self._logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise EngineError(f"TensorRT could not deserialize the {name} engine (built by another TensorRT "
                              "version or for another GPU?); rebuild it with `pdlm-ros build-engine --force-rebuild`")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"no execution context for the {name} engine (out of GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.inputs = [n for n in names if is_input[n]]
        self.outputs = [n for n in names if not is_input[n]]
        self.dtypes = {n: _dtype_name(self.engine.get_tensor_dtype(n)) for n in names}

    def _set_inputs(self, shapes: dict[str, tuple[int, ...]]) -> None:
        missing = sorted(set(self.inputs) - set(shapes))
        if missing:
            raise EngineError(f"{self.name} engine: missing inputs {missing} (takes {self.inputs})")
        for name in self.inputs:
            if not self.context.set_input_shape(name, shapes[name]):
                lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
                raise EngineError(f"{self.name} engine: input {name!r} shape {shapes[name]} is outside the built "
                                  f"profile {tuple(lo)}..{tuple(hi)}; rebuild with a wider range (e.g. --max-regions)")

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Torch-owned buffers on the current CUDA stream. Inputs are cast to the engine's dtypes."""
        self._set_inputs({n: tuple(t.shape) for n, t in feeds.items() if n in self.inputs})
        keep = []
        for name in self.inputs:
            t = feeds[name].to(device="cuda", dtype=TRT_TO_TORCH[self.dtypes[name]]).contiguous()
            keep.append(t)
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=TRT_TO_TORCH[self.dtypes[name]], device="cuda")
            self.context.set_tensor_address(name, outs[name].data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise EngineError(f"{self.name} engine: execute_async_v3 failed (see the TensorRT log)")
        return outs

    def run_numpy(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """cuda-python-owned buffers: numpy in, numpy out, synchronous. No torch involved."""
        from cuda.bindings import runtime as cudart

        def ok(result: Any) -> Any:
            err = result[0] if isinstance(result, tuple) else result
            if err != cudart.cudaError_t.cudaSuccess:
                raise EngineError(f"{self.name} engine: CUDA error {err}")
            return result[1] if isinstance(result, tuple) and len(result) > 1 else None

        self._set_inputs({n: tuple(a.shape) for n, a in feeds.items() if n in self.inputs})
        stream = ok(cudart.cudaStreamCreate())
        device_ptrs, hosts = [], {}
        try:
            for name in self.inputs:
                arr = np.ascontiguousarray(feeds[name], dtype=TRT_TO_NUMPY[self.dtypes[name]])
                ptr = ok(cudart.cudaMalloc(max(arr.nbytes, 1)))
                device_ptrs.append(ptr)
                ok(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
                self.context.set_tensor_address(name, ptr)
            out_ptrs = {}
            for name in self.outputs:
                host = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=TRT_TO_NUMPY[self.dtypes[name]])
                ptr = ok(cudart.cudaMalloc(max(host.nbytes, 1)))
                device_ptrs.append(ptr)
                hosts[name], out_ptrs[name] = host, ptr
                self.context.set_tensor_address(name, ptr)
            if not self.context.execute_async_v3(stream):
                raise EngineError(f"{self.name} engine: execute_async_v3 failed (see the TensorRT log)")
            for name, host in hosts.items():
                ok(cudart.cudaMemcpyAsync(host.ctypes.data, out_ptrs[name], host.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
            ok(cudart.cudaStreamSynchronize(stream))
        finally:
            for ptr in device_ptrs:
                cudart.cudaFree(ptr)
            cudart.cudaStreamDestroy(stream)
        return hosts


class TensorRTBackend:
    kind = "tensorrt"

    def __init__(self, export_dir: str | Path, settings: BuildSettings | None = None, *, force_rebuild: bool = False,
                 allow_rebuild: bool = True, device: str = "cuda") -> None:
        if not str(device).startswith("cuda"):
            raise EngineError(f"the tensorrt backend runs on a CUDA device, not {device!r}")
        self.export_dir = Path(export_dir)
        self.manifest = read_manifest(self.export_dir)
        self.built = build_engines(self.export_dir, settings, force_rebuild=force_rebuild,
                                   allow_rebuild=allow_rebuild)
        cache = EngineCache(self.export_dir / "trt")
        self.engines = {name: TrtEngine(cache.load(path, self.built.keys[name]), name)
                        for name, path in self.built.paths.items()}
        self.device = torch.device(device)
        log.info("TensorRT engines for %s: step variant %s (%s)", self.manifest.model_name, self.built.step_variant,
                 self.built.step_reason)

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.engines[graph].run(inputs)


class TensorRTCaptioner(GraphCaptioner):
    """`Captioner` whose model calls run TensorRT engines (built and cached on first use)."""

    @classmethod
    def load(cls, export_dir: str | Path, *, device: str = "cuda", precision: str | None = None,
             max_regions: int | None = None, workspace_mib: int | None = None, step_variant: str = "auto",
             plugin_library: str | None = None, force_rebuild: bool = False, allow_rebuild: bool = True,
             **_: Any) -> "TensorRTCaptioner":
        settings = BuildSettings(precision=precision, max_regions=max_regions, workspace_mib=workspace_mib,
                                 step_variant=step_variant, plugin_library=plugin_library)
        backend = TensorRTBackend(export_dir, settings, force_rebuild=force_rebuild, allow_rebuild=allow_rebuild,
                                  device=device)
        return cls(backend, load_export_tokenizer(Path(export_dir)), max_regions=backend.built.max_regions)
