"""The official layout exported to ONNX and run by ONNX Runtime reproduces the official code's tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pdlm_ros.errors import ConfigError
from pdlm_ros.model.checkpoint import load_pretrained
from pdlm_ros.model.official import prepare_pass
from pdlm_ros.model.sampler import global_remask_decode

pytest.importorskip("onnxruntime")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official"


@pytest.fixture(scope="module")
def official_export(tmp_path_factory):
    from pdlm_ros.runtime.onnx_export import export_model

    model, tok = load_pretrained(FIXTURES / "checkpoint", dtype=torch.float32)
    out = tmp_path_factory.mktemp("official-export") / "exp"
    manifest = export_model(model, out, tokenizer=tok, variant="portable")
    return out, manifest, model, tok


def test_export_holds_the_two_official_graphs(official_export):
    _, manifest, _, _ = official_export
    assert sorted(g.name for g in manifest.graphs) == ["official_step", "official_vision"]
    assert manifest.variants == ("portable",)


def test_onnxruntime_reproduces_official_final_tokens(official_export):
    from pdlm_ros.runtime import GraphModel
    from pdlm_ros.runtime.onnxruntime_backend import OnnxRuntimeBackend

    out, _, _, tok = official_export
    graph_model = GraphModel(OnnxRuntimeBackend(out), tokenizer=tok)
    runner = graph_model.official_runner()
    meta = {c["name"]: c for c in json.loads((FIXTURES / "fixtures.json").read_text())["cases"]}
    for name in ("six_tiles", "overlap_equal_area"):
        f, c = load_file(str(FIXTURES / f"{name}.safetensors")), meta[name]
        masks = [m.numpy().astype(bool) for m in f["masks"]]
        ps = prepare_pass(runner, graph_model.cfg, tok, graph_model.special_tokens, f["image"].numpy(), masks,
                          c["gen_len"])
        res = global_remask_decode(lambda t: ps.logits(runner, t), ps.caption_pos.numel(),
                                   graph_model.cfg.mask_token_id, steps=c["steps"])
        final = ps.seq.ids.index_put((ps.caption_pos,), res.tokens[0])
        assert torch.equal(final, f["final_tokens"]), name


def test_onnxruntime_captioner_runs_official_mode(official_export):
    from pdlm_ros.runtime import load_captioner
    from pdlm_ros.types import RegionInput

    out, _, _, _ = official_export
    cap = load_captioner(backend="onnxruntime", engine_path=out)
    assert cap.layout == "official"
    rgb = np.full((64, 96, 3), 90, dtype=np.uint8)
    res = cap.caption(rgb, [RegionInput(box=(5, 5, 40, 40)), RegionInput(box=(50, 10, 90, 60))], steps=3)
    assert [r.ok for r in res.regions] == [True, True] and res.stats.nfe == 3
    with pytest.raises(ConfigError, match="not one of the official layout's modes"):
        cap.caption(rgb, [RegionInput(box=(5, 5, 40, 40))], mode="parallel")


def test_tensorrt_variant_of_official_layout_is_refused(official_export, tmp_path):
    from pdlm_ros.runtime.onnx_export import export_model

    _, _, model, tok = official_export
    with pytest.raises(ConfigError, match="portable graphs only"):
        export_model(model, tmp_path / "trt", tokenizer=tok, variant="tensorrt")
