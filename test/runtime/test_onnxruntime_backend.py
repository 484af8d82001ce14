"""ONNX Runtime backend: the same captions as PyTorch at temperature 0, logits within tolerance, clear refusals."""

import json
import shutil

import numpy as np
import pytest
import torch

from pdlm_ros.captioner import DEFAULT_CHECKPOINT, Captioner
from pdlm_ros.errors import ConfigError, EngineError
from pdlm_ros.model.regions import prepare_regions
from pdlm_ros.runtime import MANIFEST_NAME, GraphModel, load_captioner
from pdlm_ros.runtime.onnxruntime_backend import OnnxRuntimeBackend, OnnxRuntimeCaptioner, compare_with_torch
from pdlm_ros.types import RegionInput
from test.conftest import assert_close


@pytest.fixture(scope="module")
def frame():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (90, 150, 3), dtype=np.uint8)
    mask = np.zeros((90, 150), bool)
    mask[40:70, 100:140] = True
    regions = [RegionInput(box=(5, 5, 40, 50)), RegionInput(mask=mask), RegionInput(box=(500, 500, 600, 600)),
               RegionInput(box=(0, 60, 30, 90))]
    return img, regions


@pytest.fixture(scope="module")
def ort_captioner(tiny_export):
    return OnnxRuntimeCaptioner.load(tiny_export[0])


def assert_same_captions(ref, got, conf_tol=1e-4):
    assert len(ref.regions) == len(got.regions)
    for a, b in zip(ref.regions, got.regions):
        assert (a.caption, a.error, a.box) == (b.caption, b.error, b.box)
        assert b.confidence == pytest.approx(a.confidence, abs=conf_tol)
    assert (ref.stats.nfe, ref.stats.tokens) == (got.stats.nfe, got.stats.tokens)


@pytest.mark.parametrize("mode", ["parallel", "threshold"])
def test_captions_match_pytorch_at_temperature_zero(tiny_captioner, ort_captioner, frame, mode):
    img, regions = frame
    kwargs = {"steps": 8} if mode == "parallel" else {"threshold": 0.05}
    ref = tiny_captioner.caption(img, regions, mode=mode, temperature=0.0, **kwargs)
    got = ort_captioner.caption(img, regions, mode=mode, temperature=0.0, **kwargs)
    assert_same_captions(ref, got)
    assert got.regions[2].error and "outside" in got.regions[2].error  # refused, not dropped
    assert got.model_name.endswith("(onnxruntime)")


def test_every_graph_output_matches_pytorch(tiny_captioner, ort_captioner, frame):
    img, regions = frame
    prepared, _ = prepare_regions(regions, img.shape[1], img.shape[0])
    diffs = compare_with_torch(tiny_captioner.model, ort_captioner.backend, img, prepared)
    assert set(diffs) == {"prefix", "features", "roi", "prefix_k", "prefix_v", "logits"}
    assert max(diffs.values()) < 1e-4, diffs


@pytest.mark.parametrize("n,views", [(1, 1), (8, 3)])
def test_step_logits_match_across_region_counts_and_prefix_lengths(tiny_captioner, ort_captioner, n, views):
    model, backend = tiny_captioner.model, ort_captioner.backend
    cfg = model.cfg
    d = cfg.decoder
    g = torch.Generator().manual_seed(n)
    p = views * cfg.vision.tokens_per_view + len(backend.manifest.prompt_ids)
    prefix = torch.randn(p, d.d_model, generator=g)
    roi = torch.randn(n, cfg.region.tokens, d.d_model, generator=g)
    tokens = torch.randint(0, d.vocab_size, (n, cfg.decoding.caption_len), generator=g)
    with torch.no_grad():
        cache = model.prefix_cache(type("F", (), {"prefix": prefix})())
        ref = model.region_logits(roi, tokens, cache)
    kv = backend.run("prefix", {"prefix": prefix})
    assert_close(kv["prefix_k"], torch.stack(cache.keys), atol=1e-5, what="prefix keys")
    out = backend.run("step", {"roi": roi, "tokens": tokens, **kv})
    assert_close(out["logits"], ref, atol=1e-4, what=f"logits n={n} P={p}")


def test_default_model_parity_when_bundled(frame, tmp_path):
    if not (DEFAULT_CHECKPOINT / "model.safetensors").is_file():
        pytest.skip(f"no bundled default model at {DEFAULT_CHECKPOINT} yet")
    img, regions = frame
    cap = Captioner.load()
    ort_cap = load_captioner(backend="onnxruntime", engine_root=tmp_path)
    assert isinstance(ort_cap, OnnxRuntimeCaptioner)
    assert_same_captions(cap.caption(img, regions), ort_cap.caption(img, regions))


def test_recomputing_modes_are_refused_with_the_reason(ort_captioner, frame):
    img, regions = frame
    for mode in ("sequential_nocache", "parallel_nocache", "nomask"):
        with pytest.raises(ConfigError, match="needs|has no exported graph"):
            ort_captioner.caption(img, regions, mode=mode)
    with pytest.raises(EngineError, match="cached modes"):
        ort_captioner.model.dense_logits()


def test_a_graph_model_is_what_captioner_expects(ort_captioner):
    model = ort_captioner.model
    assert isinstance(model, GraphModel)
    assert ort_captioner.config.name == "pdlm-tiny" and ort_captioner.device == torch.device("cpu")
    assert ort_captioner.tokenizer is not None


def test_unusable_exports_are_refused(tiny_export, tmp_path):
    out, _ = tiny_export
    bf16 = tmp_path / "bf16"
    shutil.copytree(out, bf16)
    doc = json.loads((bf16 / MANIFEST_NAME).read_text())
    doc["precision"] = "bfloat16"
    (bf16 / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(EngineError, match="bfloat16"):
        OnnxRuntimeBackend(bf16)
    trt_only = tmp_path / "trt_only"
    shutil.copytree(out, trt_only)
    doc = json.loads((trt_only / MANIFEST_NAME).read_text())
    doc["graphs"] = [g for g in doc["graphs"] if (g["name"], g["variant"]) != ("step", "portable")]
    doc["variants"] = ["tensorrt"]
    (trt_only / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(EngineError, match="no 'step' graph for variant 'portable'"):
        OnnxRuntimeBackend(trt_only)


def test_backend_inputs_are_checked_by_name(ort_captioner):
    with pytest.raises(EngineError, match="takes inputs"):
        ort_captioner.backend.run("prefix", {"x": torch.zeros(3, 4)})
    with pytest.raises(EngineError, match="ONNX Runtime failed on graph 'prefix'"):
        ort_captioner.backend.run("prefix", {"prefix": torch.zeros(3, 7)})


def test_load_captioner_picks_the_backend(tiny_export, tmp_path):
    out, _ = tiny_export
    assert isinstance(load_captioner(backend="onnxruntime", engine_path=out), OnnxRuntimeCaptioner)
    with pytest.raises(ConfigError, match="unknown backend 'onnx'"):
        load_captioner(backend="onnx")
    with pytest.raises(EngineError, match="is a file"):
        load_captioner(backend="onnxruntime", engine_path=out / "step.onnx")
    with pytest.raises(EngineError, match="CUDA"):
        load_captioner(backend="tensorrt", engine_path=out, device="cpu")


def test_fewer_regions_per_pass_give_the_same_captions(ort_captioner, tiny_export, frame):
    """An engine built for fewer regions per pass makes the captioner chunk; isolated regions make that exact."""
    from pdlm_ros.runtime import GraphCaptioner

    img, regions = frame
    chunked = GraphCaptioner(ort_captioner.backend, ort_captioner.tokenizer, max_regions=2)
    assert chunked.config.region.max_regions == 2
    ref = ort_captioner.caption(img, regions, steps=4)
    got = chunked.caption(img, regions, steps=4)
    assert [r.caption for r in got.regions] == [r.caption for r in ref.regions]
    assert got.stats.nfe == 2 * ref.stats.nfe  # 3 usable regions: two passes of 4 steps


def test_engine_cache_directory_points_to_its_export(tiny_export, tmp_path):
    out, _ = tiny_export
    trt_dir = out / "trt"
    trt_dir.mkdir(exist_ok=True)
    cap = load_captioner(backend="onnxruntime", engine_path=trt_dir, device="cpu")
    assert isinstance(cap, OnnxRuntimeCaptioner) and cap.backend.export_dir == out
