"""Engine cache: a plan is used only when its sidecar vouches for this exact key; everything else is rebuilt or
refused before deserialization. Fake plan bytes stand in for TensorRT plans (the cache never parses them)."""

import dataclasses
import json

import pytest

from pdlm_ros.errors import EngineError
from pdlm_ros.runtime.engine_cache import DeviceInfo, EngineCache, EngineKey, sidecar_of

PLAN = b"\x00fake serialized engine\x01" * 100


def key(**changes):
    base = EngineKey(graph="step", variant="tensorrt", model_hash="ab" * 32, onnx_sha256="cd" * 32,
                     precision="float16", gpu_name="Orin", compute_capability="8.7", tensorrt_version="10.16.2",
                     platform="# R39 (release)", plugin_hash="ef" * 32, profile='{"roi": [[1], [4], [8]]}',
                     builder='{"optimization_level": 3}')
    return dataclasses.replace(base, **changes)


@pytest.fixture
def cache(tmp_path):
    return EngineCache(tmp_path / "trt")


def test_stem_is_readable_and_unique():
    k = key()
    assert k.stem.startswith("step.tensorrt-float16-sm87-trt10.16.2-")
    assert key(graph="vision", variant="any").stem.startswith("vision-float16-sm87")
    assert k.digest() == key().digest()
    assert len({key(**{f.name: "x"}).stem for f in dataclasses.fields(EngineKey)} | {k.stem}) == \
        len(dataclasses.fields(EngineKey)) + 1  # every field takes part in the key


def test_stored_plan_is_reused(cache):
    path = cache.store(key(), PLAN)
    assert path == cache.plan_path(key()) and sidecar_of(path).is_file()
    assert not list(cache.root.glob("*.tmp"))
    res = cache.resolve(key())
    assert (res.path, res.build, res.reason) == (path, False, "")
    assert cache.load(path, key()) == PLAN


@pytest.mark.parametrize("field,value", [("tensorrt_version", "10.9.0"), ("gpu_name", "NVIDIA H100 80GB HBM3"),
                                         ("compute_capability", "9.0"), ("model_hash", "00" * 32),
                                         ("precision", "bfloat16"), ("plugin_hash", "11" * 32)])
def test_key_mismatch_requests_a_rebuild(cache, field, value):
    """A plan built for another key sits at this key's path (e.g. copied from another machine)."""
    path = cache.store(key(**{field: value}), PLAN)
    target = cache.plan_path(key())
    path.rename(target)
    sidecar_of(path).rename(sidecar_of(target))
    verdict = cache.check(target, key())
    assert verdict.status == "stale" and field in verdict.reason
    res = cache.resolve(key())
    assert res.build and field in res.reason
    with pytest.raises(EngineError, match=f"no usable engine for step \\(stale\\).*{field}"):
        cache.resolve(key(), allow_rebuild=False)
    with pytest.raises(EngineError, match=f"refusing engine .*{field}"):
        cache.load(target, key())


def test_missing_and_foreign_plans(cache):
    res = cache.resolve(key())
    assert res.build and "no plan" in res.reason
    with pytest.raises(EngineError, match=r"no usable engine for step \(missing\).*pdlm-ros build-engine"):
        cache.resolve(key(), allow_rebuild=False)
    cache.root.mkdir(parents=True)
    cache.plan_path(key()).write_bytes(PLAN)  # a plan with no sidecar: built elsewhere or by hand
    verdict = cache.check(cache.plan_path(key()), key())
    assert verdict.status == "stale" and "no sidecar" in verdict.reason
    assert cache.resolve(key()).build


def test_corrupt_sidecar_is_a_clear_error(cache):
    path = cache.store(key(), PLAN)
    sidecar_of(path).write_text("{truncated")
    verdict = cache.check(path, key())
    assert verdict.status == "corrupt" and "sidecar" in verdict.reason and "unreadable" in verdict.reason
    with pytest.raises(EngineError, match=r"\(corrupt\).*sidecar .* is unreadable"):
        cache.resolve(key(), allow_rebuild=False)
    assert cache.resolve(key()).build
    sidecar_of(path).write_text(json.dumps({"format": 1, "key": {"graph": "step"}}))
    assert cache.check(path, key()).status == "corrupt"


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_plan_is_detected_before_use(cache, damage):
    path = cache.store(key(), PLAN)
    data = bytearray(PLAN)
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the sha256 can tell
    else:
        del data[-10:]
    path.write_bytes(bytes(data))
    verdict = cache.check(path, key())
    assert verdict.status == "corrupt" and "does not match its sidecar" in verdict.reason
    with pytest.raises(EngineError, match="do(es)? not match"):
        cache.load(path, key())
    with pytest.raises(EngineError, match=r"\(corrupt\)"):
        cache.resolve(key(), allow_rebuild=False)


def test_explicit_engine_path_is_never_rebuilt(cache, tmp_path):
    path = cache.store(key(), PLAN)
    res = cache.resolve(key(), engine_path=path)
    assert (res.path, res.build) == (path, False)
    with pytest.raises(EngineError, match="refusing engine .*tensorrt_version: 10.16.2 \\(plan\\) != 10.3.0"):
        cache.resolve(key(tensorrt_version="10.3.0"), engine_path=path)
    with pytest.raises(EngineError, match="exclude each other"):
        cache.resolve(key(), engine_path=path, force_rebuild=True)
    with pytest.raises(EngineError, match="no plan at"):
        cache.resolve(key(), engine_path=tmp_path / "nowhere.plan")


def test_force_rebuild(cache):
    cache.store(key(), PLAN)
    res = cache.resolve(key(), force_rebuild=True)
    assert res.build and res.reason == "rebuild forced"


def test_timing_cache_is_per_gpu_and_tensorrt_version(cache):
    a = cache.timing_cache_path(DeviceInfo("NVIDIA Jetson AGX Orin", "8.7", "10.3.0"))
    b = cache.timing_cache_path(DeviceInfo("NVIDIA H100 80GB HBM3", "9.0", "10.3.0"))
    c = cache.timing_cache_path(DeviceInfo("NVIDIA Jetson AGX Orin", "8.7", "10.16.2"))
    assert len({a, b, c}) == 3 and a.name == "timing-NVIDIA-Jetson-AGX-Orin-sm87-trt10.3.0.cache"
