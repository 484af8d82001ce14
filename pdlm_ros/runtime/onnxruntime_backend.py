"""ONNX Runtime backend: the portable graphs on the CPU (or CUDA execution provider), for parity and for machines
without TensorRT.

It runs the `portable` step graph (standard ops); the `tensorrt` variant's pdlm::RegionAttention node has no ONNX
Runtime kernel. Graphs exported in bfloat16 are refused: numpy has no bfloat16 to feed them with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pdlm_ros.errors import EngineError
from pdlm_ros.runtime import GraphCaptioner, Manifest, graph_names, load_export_tokenizer, read_manifest

__all__ = ["OnnxRuntimeBackend", "OnnxRuntimeCaptioner", "compare_with_torch", "compare_official_with_torch"]



class OnnxRuntimeBackend:
    kind = "onnxruntime"

    def __init__(self, export_dir: str | Path, *, device: str = "cpu", threads: int | None = None,
                 providers: Sequence[str] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise EngineError("onnxruntime is not installed; `pip install onnxruntime` (or pdlm_ros[export])") from err
        self.export_dir = Path(export_dir)
        self.manifest: Manifest = read_manifest(self.export_dir)
        if self.manifest.precision == "bfloat16":
            raise EngineError(f"{self.export_dir} was exported in bfloat16, which ONNX Runtime cannot be fed from "
                              "numpy; export with --dtype float32 or float16 for this backend")
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if str(device).startswith("cuda"):
                if "CUDAExecutionProvider" not in ort.get_available_providers():
                    raise EngineError("device cuda asked, but this onnxruntime has no CUDAExecutionProvider "
                                      "(install onnxruntime-gpu, or use device cpu)")
                providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.device = torch.device("cpu")  # tensors cross the seam on the host; ORT moves them to its provider
        self.sessions: dict[str, Any] = {}
        for name in graph_names(self.manifest):
            info = self.manifest.graph(name, "portable")
            try:
                self.sessions[name] = ort.InferenceSession(str(self.export_dir / info.file), opts, providers=list(providers))
            except Exception as err:  # noqa: BLE001 - onnxruntime raises its own unrelated exception types
                raise EngineError(f"ONNX Runtime cannot load {self.export_dir / info.file}: {err}") from err
        self._inputs = {n: {i.name: i for i in s.get_inputs()} for n, s in self.sessions.items()}

    def run(self, graph: str, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sess = self.sessions[graph]
        expected = self._inputs[graph]
        if set(inputs) != set(expected):
            raise EngineError(f"graph {graph!r} takes inputs {sorted(expected)}, got {sorted(inputs)}")
        feeds = {name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in inputs.items()}
        try:
            outs = sess.run(None, feeds)
        except Exception as err:  # noqa: BLE001
            shapes = {k: v.shape for k, v in feeds.items()}
            raise EngineError(f"ONNX Runtime failed on graph {graph!r} with inputs {shapes}: {err}") from err
        return {o.name: torch.from_numpy(x) for o, x in zip(sess.get_outputs(), outs)}


class OnnxRuntimeCaptioner(GraphCaptioner):
    """`Captioner` whose model calls run the exported graphs in ONNX Runtime."""

    @classmethod
    def load(cls, export_dir: str | Path, *, device: str = "cpu", threads: int | None = None,
             **_: Any) -> "OnnxRuntimeCaptioner":
        backend = OnnxRuntimeBackend(export_dir, device=device, threads=threads)
        return cls(backend, load_export_tokenizer(Path(export_dir)))


def compare_with_torch(model: Any, backend: OnnxRuntimeBackend, rgb: np.ndarray, regions: Sequence[Any],
                       seed: int = 0) -> dict[str, float]:
    """Max |difference| of every graph's outputs against the PyTorch model on one frame (noisy caption tokens).

    `model` is the PerceptionDLM the export came from, in the export's precision; `regions` are PreparedRegion.
    """
    from pdlm_ros.runtime import GraphModel

    graph_model = GraphModel(backend)
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.decoder.vocab_size, (len(regions), cfg.decoding.caption_len), generator=g)
    tokens[torch.rand(tokens.shape, generator=g) < 0.5] = cfg.mask_token_id
    with torch.inference_mode():
        ref_frame, got_frame = model.encode_frame(rgb), graph_model.encode_frame(rgb)
        ref_roi, got_roi = model.roi_tokens(ref_frame, regions), graph_model.roi_tokens(got_frame, regions)
        ref_cache, got_cache = model.prefix_cache(ref_frame), graph_model.prefix_cache(got_frame)
        # the step is compared on identical inputs (the reference's), so its error is its own
        same = backend.run("prefix", {"prefix": ref_frame.prefix})
        ref_logits = model.region_logits(ref_roi, tokens, ref_cache)
        got_logits = graph_model.region_logits(ref_roi, tokens, type(got_cache)(same["prefix_k"], same["prefix_v"]))

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).abs().max())

    return {"prefix": diff(ref_frame.prefix, got_frame.prefix),
            "features": diff(ref_frame.feature_map, got_frame.feature_map),
            "roi": diff(ref_roi, got_roi),
            "prefix_k": diff(torch.stack(ref_cache.keys), got_cache.keys),
            "prefix_v": diff(torch.stack(ref_cache.values), got_cache.values),
            "logits": diff(ref_logits, got_logits)}


def compare_official_with_torch(model: Any, backend: OnnxRuntimeBackend, rgb: np.ndarray,
                                masks: Sequence[np.ndarray], tokenizer: Any, seed: int = 0) -> dict[str, float]:
    """Official layout: max |difference| of the two graphs' outputs against PyTorch on one frame (noisy captions)."""
    from pdlm_ros.model.official import prepare_pass
    from pdlm_ros.runtime import GraphModel

    graph_model = GraphModel(backend, tokenizer=tokenizer)
    cfg = model.cfg
    ref_runner, got_runner = model.official_runner(), graph_model.official_runner()
    with torch.inference_mode():
        ref = prepare_pass(ref_runner, cfg, tokenizer, model.special_tokens, rgb, masks, cfg.decoding.caption_len)
        got = prepare_pass(got_runner, cfg, tokenizer, graph_model.special_tokens, rgb, masks,
                           cfg.decoding.caption_len)
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, cfg.decoder.vocab_size, ref.caption_pos.shape, generator=g)
        tokens[torch.rand(tokens.shape, generator=g) < 0.5] = cfg.mask_token_id
        # the step is compared on identical inputs (the reference's), so its error is its own
        ref_logits, got_logits = ref.logits(ref_runner, tokens), ref.logits(got_runner, tokens)

    def diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).abs().max())

    return {"visual": diff(ref.visual, got.visual), "roi": diff(ref.roi, got.roi), "logits": diff(ref_logits, got_logits)}
