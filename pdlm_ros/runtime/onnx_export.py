"""Export PerceptionDLM to ONNX: four graphs that wrap the model's own modules, plus a sidecar.

Dims: V views, S tile side, g patches per side, Cv vision width, P prefix tokens, C decoder width, N regions,
G RoI samples per side, Ch sample channels, R RoI tokens, L caption tokens, Y layers, H heads, D head dim,
K vocabulary.

  vision.onnx   pixels (V, 3, S, S)                           -> prefix (P, C), features (V, g, g, Cv)
  regions.onnx  samples (N, G, G, Ch), geometry (N, 7)          -> roi (N, R, C)
  prefix.onnx   prefix (P, C)                                   -> prefix_k, prefix_v (Y, H, P, D)
  step.onnx     roi, tokens (N, L) int64, prefix_k, prefix_v    -> logits (N, L, K), token (N, L), prob (N, L)
  step.trt.onnx the same step with one pdlm::RegionAttention node per layer (variant "tensorrt")

An official-layout checkpoint (the released PerceptionDLM) exports two other graphs, as its rule recomputes the whole
sequence at every step (`pdlm_ros.model.official`); only the portable variant:

  official_vision.onnx  pixels (V, 3, S, S), active (prompt_numbers, V, g*g) -> visual (V, t*t, C)
  official_step.onnx    ids (T,), visual (Vt, C), image_pos (Vt,), roi (NR, C), roi_pos (NR,), allowed (T, T),
                        caption_pos (M,)                                         -> logits (M, K)

Like segment-anything's SamOnnxModel, each wrapper holds the model's submodules and calls the methods the PyTorch
path calls, so there is one model definition. The vision graph appends the prompt embeddings (constant per model),
so the deployed decoder never needs the embedding table outside the step graph. RoI sampling stays on the host: it
is a few bilinear gathers per region that depend on Python-side box/mask data, while its learned projection (the
heavy part) is the regions graph. The step graph ends in each position's argmax token and its probability with the
mask token excluded, exactly what the sampler computes at temperature 0, plus the logits the sampler reads today.

Exporter: TorchScript (`torch.onnx.export(dynamo=False)`) with a `torch.library` op and a symbolic for the custom
node. Why not the dynamo exporter: it produces the same graphs but took ~30 s per step graph here against ~3 s
(tiny model, torch 2.13, 2 busy cores), and tests export several times. Its route is known to work too
(custom_translation_table + an ONNX schema for the node); switching is local to `_export_graph`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from pdlm_ros.errors import ConfigError, EngineError
from pdlm_ros.model.attention import ATTENTION_IMPLS, register_attention
from pdlm_ros.model.decoder import PrefixCache
from pdlm_ros.model.pdlm import PerceptionDLM
from pdlm_ros.model.vision import pixel_unshuffle, select_grid
from pdlm_ros.runtime import EXPORT_FORMAT, MANIFEST_NAME, GraphInfo, Manifest, TensorInfo, read_manifest
from pdlm_ros.runtime.plugin.signature import REGION_ATTENTION

__all__ = ["VisionGraph", "RegionsGraph", "PrefixGraph", "StepGraph", "OfficialVisionGraph", "OfficialStepGraph",
           "model_hash", "export_model",
           "ensure_export", "register_onnx_schema", "VARIANTS", "DEFAULT_OPSET"]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
VARIANTS = ("portable", "tensorrt", "both")
EXTERNAL_DATA_BYTES = 1 << 30  # above this, weights go to one `<graph>.onnx.data` file (protobuf stops at 2 GiB)
_PLUGIN_IMPL = "onnx_region_attention_node"  # attention impl name used only while exporting the tensorrt variant


# -- graph wrappers ------------------------------------------------------------------------------------------------
class VisionGraph(nn.Module):
    """Tiles -> encoder -> unshuffle -> connector, with the prompt embeddings appended (= the frame's prefix)."""

    def __init__(self, model: PerceptionDLM) -> None:
        super().__init__()
        self.vision, self.connector, self.unshuffle = model.vision, model.connector, model.cfg.vision.unshuffle
        self.register_buffer("prompt", model.decoder.wte(model.prompt_ids).detach().clone())  # (Pt, C)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.vision(pixels)  # (V, g, g, Cv)
        visual = self.connector(pixel_unshuffle(feats, self.unshuffle)).flatten(0, 1)  # (V*T, C)
        return torch.cat([visual, self.prompt]), feats


class RegionsGraph(nn.Module):
    """RoI samples -> RoI tokens: RegionEncoder.project (sampling stays on the host)."""

    def __init__(self, model: PerceptionDLM) -> None:
        super().__init__()
        self.enc = model.region

    def forward(self, samples: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        return self.enc.project(samples, geometry)


class PrefixGraph(nn.Module):
    """The prefix pass: prefix embeddings -> every layer's keys/values (the frame's cache)."""

    def __init__(self, model: PerceptionDLM) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(self, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.decoder.forward_prefix(prefix)
        return torch.stack(cache.keys), torch.stack(cache.values)  # (Y, H, P, D) each


class StepGraph(nn.Module):
    """One denoising forward over all region tokens against the cached prefix."""

    def __init__(self, model: PerceptionDLM, attn_impl: str = "shared_prefix") -> None:
        super().__init__()
        self.model, self.attn_impl = model, attn_impl
        mask = torch.zeros(model.cfg.decoder.vocab_size, dtype=torch.bool)
        mask[model.cfg.mask_token_id] = True  # the mask token is never a prediction (as in the sampler)
        self.register_buffer("mask_token", mask)

    def forward(self, roi: torch.Tensor, tokens: torch.Tensor, prefix_k: torch.Tensor,
                prefix_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = PrefixCache(list(prefix_k.unbind(0)), list(prefix_v.unbind(0)))
        logits = self.model.region_logits(roi, tokens, cache, self.attn_impl)  # (N, L, K)
        scores = logits.float().masked_fill(self.mask_token, float("-inf"))
        prob, token = torch.softmax(scores, dim=-1).max(dim=-1)  # (N, L) each
        return logits, token, prob


class OfficialVisionGraph(nn.Module):
    """Official layout: views and active mask patches -> abstractor outputs (`TorchRunner.visual_tokens`)."""

    def __init__(self, model: PerceptionDLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        return self.model.official_runner().visual_tokens(pixels, active)


class OfficialStepGraph(nn.Module):
    """Official layout: one full forward of the sequence (`TorchRunner.sequence_logits`)."""

    def __init__(self, model: PerceptionDLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, visual: torch.Tensor, image_pos: torch.Tensor, roi: torch.Tensor,
                roi_pos: torch.Tensor, allowed: torch.Tensor, caption_pos: torch.Tensor) -> torch.Tensor:
        return self.model.official_runner().sequence_logits(ids, visual, image_pos, roi, roi_pos, allowed,
                                                            caption_pos)


# -- the custom node -----------------------------------------------------------------------------------------------
_OP_NAME = "pdlm::region_attention"


def _ensure_region_attention_op() -> None:
    """Define the torch op that stands for pdlm::RegionAttention while tracing, and its ONNX symbolic (once)."""
    if hasattr(torch.ops.pdlm, "region_attention"):
        return

    @torch.library.custom_op(_OP_NAME, mutates_args=())
    def region_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                            prefix_v: torch.Tensor, num_heads: int, head_dim: int, scale: float) -> torch.Tensor:
        # Eager value: the reference implementation, so a traced graph's example outputs stay right.
        return ATTENTION_IMPLS["shared_prefix"](q, k, v, prefix_k, prefix_v)

    @region_attention_op.register_fake
    def _(q, k, v, prefix_k, prefix_v, num_heads, head_dim, scale):  # noqa: ANN001, ANN202
        return torch.empty_like(q)

    from torch.onnx import symbolic_helper

    @symbolic_helper.parse_args("v", "v", "v", "v", "v", "i", "i", "f")
    def symbolic(g, q, k, v, prefix_k, prefix_v, num_heads, head_dim, scale):  # noqa: ANN001, ANN202
        sig = REGION_ATTENTION
        attrs = sig.node_attributes(num_heads=num_heads, head_dim=head_dim, scale=scale)
        suffix = {int: "i", float: "f", str: "s"}
        kwargs = {f"{name}_{suffix[type(value)]}": value for name, value in attrs.items()}
        out = g.op(f"{sig.namespace}::{sig.name}", q, k, v, prefix_k, prefix_v, **kwargs)
        out.setType(q.type())
        return out

    torch.onnx.register_custom_op_symbolic(_OP_NAME, symbolic, 1)


def _plugin_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor,
                      pv: torch.Tensor) -> torch.Tensor:
    d = q.shape[3]
    return torch.ops.pdlm.region_attention(q, k, v, pk, pv, q.shape[1], d, d ** -0.5)


@contextlib.contextmanager
def _plugin_attention_impl() -> Iterator[str]:
    """Make the decoder emit pdlm::RegionAttention for the duration of one export."""
    _ensure_region_attention_op()
    register_attention(_PLUGIN_IMPL, _plugin_attention)
    try:
        yield _PLUGIN_IMPL
    finally:
        ATTENTION_IMPLS.pop(_PLUGIN_IMPL, None)


def register_onnx_schema() -> None:
    """Register pdlm::RegionAttention's schema with onnx (once), built from the declared signature.

    With it, `onnx.checker` validates the node (input count, attribute names and types) like a standard op.
    """
    import onnx
    from onnx.defs import OpSchema

    sig = REGION_ATTENTION
    if onnx.defs.has(sig.name, sig.namespace):
        return
    types = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT}
    attrs = [OpSchema.Attribute(a.name, types[a.type], "plugin field") for a in sig.attributes]
    for name, value in sig.routing:
        kind = OpSchema.AttrType.STRING if isinstance(value, str) else OpSchema.AttrType.INT
        attrs.append(OpSchema.Attribute(name, kind, "TensorRT parser routing", required=False))
    schema = OpSchema(
        sig.name, sig.namespace, 1, doc=(__doc__ or "").split("\n")[0],
        inputs=[OpSchema.FormalParameter(t.name, "T") for t in sig.inputs],
        outputs=[OpSchema.FormalParameter(t.name, "T") for t in sig.outputs],
        type_constraints=[("T", [f"tensor({t})" for t in sig.dtypes], "one float type for all tensors")],
        attributes=attrs)
    onnx.defs.register_schema(schema)


# -- hashing ---------------------------------------------------------------------------------------------------------
def model_hash(model: PerceptionDLM) -> str:
    """sha256 over the config, the prompt ids and every weight (name, dtype, shape, bytes), in name order."""
    h = hashlib.sha256()
    h.update(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    h.update(json.dumps(model.prompt_ids.tolist()).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _file_sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# -- export ----------------------------------------------------------------------------------------------------------
def _dims_of(value: Any) -> tuple[int | str, ...]:
    shape = value.type.tensor_type.shape
    return tuple(d.dim_param if d.dim_param else int(d.dim_value) for d in shape.dim)


_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool"}


def _export_graph(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, *, inputs: list[str],
                  outputs: dict[str, tuple[int | str, ...]], dynamic: dict[str, dict[int, str]], opset: int,
                  custom: bool = False) -> None:
    """Trace one wrapper to `path`; weights move to `<name>.data` when the graph is large.

    `outputs` maps each output to its dims (ints fixed, strings dynamic): the tracer leaves generated names on
    dims it cannot prove static, and the sidecar and TensorRT profiles read these.
    """
    import onnx

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        raw = Path(tmp) / path.name
        torch.onnx.export(module, args, str(raw), dynamo=False, input_names=inputs, output_names=list(outputs),
                          dynamic_axes=dynamic, opset_version=opset, do_constant_folding=True,
                          custom_opsets={REGION_ATTENTION.namespace: 1} if custom else None)
        proto = onnx.load(str(raw))
    for value in proto.graph.output:
        dims = value.type.tensor_type.shape.dim
        want = outputs[value.name]
        if len(dims) != len(want):
            raise EngineError(f"exported output {value.name!r} has rank {len(dims)}, expected dims {want}")
        for dim, w in zip(dims, want):
            if isinstance(w, int):
                if dim.HasField("dim_value") and dim.dim_value != w:
                    raise EngineError(f"exported output {value.name!r} has dims {_dims_of(value)}, expected {want}")
                dim.dim_value = w
            else:
                dim.dim_param = w
    weights = sum(t.ByteSize() for t in proto.graph.initializer)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    if weights > EXTERNAL_DATA_BYTES:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def _graph_info(path: Path, name: str, variant: str) -> GraphInfo:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    g = proto.graph
    init = {t.name for t in g.initializer}

    def info(v: Any) -> TensorInfo:
        return TensorInfo(v.name, _dims_of(v), _ONNX_DTYPES.get(v.type.tensor_type.elem_type, "other"))

    data = path.with_name(path.name + ".data")
    files = [path] + ([data] if data.exists() else [])
    return GraphInfo(name=name, variant=variant, file=path.name, data_file=data.name if data.exists() else "",
                     sha256=_file_sha256(*files), bytes=sum(f.stat().st_size for f in files),
                     inputs=tuple(info(v) for v in g.input if v.name not in init),
                     outputs=tuple(info(v) for v in g.output), nodes=len(g.node),
                     custom_nodes=sum(n.domain == REGION_ATTENTION.namespace for n in g.node))


def _frame_ranges(model: PerceptionDLM) -> dict[str, tuple[int, int, int]]:
    """(min, typical, max) views and prefix tokens: one view / a 640x480 camera frame / max_tiles + thumbnail."""
    v = model.cfg.vision
    t, pt = v.tokens_per_view, int(model.prompt_ids.numel())
    rows, cols = select_grid(640, 480, v.max_tiles)
    views = (1, 1 if rows * cols == 1 else rows * cols + 1, 1 if v.max_tiles == 1 else v.max_tiles + 1)
    return {"views": views, "prefix": tuple(n * t + pt for n in views)}  # type: ignore[dict-item]


def export_model(model: PerceptionDLM, out_dir: str | Path, *, tokenizer: Any = None, variant: str = "both",
                 dtype: torch.dtype | None = None, opset: int = DEFAULT_OPSET, max_regions: int | None = None,
                 hash_: str | None = None) -> Manifest:
    """Write the graphs, `export.json`, `config.json` (and `tokenizer.json`) to `out_dir`. Returns the manifest.

    `dtype` casts the model in place before tracing (float16/bfloat16 for TensorRT); default: the model's dtype.
    """
    import onnx

    if variant not in VARIANTS:
        raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    cfg = model.cfg
    max_regions = max_regions or cfg.region.max_regions
    if max_regions < 1:
        raise ConfigError(f"max_regions must be >= 1 (got {max_regions})")
    if cfg.layout == "official" and variant == "tensorrt":
        raise ConfigError("the official layout exports the portable graphs only (no TensorRT variant yet); "
                          "use --variant portable")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hash_ = hash_ or model_hash(model)
    model = model.eval().to("cpu")
    if dtype is not None:
        model = model.to(dtype)
    if cfg.layout == "official":
        return _export_official(model, out, tokenizer=tokenizer, opset=opset, hash_=hash_)
    wdtype = model.decoder.wte.weight.dtype
    register_onnx_schema()

    v, d, r = cfg.vision, cfg.decoder, cfg.region
    ranges = _frame_ranges(model)
    g, ch = r.roi_grid, v.hidden_size + 1 + (3 if r.roi_pixels else 0)
    n_ex, p_ex = 2, ranges["prefix"][0]  # example sizes for tracing; every one of them is a dynamic axis
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(wdtype)

    kv = (d.n_layers, d.n_heads, "prefix", d.head_dim)
    span = ("regions", cfg.decoding.caption_len)
    jobs: list[tuple[str, str, nn.Module, tuple, list[str], dict[str, tuple], dict[str, dict[int, str]]]] = [
        ("vision", "any", VisionGraph(model), (rand(2, 3, v.image_size, v.image_size),), ["pixels"],
         {"prefix": ("prefix", d.d_model), "features": ("views", v.grid, v.grid, v.hidden_size)},
         {"pixels": {0: "views"}, "prefix": {0: "prefix"}, "features": {0: "views"}}),
        ("regions", "any", RegionsGraph(model), (rand(n_ex, g, g, ch), rand(n_ex, 7)), ["samples", "geometry"],
         {"roi": ("regions", r.tokens, d.d_model)},
         {"samples": {0: "regions"}, "geometry": {0: "regions"}, "roi": {0: "regions"}}),
        ("prefix", "any", PrefixGraph(model), (rand(p_ex, d.d_model),), ["prefix"], {"prefix_k": kv, "prefix_v": kv},
         {"prefix": {0: "prefix"}, "prefix_k": {2: "prefix"}, "prefix_v": {2: "prefix"}}),
    ]
    step_args = (rand(n_ex, r.tokens, d.d_model),
                 torch.randint(0, d.vocab_size, (n_ex, cfg.decoding.caption_len), generator=gen),
                 rand(d.n_layers, d.n_heads, p_ex, d.head_dim), rand(d.n_layers, d.n_heads, p_ex, d.head_dim))
    step_io = (["roi", "tokens", "prefix_k", "prefix_v"],
               {"logits": (*span, d.vocab_size), "token": span, "prob": span},
               {"roi": {0: "regions"}, "tokens": {0: "regions"}, "prefix_k": {2: "prefix"},
                "prefix_v": {2: "prefix"}, "logits": {0: "regions"}, "token": {0: "regions"},
                "prob": {0: "regions"}})
    if variant in ("portable", "both"):
        jobs.append(("step", "portable", StepGraph(model), step_args, *step_io))

    graphs: list[GraphInfo] = []
    with torch.inference_mode():
        for name, var, module, args, ins, outs, dyn in jobs:
            path = out / f"{name}.onnx"
            log.info("exporting %s", path)
            _export_graph(module, args, path, inputs=ins, outputs=outs, dynamic=dyn, opset=opset)
            graphs.append(_graph_info(path, name, var))
        if variant in ("tensorrt", "both"):
            path = out / "step.trt.onnx"
            log.info("exporting %s", path)
            with _plugin_attention_impl() as impl:
                _export_graph(StepGraph(model, impl), step_args, path, inputs=step_io[0], outputs=step_io[1],
                              dynamic=step_io[2], opset=opset, custom=True)
            graphs.append(_graph_info(path, "step", "tensorrt"))
    for gi in graphs:
        onnx.checker.check_model(str(out / gi.file))

    cfg.to_json(out / "config.json")
    if tokenizer is not None:
        tokenizer.save(str(out / "tokenizer.json"))
    manifest = Manifest(
        format=EXPORT_FORMAT, model_name=cfg.name, model_hash=hash_, precision=str(wdtype).replace("torch.", ""),
        opset=opset, exporter=f"torch.onnx (TorchScript) {torch.__version__}",
        variants=tuple(sorted({gi.variant for gi in graphs} - {"any"})),
        dims={**ranges, "regions": (1, min(4, max_regions), max_regions)},
        config=json.loads(json.dumps(cfg.to_dict())), prompt_ids=tuple(int(i) for i in model.prompt_ids.tolist()),
        plugin=REGION_ATTENTION.to_dict(), graphs=tuple(graphs),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    manifest.write(out / MANIFEST_NAME)
    return manifest


def _export_official(model: PerceptionDLM, out: Path, *, tokenizer: Any, opset: int, hash_: str) -> Manifest:
    """The official layout's two graphs (model already on the CPU in the export's dtype)."""
    import onnx

    from pdlm_ros.model.official import tile_grid

    cfg = model.cfg
    o, v, d = cfg.official, cfg.vision, cfg.decoder
    wdtype = model.decoder.wte.weight.dtype
    gen = torch.Generator().manual_seed(0)
    views, t = 2, v.tokens_per_view
    g2 = v.grid * v.grid
    n, r = 2, o.roi_tokens if o.roi_output_size else 16
    seq = views * t + n * (r + cfg.decoding.caption_len) + 40
    caption_pos = torch.arange(seq - n * cfg.decoding.caption_len, seq)
    jobs = [
        ("official_vision", OfficialVisionGraph(model),
         (torch.randn(views, 3, v.image_size, v.image_size, generator=gen).to(wdtype),
          (torch.rand(o.prompt_numbers, views, g2, generator=gen) > 0.5).float()),
         ["pixels", "active"], {"visual": ("views", t, d.d_model)},
         {"pixels": {0: "views"}, "active": {1: "views"}, "visual": {0: "views"}}),
        ("official_step", OfficialStepGraph(model),
         (torch.randint(0, d.vocab_size, (seq,), generator=gen), torch.randn(views * t, d.d_model, generator=gen).to(wdtype),
          torch.arange(5, 5 + views * t), torch.randn(n * r, d.d_model, generator=gen).to(wdtype),
          torch.arange(5 + views * t, 5 + views * t + n * r), torch.ones(seq, seq, dtype=torch.bool), caption_pos),
         ["ids", "visual", "image_pos", "roi", "roi_pos", "allowed", "caption_pos"],
         {"logits": ("captions", d.vocab_size)},
         {"ids": {0: "seq"}, "visual": {0: "visual"}, "image_pos": {0: "visual"}, "roi": {0: "roi_tokens"},
          "roi_pos": {0: "roi_tokens"}, "allowed": {0: "seq", 1: "seq"}, "caption_pos": {0: "captions"},
          "logits": {0: "captions"}}),
    ]
    graphs: list[GraphInfo] = []
    with torch.inference_mode():
        for name, module, args, ins, outs, dyn in jobs:
            path = out / f"{name}.onnx"
            log.info("exporting %s", path)
            _export_graph(module, args, path, inputs=ins, outputs=outs, dynamic=dyn, opset=opset)
            graphs.append(_graph_info(path, name, "any"))
    for gi in graphs:
        onnx.checker.check_model(str(out / gi.file))
    cols, rows = tile_grid(640, 480, o.min_tiles, o.max_tiles, v.image_size)
    typical = 1 if cols * rows == 1 else cols * rows + 1
    cfg.to_json(out / "config.json")
    if tokenizer is not None:
        tokenizer.save(str(out / "tokenizer.json"))
    manifest = Manifest(
        format=EXPORT_FORMAT, model_name=cfg.name, model_hash=hash_, precision=str(wdtype).replace("torch.", ""),
        opset=opset, exporter=f"torch.onnx (TorchScript) {torch.__version__}", variants=("portable",),
        dims={"views": (1, typical, o.max_tiles + 1), "regions": (1, min(4, o.prompt_numbers), o.prompt_numbers)},
        config=json.loads(json.dumps(cfg.to_dict())), prompt_ids=(), plugin={}, graphs=tuple(graphs),
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    manifest.write(out / MANIFEST_NAME)
    return manifest


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "model"


def ensure_export(checkpoint: str | Path | None = None, *, preset: str | None = None, seed: int = 0,
                  root: str | Path = "engines", variant: str = "portable", dtype: torch.dtype | None = None,
                  out_dir: str | Path | None = None) -> Path:
    """An export directory for this model, reused when its sidecar matches the model hash, else (re)written."""
    from pdlm_ros.captioner import Captioner

    cap = Captioner.load(checkpoint, preset=preset, seed=seed)
    h = model_hash(cap.model)
    out = Path(out_dir) if out_dir is not None else Path(root) / f"{_slug(cap.config.name)}-{h[:12]}"
    want_dtype = str(dtype or cap.model.decoder.wte.weight.dtype).replace("torch.", "")
    if (out / MANIFEST_NAME).is_file():
        try:
            m = read_manifest(out)
            wanted = {"portable", "tensorrt"} if variant == "both" else {variant}
            if m.model_hash == h and m.precision == want_dtype and wanted <= set(m.variants):
                return out
            log.info("re-exporting %s: its sidecar is for another model, precision or variant", out)
        except EngineError as err:
            log.warning("re-exporting %s: %s", out, err)
        shutil.rmtree(out)
    export_model(cap.model, out, tokenizer=cap.tokenizer, variant=variant, dtype=dtype, hash_=h)
    return out
