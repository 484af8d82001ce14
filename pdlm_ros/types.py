"""Plain data that crosses the package's layers: region inputs and caption results.

The model, the node, replay and the CLI all speak these types; ROS conversion lives only in `pdlm_ros.ros`.
Boxes are (x1, y1, x2, y2) in pixels of the source image, x right and y down; stamps are int nanoseconds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = ["MODES", "NATIVE_MODES", "OFFICIAL_MODES", "AR_MODES", "OFFICIAL_SAMPLERS", "CACHED_MODES", "RegionInput", "RegionCaption", "FrameStats", "FrameResult", "CaptionerLike"]

# Decoding modes (pdlm_ros.captioner documents each); here so that torch-free modules (node params, CLI) share them.
# `auto` is the checkpoint layout's default: parallel for native models, official for the released PerceptionDLM.
NATIVE_MODES = ("parallel", "threshold", "sequential", "sequential_nocache", "parallel_nocache", "nomask")
OFFICIAL_MODES = ("official", "isolated", "cached")
AR_MODES = ("ar",)  # the autoregressive twin (a checkpoint with objective ar): one region at a time, KV cache
OFFICIAL_SAMPLERS = ("global", "span", "threshold")  # how official-layout modes commit tokens
MODES = ("auto",) + NATIVE_MODES + OFFICIAL_MODES + AR_MODES
CACHED_MODES = ("parallel", "threshold", "sequential")  # the modes that decode against the prefix K/V cache


@dataclass(frozen=True)
class RegionInput:
    """One region to describe: a box, a mask, or both (the mask wins; the box is then its bounding box).

    `region_id` is the source detection id (`Detection2D.id`, a track id, may be empty); `source_index` is the
    region's index in the source array; `class_id`/`score` are passed through when known.
    """

    box: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2 in pixels
    mask: np.ndarray | None = None  # (H, W) bool, same size as the image
    region_id: str = ""
    source_index: int = -1
    class_id: str = ""
    score: float = math.nan
    refusal: str = ""  # non-empty: refuse this region with this reason, unlooked at (message conversion, budget)


@dataclass(frozen=True)
class RegionCaption:
    """The caption of one region. `error` is non-empty when the region was refused (then `caption` is empty)."""

    index: int  # position in the request
    region_id: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels (NaN when the input box was unusable)
    caption: str
    confidence: float  # mean probability of the committed caption tokens, in [0, 1]
    source_index: int = -1
    class_id: str = ""
    score: float = math.nan
    error: str = ""
    cached: bool = False  # True when the node reused an earlier caption of the same track

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(frozen=True)
class FrameStats:
    """Decoding accounting for one frame. TPF = tokens committed / NFE, all regions together."""

    nfe: int = 0  # forward passes of the decoder over region tokens (the prefix pass is not counted)
    tokens: int = 0  # caption tokens committed
    tpf: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)  # per stage, plus "total"
    # Official layout: tokens the decoder computed, all forwards together (the cost the fast modes cut), and the
    # length of the longest pass's sequence (the keys each token attends over). 0 where not counted.
    decoded_tokens: int = 0
    sequence_len: int = 0


@dataclass(frozen=True)
class FrameResult:
    """Captions of every region of one frame, in request order."""

    regions: list[RegionCaption]
    stats: FrameStats
    model_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        def clean(v: Any) -> Any:
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, (list, tuple)):
                return [clean(x) for x in v]
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v

        regions = []
        for r in self.regions:
            d = asdict(r)
            d["box"] = list(r.box)
            regions.append(clean(d))
        stats = {"nfe": self.stats.nfe, "tpf": self.stats.tpf, "tokens": self.stats.tokens,
                 "latency_ms": self.stats.latency_ms.get("total", 0.0), "stages_ms": dict(self.stats.latency_ms)}
        return {"model": self.model_name, "regions": regions, "stats": clean(stats)}


class CaptionerLike(Protocol):
    """What evaluation and replay need of a captioner: `pdlm_ros.Captioner` and every runtime backend fit it."""

    name: str

    def caption(self, image: np.ndarray, regions: list[RegionInput], *, mode: str = ...,
                steps: int | None = ...) -> FrameResult: ...
