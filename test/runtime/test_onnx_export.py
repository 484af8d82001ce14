"""ONNX export: valid graphs, the custom node where attention was, a sidecar that describes what is on disk."""

import hashlib
import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from pdlm_ros.errors import ConfigError, EngineError
from pdlm_ros.runtime import MANIFEST_NAME, read_manifest
from pdlm_ros.runtime.onnx_export import StepGraph, export_model, model_hash, register_onnx_schema
from pdlm_ros.runtime.plugin.signature import REGION_ATTENTION


def load(export_dir, name):
    return onnx.load(str(export_dir / name))


def test_every_graph_passes_the_onnx_checker(tiny_export):
    out, manifest = tiny_export
    register_onnx_schema()
    assert {(g.name, g.variant) for g in manifest.graphs} == {
        ("vision", "any"), ("regions", "any"), ("prefix", "any"), ("step", "portable"), ("step", "tensorrt")}
    for g in manifest.graphs:
        onnx.checker.check_model(load(out, g.file), full_check=True)


def test_tensorrt_variant_has_one_region_attention_per_layer_where_attention_was(tiny_export, tiny_captioner):
    out, _ = tiny_export
    layers = tiny_captioner.config.decoder.n_layers
    portable, trt = load(out, "step.onnx").graph, load(out, "step.trt.onnx").graph
    custom = [n for n in trt.node if n.domain == REGION_ATTENTION.namespace]
    assert len(custom) == layers
    assert all(n.op_type == REGION_ATTENTION.name for n in custom)
    assert not [n for n in portable.node if n.domain]  # portable: standard ops only

    def count(graph, op):
        return sum(n.op_type == op for n in graph.node)

    # Each layer's attention softmax moved into the node; the one softmax left is the step's prob output.
    assert count(portable, "Softmax") == layers + 1
    assert count(trt, "Softmax") == 1
    # Each node's output feeds that layer's attention output projection (through reshapes only).
    matmul_inputs = [i for n in trt.node if n.op_type == "MatMul" for i in n.input]
    for node in custom:
        reached = set(node.output)
        for n in trt.node:
            if n.op_type in ("Transpose", "Reshape") and n.input[0] in reached:
                reached.update(n.output)
        assert reached & set(matmul_inputs), f"{node.name} does not feed a projection"


def test_region_attention_nodes_match_the_declared_signature(tiny_export, tiny_captioner):
    out, manifest = tiny_export
    sig = REGION_ATTENTION
    assert manifest.plugin == sig.to_dict()  # the sidecar carries the signature the graph was written against
    d = tiny_captioner.config.decoder
    model = onnx.shape_inference.infer_shapes(load(out, "step.trt.onnx"))
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in model.graph.value_info}
    kinds = {onnx.AttributeProto.INT: "int", onnx.AttributeProto.FLOAT: "float", onnx.AttributeProto.STRING: "str"}
    for node in model.graph.node:
        if node.domain != sig.namespace:
            continue
        assert node.op_type == sig.name
        assert len(node.input) == len(sig.inputs) and len(node.output) == len(sig.outputs)
        # O(L) contract: four-dimensional q/k/v and three-dimensional prefix K/V, no (T, T) mask input
        assert [ranks[i] for i in node.input] == [len(t.dims) for t in sig.inputs]
        attrs = {a.name: a for a in node.attribute}
        assert set(attrs) == set(sig.attribute_names) | {name for name, _ in sig.routing}
        for spec in sig.attributes:
            assert kinds[attrs[spec.name].type] == spec.type
        values = {name: onnx.helper.get_attribute_value(a) for name, a in attrs.items()}
        assert values["num_heads"] == d.n_heads and values["head_dim"] == d.head_dim
        assert values["scale"] == pytest.approx(d.head_dim ** -0.5)
        assert values["plugin_namespace"].decode() == sig.namespace
        assert values["plugin_version"].decode() == sig.version
        assert values["aot"] == 1


def test_the_registered_schema_rejects_a_node_that_breaks_the_signature(tiny_export):
    out, _ = tiny_export
    register_onnx_schema()
    model = load(out, "step.trt.onnx")
    node = next(n for n in model.graph.node if n.op_type == REGION_ATTENTION.name)
    node.attribute.append(onnx.helper.make_attribute("mask", [1, 0]))
    with pytest.raises(onnx.checker.ValidationError, match="mask"):
        onnx.checker.check_model(model)
    model = load(out, "step.trt.onnx")
    node = next(n for n in model.graph.node if n.op_type == REGION_ATTENTION.name)
    del node.input[4]
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)


def test_sidecar_describes_the_files(tiny_export, tiny_captioner):
    out, manifest = tiny_export
    assert read_manifest(out) == manifest
    cfg = tiny_captioner.config
    assert manifest.model_hash == model_hash(tiny_captioner.model)
    assert manifest.precision == "float32" and manifest.opset == 18
    assert manifest.variants == ("portable", "tensorrt")
    assert manifest.dims["regions"] == (1, 4, cfg.region.max_regions)
    t, pt = cfg.vision.tokens_per_view, len(manifest.prompt_ids)
    assert manifest.dims["prefix"] == (t + pt, t + pt, (cfg.vision.max_tiles + 1) * t + pt)
    for g in manifest.graphs:
        assert hashlib.sha256((out / g.file).read_bytes()).hexdigest() == g.sha256
        proto = load(out, g.file)
        assert [i.name for i in g.inputs] == [i.name for i in proto.graph.input]
    step = manifest.graph("step", "portable")
    assert [(t.name, t.dims, t.dtype) for t in step.inputs] == [
        ("roi", ("regions", cfg.region.tokens, cfg.decoder.d_model), "float32"),
        ("tokens", ("regions", cfg.decoding.caption_len), "int64"),
        ("prefix_k", (cfg.decoder.n_layers, cfg.decoder.n_heads, "prefix", cfg.decoder.head_dim), "float32"),
        ("prefix_v", (cfg.decoder.n_layers, cfg.decoder.n_heads, "prefix", cfg.decoder.head_dim), "float32")]
    assert [(t.name, t.dims) for t in step.outputs] == [
        ("logits", ("regions", cfg.decoding.caption_len, cfg.decoder.vocab_size)),
        ("token", ("regions", cfg.decoding.caption_len)), ("prob", ("regions", cfg.decoding.caption_len))]
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_model_hash_follows_weights_and_config(tiny_captioner):
    model = tiny_captioner.model
    h = model_hash(model)
    assert h == model_hash(model)
    w = model.region.geometry.bias
    with torch.no_grad():
        w[0] += 1e-3
        try:
            assert model_hash(model) != h
        finally:
            w[0] -= 1e-3
    assert model_hash(model) == h


def test_step_graph_token_and_prob_are_what_the_sampler_computes(tiny_captioner):
    model = tiny_captioner.model
    cfg = model.cfg
    g = torch.Generator().manual_seed(3)
    d = cfg.decoder
    roi = torch.randn(3, cfg.region.tokens, d.d_model, generator=g)
    tokens = torch.randint(0, d.vocab_size, (3, cfg.decoding.caption_len), generator=g)
    pk, pv = (torch.randn(d.n_layers, d.n_heads, 11, d.head_dim, generator=g) for _ in range(2))
    with torch.no_grad():
        logits, token, prob = StepGraph(model)(roi, tokens, pk, pv)
    ref = logits.float().clone()
    ref[..., cfg.mask_token_id] = -torch.inf  # as diffusion_decode does
    assert torch.equal(token, ref.argmax(-1))
    assert torch.allclose(prob, torch.softmax(ref, -1).gather(-1, token.unsqueeze(-1)).squeeze(-1))
    assert not (token == cfg.mask_token_id).any()


def test_bad_arguments_and_broken_exports_are_named(tiny_export, tiny_captioner, tmp_path):
    with pytest.raises(ConfigError, match="variant must be one of"):
        export_model(tiny_captioner.model, tmp_path / "x", variant="fast")
    with pytest.raises(EngineError, match="no export.json"):
        read_manifest(tmp_path)
    out, _ = tiny_export
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(EngineError, match="corrupt export sidecar"):
        read_manifest(broken)
    shutil.copy(out / MANIFEST_NAME, broken / MANIFEST_NAME)
    (broken / "prefix.onnx").unlink()
    with pytest.raises(EngineError, match="prefix.onnx but the file is missing"):
        read_manifest(broken)
    doc = json.loads((out / MANIFEST_NAME).read_text())
    doc["format"] = 99
    (broken / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(EngineError, match="export format 99"):
        read_manifest(broken)


def test_ensure_export_reuses_a_matching_directory(tiny_export, tiny_captioner, tmp_path, monkeypatch):
    from pdlm_ros.runtime import onnx_export

    out, manifest = tiny_export
    target = tmp_path / "cache"
    shutil.copytree(out, target)
    calls = []
    monkeypatch.setattr(onnx_export, "export_model", lambda *a, **k: calls.append(k))
    assert onnx_export.ensure_export(preset="tiny", out_dir=target) == target
    assert calls == []  # same model hash, precision and variant: reused
    doc = json.loads((target / MANIFEST_NAME).read_text())
    doc["model_hash"] = "0" * 64
    (target / MANIFEST_NAME).write_text(json.dumps(doc))
    onnx_export.ensure_export(preset="tiny", out_dir=target)
    assert len(calls) == 1 and calls[0]["hash_"] == manifest.model_hash  # another model: exported again
    assert not (target / MANIFEST_NAME).exists()  # the stale directory was cleared first


def test_graph_inputs_accept_the_dynamic_ranges(tiny_export, tiny_captioner):
    import onnxruntime as ort

    out, manifest = tiny_export
    cfg = tiny_captioner.config
    vision = ort.InferenceSession(str(out / "vision.onnx"))
    lo, _, hi = manifest.dims["views"]
    for views in (lo, hi):
        pixels = np.random.default_rng(views).standard_normal((views, 3, cfg.vision.image_size,
                                                                cfg.vision.image_size)).astype(np.float32)
        prefix, feats = vision.run(None, {"pixels": pixels})
        assert prefix.shape[0] in manifest.dims["prefix"] and feats.shape[0] == views
