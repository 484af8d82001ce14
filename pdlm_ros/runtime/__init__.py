"""Backends: one PerceptionDLM, run by PyTorch (the reference), ONNX Runtime or TensorRT.

A graph backend runs the four exported graphs (see `onnx_export`); everything else stays on the host and is the
same code as the PyTorch path: image tiling, RoI sampling, the masked-diffusion sampler, caption text. The seam:

    class Backend(Protocol):
        kind: str; manifest: Manifest; device: torch.device
        def run(self, graph: str, inputs: dict[str, Tensor]) -> dict[str, Tensor]

`GraphModel` puts a backend behind the four `PerceptionDLM` methods that `Captioner` calls (encode_frame,
roi_tokens, prefix_cache, region_logits), so `GraphCaptioner` is a `Captioner` whose model calls run graphs and the
sampler drives them exactly as it drives PyTorch: prefix K/V once per frame, then one `step` per denoising forward.
Modes that recompute the whole packed sequence (`*_nocache`, `nomask`) have no graph and stay PyTorch-only.

`load_captioner(checkpoint, backend=..., engine_path=...)` is the one entry point the node and the CLI use.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from pdlm_ros.captioner import Captioner
from pdlm_ros.errors import ConfigError, EngineError
from pdlm_ros.model.config import PDLMConfig
from pdlm_ros.model.pdlm import EncodedFrame
from pdlm_ros.model.regions import PreparedRegion, RegionEncoder
from pdlm_ros.model.vision import make_views, stitch_tiles
from pdlm_ros.types import CACHED_MODES, OFFICIAL_MODES, FrameResult, RegionInput

__all__ = ["EXPORT_FORMAT", "MANIFEST_NAME", "BACKENDS", "TensorInfo", "GraphInfo", "Manifest", "read_manifest",
           "torch_dtype", "load_export_tokenizer", "Backend", "GraphPrefix", "GraphModel", "GraphCaptioner", "load_captioner"]

EXPORT_FORMAT = 1
MANIFEST_NAME = "export.json"
BACKENDS = ("torch", "onnxruntime", "tensorrt")
GRAPHS = ("vision", "regions", "prefix", "step")
OFFICIAL_GRAPHS = ("official_vision", "official_step")  # an official-layout export (see onnx_export)


def graph_names(manifest: "Manifest") -> tuple[str, ...]:
    return OFFICIAL_GRAPHS if manifest.config.get("layout") == "official" else GRAPHS


def torch_dtype(name: str) -> torch.dtype:
    """"float16" -> torch.float16 (names as in the sidecar)."""
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise EngineError(f"unknown dtype {name!r} in export sidecar")
    return dt


# -- the export sidecar ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int | str, ...]  # ints are fixed, strings name a dynamic axis ("regions", "views", "prefix")
    dtype: str


@dataclass(frozen=True)
class GraphInfo:
    name: str  # vision | regions | prefix | step
    variant: str  # "any" (serves both), "portable" (standard ops) or "tensorrt" (pdlm::RegionAttention nodes)
    file: str  # relative to the export directory
    data_file: str  # external weights ("" when inside the .onnx)
    sha256: str  # of file + data_file
    bytes: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    nodes: int
    custom_nodes: int


@dataclass(frozen=True)
class Manifest:
    """`export.json`: what was exported, from which model, at which precision, with which dynamic ranges."""

    format: int
    model_name: str
    model_hash: str  # sha256 of config + prompt ids + weights (onnx_export.model_hash)
    precision: str  # float dtype of the graphs' tensors
    opset: int
    exporter: str
    variants: tuple[str, ...]
    dims: dict[str, tuple[int, int, int]]  # dynamic axis -> (min, typical, max), the engine profile ranges
    config: dict[str, Any]
    prompt_ids: tuple[int, ...]
    plugin: dict[str, Any]  # the declared pdlm::RegionAttention signature the tensorrt variant was written against
    graphs: tuple[GraphInfo, ...]
    created: str = ""

    def cfg(self) -> PDLMConfig:
        return PDLMConfig.from_dict(self.config)

    def graph(self, name: str, variant: str = "portable") -> GraphInfo:
        """The graph `name`; for "step", the given variant."""
        for g in self.graphs:
            if g.name == name and g.variant in ("any", variant):
                return g
        have = ", ".join(f"{g.name}[{g.variant}]" for g in self.graphs)
        raise EngineError(f"the export has no {name!r} graph for variant {variant!r} (it has {have}); re-export "
                          f"with `pdlm-ros export --variant {variant if variant != 'any' else 'both'}`")

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        def tensors(items: list[dict[str, Any]]) -> tuple[TensorInfo, ...]:
            return tuple(TensorInfo(t["name"], tuple(t["dims"]), t["dtype"]) for t in items)

        graphs = tuple(GraphInfo(**{**g, "inputs": tensors(g["inputs"]), "outputs": tensors(g["outputs"])})
                       for g in data["graphs"])
        return cls(**{**data, "variants": tuple(data["variants"]), "prompt_ids": tuple(data["prompt_ids"]),
                      "dims": {k: tuple(v) for k, v in data["dims"].items()}, "graphs": graphs})


def read_manifest(export_dir: str | Path) -> Manifest:
    """Read and check `export.json`: it parses, has this format, and every graph file it lists exists."""
    d = Path(export_dir)
    path = d / MANIFEST_NAME
    if not path.is_file():
        raise EngineError(f"{d} is not an export directory (no {MANIFEST_NAME}); create one with "
                          f"`pdlm-ros export --out {d}`")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != EXPORT_FORMAT:
            raise EngineError(f"{path} has export format {data.get('format')!r}, this version reads {EXPORT_FORMAT}; "
                              "re-export the model")
        manifest = Manifest.from_dict(data)
    except EngineError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise EngineError(f"corrupt export sidecar {path}: {type(err).__name__}: {err}; re-export the model") from err
    for g in manifest.graphs:
        for f in (g.file, g.data_file):
            if f and not (d / f).is_file():
                raise EngineError(f"export {d} lists {f} but the file is missing; re-export the model")
    return manifest


# -- backends behind the Captioner ------------------------------------------------------------------------------------
class Backend(Protocol):
    kind: str
    manifest: Manifest
    device: torch.device

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


@dataclass
class GraphPrefix:
    """The frame's prefix cache as the graphs take it: every layer stacked. keys/values (Y, H, P, D)."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.keys.shape[2])


class GraphRunner:
    """The official layout's two computations (`official.TorchRunner`'s methods) as exported graphs."""

    def __init__(self, backend: Backend, dtype: torch.dtype) -> None:
        self.backend, self.device, self.dtype = backend, backend.device, dtype

    def visual_tokens(self, pixels: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return self.backend.run("official_vision", {"pixels": pixels, "active": active.float()})["visual"]

    def sequence_logits(self, ids: torch.Tensor, visual: torch.Tensor, image_pos: torch.Tensor, roi: torch.Tensor,
                        roi_pos: torch.Tensor, allowed: torch.Tensor, caption_pos: torch.Tensor) -> torch.Tensor:
        out = self.backend.run("official_step", {"ids": ids, "visual": visual, "image_pos": image_pos, "roi": roi,
                                                 "roi_pos": roi_pos, "allowed": allowed, "caption_pos": caption_pos})
        return out["logits"]


class GraphModel:
    """A `PerceptionDLM` look-alike for `Captioner` whose model calls run exported graphs on a backend."""

    def __init__(self, backend: Backend, max_regions: int | None = None, tokenizer: Any = None) -> None:
        self.backend = backend
        cfg = backend.manifest.cfg()
        if max_regions is not None and cfg.official is None:  # an engine built for fewer regions per pass
            cfg = cfg.replace(region=dataclasses.replace(cfg.region, max_regions=max_regions))
        self.cfg = cfg
        self.dtype = torch_dtype(backend.manifest.precision)
        if cfg.official is not None:
            from pdlm_ros.model.official import SpecialTokens

            if tokenizer is None:
                raise EngineError("an official-layout export needs its tokenizer.json (re-export the model)")
            self.special_tokens = SpecialTokens.from_tokenizer(tokenizer, cfg, "the export's tokenizer.json")
            return
        with torch.device("meta"):  # only the host-side sampling code is used; no weights are allocated
            self._sampler = RegionEncoder(cfg.region, cfg.vision.hidden_size, cfg.decoder.d_model)

    def official_runner(self) -> GraphRunner:
        return GraphRunner(self.backend, self.dtype)

    def eval(self) -> "GraphModel":
        return self

    @property
    def device(self) -> torch.device:
        return self.backend.device

    def encode_frame(self, rgb: np.ndarray) -> EncodedFrame:
        views = make_views(rgb, self.cfg.vision)
        out = self.backend.run("vision", {"pixels": views.pixels.to(self.device, self.dtype)})
        prefix, feats = out["prefix"], out["features"]
        visual = prefix[: views.pixels.shape[0] * self.cfg.vision.tokens_per_view]
        return EncodedFrame(visual, stitch_tiles(feats, views), torch.from_numpy(rgb), prefix)

    def roi_tokens(self, frame: EncodedFrame, regions: Sequence[PreparedRegion]) -> torch.Tensor:
        """-> (N, R, C), sampled on the host, projected by the regions graph."""
        samples = self._sampler.sample(frame.feature_map.float(), frame.image, regions)  # (N, G, G, Ch)
        geometry = self._sampler.geometry_features(regions, frame.width, frame.height)  # (N, 7)
        out = self.backend.run("regions", {"samples": samples.to(self.device, self.dtype),
                                           "geometry": geometry.to(self.device, self.dtype)})
        return out["roi"]

    def prefix_cache(self, frame: EncodedFrame) -> GraphPrefix:
        out = self.backend.run("prefix", {"prefix": frame.prefix})
        return GraphPrefix(out["prefix_k"], out["prefix_v"])

    def region_logits(self, roi: torch.Tensor, tokens: torch.Tensor, cache: GraphPrefix,
                      attn_impl: str = "") -> torch.Tensor:
        """roi (N, R, C), tokens (N, L) -> logits (N, L, K): one `step` graph run."""
        out = self.backend.run("step", {"roi": roi, "tokens": tokens, "prefix_k": cache.keys,
                                        "prefix_v": cache.values})
        return out["logits"]

    def dense_logits(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise EngineError(f"the {self.backend.kind} backend runs only the cached modes ({', '.join(CACHED_MODES)})")


class GraphCaptioner(Captioner):
    """`Captioner` over a graph backend: same `caption(image, regions, ...)` -> FrameResult contract."""

    def __init__(self, backend: Backend, tokenizer: Any = None, *, name: str | None = None,
                 max_regions: int | None = None) -> None:
        model = GraphModel(backend, max_regions, tokenizer)
        super().__init__(model, tokenizer, name=name or f"{backend.manifest.model_name} ({backend.kind})")  # type: ignore[arg-type]
        self.backend = backend

    def caption(self, image: object, regions: Sequence[RegionInput], *, mode: str = "auto",
                **kwargs: Any) -> FrameResult:
        mode = self.resolve_mode(mode)
        if kwargs.get("prompt") and self.layout != "official":
            raise ConfigError(f"the {self.backend.kind} backend has the prompt built into its vision graph; it takes "
                              "no per-request prompt (use backend torch)")
        if mode not in CACHED_MODES + OFFICIAL_MODES:
            raise ConfigError(f"mode {mode!r} recomputes the whole sequence every step and has no exported graph; "
                              f"the {self.backend.kind} backend runs {', '.join(CACHED_MODES)} "
                              "(use backend torch for the others)")
        return super().caption(image, regions, mode=mode, **kwargs)


def load_export_tokenizer(export_dir: Path) -> Any:
    from pdlm_ros.model.tokenizer import load_tokenizer

    return load_tokenizer(export_dir) if (export_dir / "tokenizer.json").is_file() else None


def load_captioner(checkpoint: str | Path | None = None, *, backend: str = "torch", engine_path: str | Path | None = None,
                   preset: str | None = None, device: str = "cpu", seed: int = 0, dtype: torch.dtype | None = None,
                   engine_root: str | Path = "engines", **options: Any) -> Captioner:
    """A captioner on the asked backend.

    torch: `Captioner.load`. onnxruntime / tensorrt: `engine_path` is an export directory (`pdlm-ros export`);
    without one, the checkpoint (or preset, or the bundled model) is exported under `engine_root/<name>-<hash>/`
    first, or that directory is reused when its sidecar carries the same model hash. TensorRT engines are built and
    cached inside the export directory (see `tensorrt_runtime.TensorRTCaptioner.load` for `options`).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if backend == "torch":
        return Captioner.load(checkpoint, preset=preset, device=device, seed=seed, dtype=dtype)
    if engine_path is not None:
        export_dir = Path(engine_path)
        if export_dir.is_file():
            raise EngineError(f"engine_path {export_dir} is a file; the {backend} backend needs the export directory "
                              "(it holds the four graphs, their sidecar and the engine cache)")
        if export_dir.name == "trt" and (export_dir.parent / MANIFEST_NAME).is_file():
            export_dir = export_dir.parent  # the engine cache inside an export directory
    else:
        from pdlm_ros.runtime.onnx_export import ensure_export

        want = dtype if dtype is not None else (torch.float16 if backend == "tensorrt" else None)
        export_dir = ensure_export(checkpoint, preset=preset, seed=seed, root=engine_root, dtype=want,
                                   variant="both" if backend == "tensorrt" else "portable")
    if backend == "onnxruntime":
        from pdlm_ros.runtime.onnxruntime_backend import OnnxRuntimeCaptioner

        return OnnxRuntimeCaptioner.load(export_dir, device=device, **options)
    from pdlm_ros.runtime.tensorrt_runtime import TensorRTCaptioner

    return TensorRTCaptioner.load(export_dir, device=device, **options)
