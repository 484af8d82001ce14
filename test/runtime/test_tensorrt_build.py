"""TensorRT build planning (profiles, step variant, typing, keys) and the plugin's declared signature, checked
without TensorRT; the parts that need TensorRT must fail with a clear EngineError where it is missing."""

import dataclasses
import importlib.util
import inspect
import json

import pytest

from pdlm_ros.cli import main
from pdlm_ros.errors import ConfigError, EngineError
from pdlm_ros.runtime import MANIFEST_NAME
from pdlm_ros.runtime.engine_cache import DeviceInfo
from pdlm_ros.runtime.plugin import REGION_ATTENTION, plugin_supported, region_attention_qdp
from pdlm_ros.runtime.tensorrt_build import (BuildSettings, build_engines, choose_step_variant, effective_dims,
                                             engine_key, profile_shapes, typing_mode)
from pdlm_ros.runtime.tensorrt_runtime import TRT_TO_TORCH

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
ORIN = DeviceInfo("Orin", "8.7", "10.16.2")


def test_profiles_cover_the_exported_ranges(tiny_export, tiny_captioner):
    _, manifest = tiny_export
    cfg = tiny_captioner.config
    d = cfg.decoder
    dims = effective_dims(manifest, BuildSettings())
    step = profile_shapes(manifest.graph("step", "tensorrt"), dims)
    (p_lo, p_opt, p_hi), (r_lo, r_opt, r_hi) = manifest.dims["prefix"], manifest.dims["regions"]
    assert step["roi"] == ((r_lo, cfg.region.tokens, d.d_model), (r_opt, cfg.region.tokens, d.d_model),
                           (r_hi, cfg.region.tokens, d.d_model))
    assert step["prefix_k"] == tuple((d.n_layers, d.n_heads, p, d.head_dim) for p in (p_lo, p_opt, p_hi))
    vision = profile_shapes(manifest.graph("vision"), dims)
    assert vision["pixels"][2] == (cfg.vision.max_tiles + 1, 3, cfg.vision.image_size, cfg.vision.image_size)
    fewer = profile_shapes(manifest.graph("regions"), effective_dims(manifest, BuildSettings(max_regions=2)))
    assert fewer["samples"][0][0] == 1 and fewer["samples"][1][0] == 2 and fewer["samples"][2][0] == 2


def test_unknown_dynamic_axis_is_named(tiny_export):
    _, manifest = tiny_export
    with pytest.raises(EngineError, match="dynamic axis 'prefix' with no range"):
        profile_shapes(manifest.graph("prefix"), {"regions": (1, 2, 3)})


def test_step_variant_choice(tiny_export):
    _, manifest = tiny_export
    auto = BuildSettings()
    assert choose_step_variant(manifest, auto, True, "10.16.2")[0] == "tensorrt"
    variant, why = choose_step_variant(manifest, auto, False, "10.3.0")
    assert variant == "portable" and "10.3.0" in why
    assert choose_step_variant(manifest, BuildSettings(step_variant="portable"), True, "10.16.2")[0] == "portable"
    with pytest.raises(EngineError, match="needs >= 10.9"):
        choose_step_variant(manifest, BuildSettings(step_variant="tensorrt"), False, "10.3.0")
    portable_only = dataclasses.replace(manifest, variants=("portable",))
    assert choose_step_variant(portable_only, auto, True, "10.16.2") == ("portable", "the export has no tensorrt variant")


def test_plugin_needs_tensorrt_10_9():
    assert not plugin_supported("10.3.0")  # JetPack 6
    assert not plugin_supported("10.8.0.43")
    assert plugin_supported("10.9.0") and plugin_supported("10.16.2") and plugin_supported("11.1.0")


def test_typing_keeps_the_exported_precision():
    assert typing_mode("float16", None, "10.3.0") == ("strong", None)
    assert typing_mode("float16", "float16", "11.1.0") == ("strong", None)
    assert typing_mode("float32", "float16", "10.3.0") == ("weak", "FP16")
    assert typing_mode("float32", "bfloat16", "10.16.2") == ("weak", "BF16")
    with pytest.raises(EngineError, match="re-export the model with `pdlm-ros export --dtype float16`"):
        typing_mode("float32", "float16", "11.0.0")
    with pytest.raises(EngineError, match="cannot be built as float32"):
        typing_mode("float16", "float32", "10.16.2")


def test_engine_keys_follow_what_changes_a_plan(tiny_export):
    _, manifest = tiny_export
    graph = manifest.graph("step", "tensorrt")
    dims = effective_dims(manifest, BuildSettings())
    prof = profile_shapes(graph, dims)
    base = engine_key(graph, manifest, ORIN, prof, BuildSettings(), ("strong", None), "ph")
    assert base.model_hash == manifest.model_hash and base.onnx_sha256 == graph.sha256
    assert base.precision == "float32" and base.plugin_hash == "ph"
    fewer = profile_shapes(graph, effective_dims(manifest, BuildSettings(max_regions=2)))
    assert engine_key(graph, manifest, ORIN, fewer, BuildSettings(), ("strong", None), "ph") != base
    assert engine_key(graph, manifest, ORIN, prof, BuildSettings(workspace_mib=512), ("strong", None), "ph") != base
    vision = manifest.graph("vision")
    vkey = engine_key(vision, manifest, ORIN, profile_shapes(vision, dims), BuildSettings(), ("strong", None), "ph")
    assert vkey.plugin_hash == ""  # no plugin node: a kernel change does not invalidate it


def test_settings_are_validated():
    with pytest.raises(ConfigError, match="precision must be one of"):
        BuildSettings(precision="fp16")
    with pytest.raises(ConfigError, match="max_regions must be >= 1"):
        BuildSettings(max_regions=0)
    with pytest.raises(ConfigError, match="workspace must be >= 1 MiB"):
        BuildSettings(workspace_mib=0)
    with pytest.raises(ConfigError, match="step_variant"):
        BuildSettings(step_variant="fast")


def test_plugin_functions_take_the_declared_parameters():
    sig = REGION_ATTENTION
    names = list(sig.input_names) + list(sig.attribute_names)
    assert list(inspect.signature(region_attention_qdp.describe).parameters) == names
    assert list(inspect.signature(region_attention_qdp.aot_impl).parameters) == names + ["outputs", "tactic"]
    assert list(inspect.signature(region_attention_qdp.autotune).parameters) == list(sig.input_names) + ["outputs"]
    assert sig.qualified_name == "pdlm::RegionAttention"
    assert sig.node_attributes(num_heads=4, head_dim=40, scale=0.5) == {
        "num_heads": 4, "head_dim": 40, "scale": 0.5, "plugin_namespace": "pdlm", "plugin_version": "1", "aot": 1}
    with pytest.raises(ValueError, match=r"missing \['scale'\], unexpected \['mask'\]"):
        sig.node_attributes(num_heads=4, head_dim=40, mask=1)


def test_engine_dtypes_cover_the_exported_tensors(tiny_export):
    _, manifest = tiny_export
    names = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int64": "INT64"}
    for g in manifest.graphs:
        for t in g.inputs + g.outputs:
            assert names[t.dtype] in TRT_TO_TORCH


@pytest.mark.skipif(HAVE_TRT, reason="TensorRT is installed here")
def test_without_tensorrt_the_build_says_so(tiny_export, capsys):
    with pytest.raises(EngineError, match="TensorRT is not installed"):
        build_engines(tiny_export[0])
    assert main(["build-engine", "--onnx-dir", str(tiny_export[0])]) == 1
    assert "error: TensorRT is not installed" in capsys.readouterr().err


def test_export_cli_writes_graphs_and_verifies(tmp_path, capsys):
    out = tmp_path / "tiny"
    assert main(["export", "--preset", "tiny", "--out", str(out), "--variant", "portable", "--verify", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["variants"] == ["portable"] and (out / MANIFEST_NAME).is_file()
    assert [g["name"] for g in doc["graphs"]] == ["vision", "regions", "prefix", "step"]
    assert max(doc["verify_max_abs_diff"].values()) < 1e-4
    assert main(["export", "--preset", "tiny", "--out", str(out), "--variant", "tensorrt", "--verify"]) == 1
    assert "--verify runs the portable graphs" in capsys.readouterr().err
