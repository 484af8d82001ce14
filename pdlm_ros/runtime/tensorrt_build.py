"""Build TensorRT engines from an export directory: one plan per graph, cached by `EngineKey`.

TensorRT is imported only inside the functions that need it; the planning half (profiles, step variant, typing,
keys) is plain Python and is tested without it.

Choices:
- Typing: the graphs carry their precision (export with `--dtype float16`), and the network is built strongly
  typed, so TensorRT keeps that precision instead of picking per layer. A float32 export with `--fp16/--bf16`
  falls back to the weakly typed builder flags on TensorRT 10 (deprecated since 10.12) and is refused on 11+.
- Step graph: the `tensorrt` variant (pdlm::RegionAttention, AOT Triton plugin) when TensorRT >= 10.9 can register
  the plugin, else the `portable` variant (standard ops), with the reason logged. JetPack 6 (TensorRT 10.3) always
  takes the portable graph unless a C++ plugin library is given (`plugin_library`).
- Profiles: one per engine, from the export's dynamic ranges (regions 1..max, views 1..max_tiles+1, prefix length
  accordingly); `max_regions` lowers the regions maximum (activation memory scales with it).
- Timing cache: one file per GPU and TensorRT version next to the plans; rebuilds reuse the measured tactics.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pdlm_ros.errors import ConfigError, EngineError
from pdlm_ros.runtime import GRAPHS, GraphInfo, Manifest, read_manifest
from pdlm_ros.runtime.engine_cache import DeviceInfo, EngineCache, EngineKey, current_device

__all__ = ["BuildSettings", "profile_shapes", "effective_dims", "choose_step_variant", "typing_mode", "engine_key",
           "BuiltEngines", "build_engines", "build_plan", "import_tensorrt"]

log = logging.getLogger(__name__)

PRECISIONS = ("float32", "float16", "bfloat16")
ProfileShapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


@dataclass(frozen=True)
class BuildSettings:
    precision: str | None = None  # None: the export's precision; else one of PRECISIONS
    max_regions: int | None = None  # regions per pass the engines accept (default: the export's maximum)
    workspace_mib: int | None = None  # builder workspace limit (None: TensorRT's default, all device memory)
    optimization_level: int = 3  # TensorRT builder optimisation level 0..5
    step_variant: str = "auto"  # auto | tensorrt | portable
    plugin_library: str | None = None  # a C++ pdlm::RegionAttention plugin (e.g. for TensorRT < 10.9)
    timing_cache: bool = True

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.max_regions is not None and self.max_regions < 1:
            raise ConfigError(f"max_regions must be >= 1 (got {self.max_regions})")
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise ConfigError(f"workspace must be >= 1 MiB (got {self.workspace_mib})")
        if not 0 <= self.optimization_level <= 5:
            raise ConfigError(f"optimization_level must be in 0..5 (got {self.optimization_level})")
        if self.step_variant not in ("auto", "tensorrt", "portable"):
            raise ConfigError(f"step_variant must be auto, tensorrt or portable (got {self.step_variant!r})")


def effective_dims(manifest: Manifest, settings: BuildSettings) -> dict[str, tuple[int, int, int]]:
    """The export's dynamic ranges, with the regions maximum lowered to `settings.max_regions`."""
    dims = dict(manifest.dims)
    if settings.max_regions is not None:
        lo, opt, hi = dims["regions"]
        if settings.max_regions > hi:
            log.info("max_regions %d exceeds the export's %d; the graphs accept it", settings.max_regions, hi)
        hi = settings.max_regions
        dims["regions"] = (lo, min(opt, hi), hi)
    return dims


def profile_shapes(graph: GraphInfo, dims: dict[str, tuple[int, int, int]]) -> ProfileShapes:
    """(min, opt, max) shape of every input of `graph` from the named dynamic ranges."""
    shapes: ProfileShapes = {}
    for t in graph.inputs:
        lo, opt, hi = [], [], []
        for d in t.dims:
            if isinstance(d, int):
                r = (d, d, d)
            elif d in dims:
                r = dims[d]
            else:
                raise EngineError(f"input {t.name!r} of graph {graph.name!r} has dynamic axis {d!r} with no range in "
                                  f"the export sidecar (known: {', '.join(dims)}); re-export the model")
            lo.append(r[0])
            opt.append(r[1])
            hi.append(r[2])
        shapes[t.name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


def choose_step_variant(manifest: Manifest, settings: BuildSettings, plugin_ready: bool,
                        tensorrt_version: str) -> tuple[str, str]:
    """(variant, why) of the step graph to build."""
    have = set(manifest.variants)
    if settings.step_variant == "portable":
        return "portable", "asked for"
    if settings.step_variant == "tensorrt":
        if "tensorrt" not in have:
            raise EngineError("the tensorrt step graph was not exported; re-export with --variant tensorrt or both")
        if not plugin_ready:
            raise EngineError(f"TensorRT {tensorrt_version} has no pdlm::RegionAttention plugin (needs >= 10.9 for "
                              "the AOT Triton plugin, or a C++ plugin library)")
        return "tensorrt", "asked for"
    if "tensorrt" in have and plugin_ready:
        return "tensorrt", "pdlm::RegionAttention plugin available"
    if "tensorrt" not in have:
        return "portable", "the export has no tensorrt variant"
    return "portable", f"no pdlm::RegionAttention plugin for TensorRT {tensorrt_version} (needs >= 10.9 or a C++ library)"


def typing_mode(exported: str, wanted: str | None, tensorrt_version: str) -> tuple[str, str | None]:
    """("strong", None) to keep the graph's types, or ("weak", "FP16"/"BF16") to let TensorRT lower float32."""
    if wanted is None or wanted == exported:
        return "strong", None
    major = int(tensorrt_version.split(".")[0] or 0)
    if exported == "float32" and wanted in ("float16", "bfloat16"):
        if major >= 11:
            raise EngineError(f"TensorRT {tensorrt_version} builds strongly typed only: re-export the model with "
                              f"`pdlm-ros export --dtype {wanted}` instead of lowering a float32 export")
        log.warning("lowering a float32 export to %s with weakly typed builder flags (deprecated since TensorRT "
                    "10.12); exporting in %s is preferred", wanted, wanted)
        return "weak", "FP16" if wanted == "float16" else "BF16"
    raise EngineError(f"the export is {exported}; it cannot be built as {wanted}. Re-export with --dtype {wanted}")


def engine_key(graph: GraphInfo, manifest: Manifest, device: DeviceInfo, profile: ProfileShapes,
               settings: BuildSettings, typing: tuple[str, str | None], plugin_hash: str) -> EngineKey:
    builder = {"workspace_mib": settings.workspace_mib, "optimization_level": settings.optimization_level,
               "typing": list(typing)}
    return EngineKey(
        graph=graph.name, variant=graph.variant, model_hash=manifest.model_hash, onnx_sha256=graph.sha256,
        precision=settings.precision or manifest.precision, gpu_name=device.gpu_name,
        compute_capability=device.compute_capability, tensorrt_version=device.tensorrt_version,
        platform=device.platform, plugin_hash=plugin_hash if graph.custom_nodes else "",
        profile=json.dumps({k: [list(s) for s in v] for k, v in profile.items()}, sort_keys=True),
        builder=json.dumps(builder, sort_keys=True))


@dataclass
class BuiltEngines:
    export_dir: Path
    step_variant: str
    step_reason: str
    paths: dict[str, Path] = field(default_factory=dict)
    keys: dict[str, EngineKey] = field(default_factory=dict)
    actions: dict[str, str] = field(default_factory=dict)  # graph -> "reused" | "built (<why>)"
    max_regions: int = 0


def import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as err:
        raise EngineError("TensorRT is not installed (`import tensorrt` failed). Install the TensorRT Python "
                          "package matching your CUDA (JetPack ships it), or use --backend onnxruntime/torch") from err
    return trt


def build_engines(export_dir: str | Path, settings: BuildSettings | None = None, *, force_rebuild: bool = False,
                  allow_rebuild: bool = True, cache_dir: str | Path | None = None) -> BuiltEngines:
    """Make sure a valid plan exists for every graph, building what is missing, stale or corrupt."""
    trt = import_tensorrt()
    settings = settings or BuildSettings()
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    from pdlm_ros.runtime.plugin import load_plugin_library, plugin_source_hash, register_plugin

    if settings.plugin_library:
        load_plugin_library(settings.plugin_library)
    if manifest.config.get("layout") == "official":
        raise EngineError(f"{export_dir} is an official-layout export; TensorRT engines are built for the native "
                          "layout only so far (run it with --backend onnxruntime or torch)")
    plugin_ready = bool(settings.plugin_library) or register_plugin()
    variant, why = choose_step_variant(manifest, settings, plugin_ready, trt.__version__)
    if variant == "portable" and "tensorrt" in manifest.variants:
        log.warning("building the portable step graph: %s", why)
    typing = typing_mode(manifest.precision, settings.precision, trt.__version__)
    device = current_device(trt.__version__)
    dims = effective_dims(manifest, settings)
    cache = EngineCache(cache_dir if cache_dir is not None else export_dir / "trt")
    plugin_hash = plugin_source_hash()
    out = BuiltEngines(export_dir, variant, why, max_regions=dims["regions"][2])
    for name in GRAPHS:
        graph = manifest.graph(name, variant)
        profile = profile_shapes(graph, dims)
        key = engine_key(graph, manifest, device, profile, settings, typing, plugin_hash)
        res = cache.resolve(key, force_rebuild=force_rebuild, allow_rebuild=allow_rebuild)
        if res.build:
            log.info("building %s engine (%s)", name, res.reason)
            t0 = time.perf_counter()
            plan = build_plan(export_dir / graph.file, profile, settings, typing,
                              cache.timing_cache_path(device) if settings.timing_cache else None)
            cache.store(key, plan, {"onnx": graph.file, "build_seconds": round(time.perf_counter() - t0, 1),
                                    "device": asdict(device)})
            out.actions[name] = f"built ({res.reason})"
        else:
            out.actions[name] = "reused"
        out.paths[name], out.keys[name] = res.path, key
    return out


def build_plan(onnx_path: Path, profile: ProfileShapes, settings: BuildSettings, typing: tuple[str, str | None],
               timing_cache: Path | None) -> bytes:
    """Parse one ONNX graph and build a serialized engine for one optimisation profile."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if typing[0] == "strong":
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if settings.workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.builder_optimization_level = settings.optimization_level
    if typing[0] == "weak":
        config.set_flag(getattr(trt.BuilderFlag, typing[1] or "FP16"))
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.items():
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    if hasattr(trt, "IProgressMonitor"):
        config.progress_monitor = _progress_monitor(trt)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT failed to build {onnx_path.name} (see the TensorRT log above; out of memory or "
                          "workspace too small are common: try --workspace or a smaller --max-regions)")
    if cache is not None and timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        timing_cache.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(plan))


def _progress_monitor(trt: Any) -> Any:
    """A TensorRT IProgressMonitor that shows build phases as tqdm bars on stderr (off when not a terminal)."""
    from tqdm import tqdm

    class _Monitor(trt.IProgressMonitor):  # type: ignore[name-defined, misc]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._bars: dict[str, Any] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self._bars[phase_name] = tqdm(total=num_steps, desc=phase_name, leave=False, file=sys.stderr,
                                          position=len(self._bars), disable=None)

        def step_complete(self, phase_name: str, step: int) -> bool:
            bar = self._bars.get(phase_name)
            if bar is not None:
                bar.n = step + 1
                bar.refresh()
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            bar = self._bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return _Monitor()
