"""TensorRT engine cache: a plan is reused only when everything it was built from and for still holds.

A plan is tied to the TensorRT version, the GPU (name and compute capability; on Jetson also the L4T release), the
graph it came from (whose hash covers model weights, precision and variant), the plugin kernel source, the
optimisation profile and the builder settings. All of that is the `EngineKey`. Next to each plan `<stem>.plan` lies
`<stem>.json`: the key it was built for plus the plan's size and sha256.

Before a plan is used, `EngineCache.resolve` checks it:
- missing, or no sidecar (foreign), or a sidecar for another key (stale) -> rebuild, or EngineError when rebuilds
  are off;
- sidecar unreadable, or plan bytes not matching the sidecar's sha256 (corrupt) -> the same;
- `engine_path` given explicitly -> that plan is never rebuilt: a mismatch is an EngineError naming the fields.
`load` checks the bytes once more as it reads them, so a plan that changed after `resolve` is never deserialized.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdlm_ros.errors import EngineError

__all__ = ["EngineKey", "DeviceInfo", "current_device", "device_capability", "CacheCheck", "Resolution",
           "EngineCache"]


SIDECAR_FORMAT = 1


@dataclass(frozen=True)
class DeviceInfo:
    gpu_name: str
    compute_capability: str  # "8.7"
    tensorrt_version: str
    platform: str = ""  # L4T release on Jetson (engines do not move between JetPack releases), else ""


def device_capability(index: int = 0) -> tuple[int, int]:
    """Compute capability of a CUDA device, through torch when it has CUDA, else cuda-python."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_capability(index)
    except ImportError:
        pass
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as err:
        raise EngineError("no CUDA device visible (torch has no CUDA and cuda-python is not installed)") from err
    major = cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMajor, index)
    minor = cudart.cudaDeviceGetAttribute(cudart.cudaDeviceAttr.cudaDevAttrComputeCapabilityMinor, index)
    if major[0] != cudart.cudaError_t.cudaSuccess:
        raise EngineError(f"cannot query CUDA device {index}: {major[0]}")
    return int(major[1]), int(minor[1])


def _gpu_name(index: int) -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(index)
    except ImportError:
        pass
    from cuda.bindings import runtime as cudart

    err, props = cudart.cudaGetDeviceProperties(index)
    if err != cudart.cudaError_t.cudaSuccess:
        raise EngineError(f"cannot query CUDA device {index}: {err}")
    return props.name.decode(errors="replace").rstrip("\x00")


def current_device(tensorrt_version: str, index: int = 0) -> DeviceInfo:
    """Identity of the GPU a plan would be built for, here and now."""
    major, minor = device_capability(index)
    release = Path("/etc/nv_tegra_release")
    platform = release.read_text().split(",")[0].strip() if release.is_file() else ""
    return DeviceInfo(_gpu_name(index), f"{major}.{minor}", tensorrt_version, platform)


@dataclass(frozen=True)
class EngineKey:
    """Everything a plan depends on. Two plans with equal keys are interchangeable."""

    graph: str  # vision | regions | prefix | step
    variant: str  # any | portable | tensorrt
    model_hash: str
    onnx_sha256: str  # the graph file(s) the plan was parsed from
    precision: str  # float16 | bfloat16 | float32
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    platform: str
    plugin_hash: str  # kernel/plugin sources ("" when the graph has no plugin node)
    profile: str  # JSON of the optimisation profile (input -> min/opt/max shapes)
    builder: str  # JSON of the builder settings that change the plan (workspace, optimisation level, typing)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()

    @property
    def stem(self) -> str:
        """File name stem: readable parts for people, the digest for uniqueness."""
        sm = self.compute_capability.replace(".", "")
        trt = re.sub(r"[^0-9.]", "", self.tensorrt_version)
        variant = "" if self.variant == "any" else f".{self.variant}"
        return f"{self.graph}{variant}-{self.precision}-sm{sm}-trt{trt}-{self.digest()[:12]}"

    def differences(self, other: "EngineKey") -> list[str]:
        """Human-readable list of fields that differ ("field: plan value != wanted value")."""
        mine, theirs = dataclasses.asdict(self), dataclasses.asdict(other)
        return [f"{k}: {_short(theirs[k])} (plan) != {_short(mine[k])} (here)" for k in mine if mine[k] != theirs[k]]


def _short(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 40 else s[:16] + "..." + s[-8:]


@dataclass(frozen=True)
class CacheCheck:
    status: str  # "ok" | "missing" | "stale" | "corrupt"
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class Resolution:
    path: Path  # where the plan is (status ok) or will be written (build)
    build: bool  # True: (re)build before use
    reason: str  # why a build is needed ("" when the cached plan is used)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sidecar_of(plan: Path) -> Path:
    return plan.with_suffix(".json")


class EngineCache:
    """Plans and their sidecars under one directory (by default `<export dir>/trt/`)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def plan_path(self, key: EngineKey) -> Path:
        return self.root / f"{key.stem}.plan"

    def timing_cache_path(self, device: DeviceInfo) -> Path:
        """One timing cache per GPU and TensorRT version (TensorRT refuses caches from another device)."""
        sm = device.compute_capability.replace(".", "")
        name = re.sub(r"[^A-Za-z0-9]+", "-", device.gpu_name).strip("-")
        return self.root / f"timing-{name}-sm{sm}-trt{device.tensorrt_version}.cache"

    def check(self, plan: Path, key: EngineKey, *, hash_plan: bool = True) -> CacheCheck:
        """Classify `plan` for `key` without deserializing it (`hash_plan=False`: size only, no sha256 pass)."""
        if not plan.is_file():
            return CacheCheck("missing", f"no plan at {plan}")
        side = sidecar_of(plan)
        if not side.is_file():
            return CacheCheck("stale", f"{plan.name} has no sidecar {side.name}: built elsewhere or by hand")
        try:
            data = json.loads(side.read_text())
            if data.get("format") != SIDECAR_FORMAT:
                raise ValueError(f"sidecar format {data.get('format')!r}, expected {SIDECAR_FORMAT}")
            built_for = EngineKey(**data["key"])
            size, digest = int(data["plan_bytes"]), str(data["plan_sha256"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            return CacheCheck("corrupt", f"sidecar {side} is unreadable ({type(err).__name__}: {err})")
        if built_for != key:
            return CacheCheck("stale", f"{plan.name} was built for another configuration: "
                              + "; ".join(key.differences(built_for)))
        if plan.stat().st_size != size or (hash_plan and _sha256(plan) != digest):
            return CacheCheck("corrupt", f"{plan} does not match its sidecar (size or sha256 differ): truncated or "
                              "overwritten")
        return CacheCheck("ok")

    def resolve(self, key: EngineKey, *, force_rebuild: bool = False, allow_rebuild: bool = True,
                engine_path: str | Path | None = None) -> Resolution:
        """Decide whether the plan for `key` can be used as is. Raises EngineError when it cannot and may not
        be rebuilt (rebuilds off, or an explicit `engine_path`)."""
        if engine_path is not None:
            plan = Path(engine_path)
            if force_rebuild:
                raise EngineError(f"force_rebuild and an explicit engine_path ({plan}) exclude each other")
            verdict = self.check(plan, key)
            if not verdict.ok:
                raise EngineError(f"refusing engine {plan}: {verdict.reason}. Rebuild it with "
                                  "`pdlm-ros build-engine`, or leave engine_path unset to use the cache")
            return Resolution(plan, False, "")
        plan = self.plan_path(key)
        if force_rebuild:
            return Resolution(plan, True, "rebuild forced")
        verdict = self.check(plan, key)
        if verdict.ok:
            return Resolution(plan, False, "")
        if not allow_rebuild:
            raise EngineError(f"no usable engine for {key.graph} ({verdict.status}): {verdict.reason}. Build it with "
                              "`pdlm-ros build-engine`, or allow rebuilds")
        return Resolution(plan, True, verdict.reason)

    def store(self, key: EngineKey, plan_bytes: bytes, extra: dict[str, Any] | None = None) -> Path:
        """Write plan then sidecar, each atomically: a crash never leaves a sidecar vouching for a partial plan."""
        self.root.mkdir(parents=True, exist_ok=True)
        plan = self.plan_path(key)
        side = sidecar_of(plan)
        side.unlink(missing_ok=True)
        tmp = plan.with_suffix(".plan.tmp")
        tmp.write_bytes(plan_bytes)
        os.replace(tmp, plan)
        doc = {"format": SIDECAR_FORMAT, "key": dataclasses.asdict(key), "plan_bytes": len(plan_bytes),
               "plan_sha256": hashlib.sha256(plan_bytes).hexdigest(), **(extra or {})}
        tmp = side.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, side)
        return plan

    def load(self, plan: Path, key: EngineKey) -> bytes:
        """The plan's bytes, checked against its sidecar and `key` as they are read."""
        verdict = self.check(plan, key, hash_plan=False)  # the bytes are hashed below, as read: one pass
        if not verdict.ok:
            raise EngineError(f"refusing engine {plan}: {verdict.reason}")
        data = plan.read_bytes()
        side = json.loads(sidecar_of(plan).read_text())
        if hashlib.sha256(data).hexdigest() != side["plan_sha256"]:
            raise EngineError(f"refusing engine {plan}: its bytes do not match the sidecar's sha256 (truncated or "
                              "overwritten); rebuild it")
        return data
