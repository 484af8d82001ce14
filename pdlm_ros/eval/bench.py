"""Decoding benchmark: parallel vs sequential vs autoregressive region captioning, on one model and the same frames.

Modes (`BENCH_MODES`), all on the same weights:
- `parallel`: every region in one denoising pass against the exact prefix cache (the default path);
- `threshold`: the same with confidence-threshold commits (fewer forwards when the model is confident);
- `sequential`: one region per pass, one token per forward, with the prefix cache (pure parallelism is the ratio
  parallel / sequential: same work per token, more tokens per forward);
- `sequential_nocache`: the published baseline: one region per pass, the whole sequence recomputed every step;
- `parallel_nocache`: all regions in one pass, the whole sequence recomputed every step (the paper's parallel mode);
- `ar`: a causal decoder of the same width and depth with a KV cache, greedy, one region at a time
  (`pdlm_ros.model.ar_baseline`): the cost of an AR region captioner.

Accounting: NFE and tokens of the diffusion modes are the captioner's own per-frame stats (the decoding that
happened), those of `ar` come from its decoder. Latency is end to end per frame (image in, captions out, vision and
prefix included), the median over repeats, with the device synchronised around each frame. Tokens per second =
caption tokens committed / latency; every mode commits caption_len tokens per region, so the throughputs compare.

The achieved FLOP/s of one cached denoising step is compared with the same matrix products (the model's own weights,
the step's shapes) run back to back, and with one large square product: how close the step is to what the device
does on plain matrix products.

Cross-frame batching (`run_cross_frame_bench`): F frames x n regions captioned by one `Captioner.caption_frames`
call (their regions in one denoising pass) against F `caption` calls, one frame at a time, measured alternately on
the same frames; tokens per second of both and their ratio per F, and whether every caption came out the same.

Frames are synthetic scenes (`pdlm_ros.data.scenes`) rendered at a camera size; regions are their objects' boxes,
cycled when a count exceeds the objects in the frame (regions are independent, so a repeated box costs the same).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pdlm_ros.captioner import Captioner
from pdlm_ros.data.scenes import generate_scene, render_scene, sample_specs, scene_seeds
from pdlm_ros.errors import ConfigError
from pdlm_ros.model.ar_baseline import ARRegionDecoder
from pdlm_ros.model.image import to_rgb_uint8
from pdlm_ros.model.regions import prepare_regions
from pdlm_ros.types import RegionInput

__all__ = [
    "BENCH_MODES",
    "PUBLISHED",
    "BenchSettings",
    "BenchRow",
    "StepFlops",
    "ThresholdCheck",
    "Target",
    "BenchReport",
    "make_frames",
    "run_bench",
    "measure_step_flops",
    "threshold_check",
    "peak_matmul_flops",
    "machine_info",
    "CrossFrameRow",
    "CrossFrameReport",
    "run_cross_frame_bench",
]

log = logging.getLogger(__name__)

BENCH_MODES = ("parallel", "threshold", "sequential", "sequential_nocache", "parallel_nocache", "ar")
# The paper's figures (8B model on a GPU): throughput over the sequential baseline at 4 regions, per-image latency.
PUBLISHED = {"throughput_vs_sequential_at_4_regions": 3.44, "latency_s_sequential": 10.04, "latency_s_parallel": 2.92}
# Ratios reported per region count: name -> (numerator mode, denominator mode, metric).
RATIOS: dict[str, tuple[str, str, str]] = {
    "parallel_vs_sequential_nocache": ("parallel", "sequential_nocache", "tokens_per_s"),
    "parallel_vs_sequential": ("parallel", "sequential", "tokens_per_s"),
    "parallel_vs_ar": ("parallel", "ar", "tokens_per_s"),
    "parallel_nocache_vs_sequential_nocache": ("parallel_nocache", "sequential_nocache", "tokens_per_s"),
    "cached_vs_uncached_step": ("parallel", "parallel_nocache", "step_ms"),
    "threshold_vs_parallel_nfe": ("threshold", "parallel", "nfe"),
}


@dataclass(frozen=True)
class BenchSettings:
    regions: tuple[int, ...] = (1, 2, 4, 8, 16)
    modes: tuple[str, ...] = BENCH_MODES
    steps: int | None = None  # denoising steps (None: the model's, = caption_len)
    repeats: int = 3  # measured frames per cell; the latency is their median
    warmup: int = 1  # unmeasured runs per cell (one denoising step each) and one full frame before the first cell
    max_cell_s: float | None = 30.0  # stop repeating a cell after this many seconds (it still gets one run)
    frame_size: tuple[int, int] = (1280, 720)  # width, height: 16:9 gives 2 tiles + a thumbnail
    frames: int = 2  # distinct frames, cycled over repeats
    seed: int = 0
    flops: bool = True  # measure the achieved FLOP/s of the denoising step

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in BENCH_MODES]
        if unknown:
            raise ConfigError(f"unknown benchmark mode(s) {', '.join(unknown)}; choose from {', '.join(BENCH_MODES)}")
        if not self.modes:
            raise ConfigError("no benchmark modes given")
        if not self.regions or any(n < 1 for n in self.regions):
            raise ConfigError(f"region counts must be >= 1 (got {list(self.regions)})")
        if self.repeats < 1 or self.warmup < 0 or self.frames < 1:
            raise ConfigError(f"need repeats >= 1, warmup >= 0, frames >= 1 (got {self.repeats}, {self.warmup}, "
                              f"{self.frames})")
        if min(self.frame_size) < 16:
            raise ConfigError(f"frame size must be at least 16x16 pixels (got {self.frame_size})")


@dataclass(frozen=True)
class BenchRow:
    mode: str
    regions: int
    latency_ms: float  # median per-frame latency, end to end
    tokens_per_s: float  # caption tokens / latency
    nfe: int  # decoder forward passes per frame (the prefix pass not counted)
    tpf: float  # tokens per forward, all regions together
    tokens: int  # caption tokens committed per frame
    decode_ms: float  # median time of the decoding loop (the prefix pass not included)
    step_ms: float  # decode_ms / nfe: one forward pass plus its share of sampling
    repeats: int
    latencies_ms: tuple[float, ...] = ()
    stages_ms: dict[str, float] = field(default_factory=dict)  # median per stage


@dataclass(frozen=True)
class StepFlops:
    """One cached denoising step over `regions` regions against a `prefix_len`-token prefix."""

    regions: int
    prefix_len: int
    flops: float  # matrix-product FLOPs of the step (elementwise work is not counted)
    step_ms: float  # the step alone (model.region_logits), median
    matmul_ms: float  # the same matrix products alone, back to back, median
    step_flops_per_s: float
    matmul_flops_per_s: float
    fraction: float  # step / matmul FLOP/s


@dataclass(frozen=True)
class ThresholdCheck:
    """Threshold vs default (schedule) decoding on a trained model, on held-out scenes it was built for."""

    model: str
    scenes: int
    regions: int
    threshold: float
    nfe_parallel: int
    nfe_threshold: int
    nfe_ratio: float  # threshold / parallel
    tpf_per_region: float  # threshold mode: tokens / (NFE x regions)
    same_caption: float  # share of regions whose threshold caption equals the default one
    exact_parallel: float  # share of regions captioned exactly as the scene's ground truth, default mode
    exact_threshold: float  # the same in threshold mode


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None  # None: not measured in this run
    goal: str
    met: bool | None


@dataclass(frozen=True)
class BenchReport:
    rows: list[BenchRow]
    ratios: dict[str, dict[int, float]]
    step_flops: list[StepFlops]
    peak_matmul_flops_per_s: float | None
    threshold_check: ThresholdCheck | None
    targets: list[Target]
    model: dict[str, Any]
    settings: BenchSettings
    machine: dict[str, Any]
    torch_version: str
    git_commit: str | None
    date_utc: str
    wall_s: float

    def row(self, mode: str, regions: int) -> BenchRow | None:
        return next((r for r in self.rows if r.mode == mode and r.regions == regions), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [asdict(r) for r in self.rows],
            "ratios": {name: {str(n): v for n, v in per_n.items()} for name, per_n in self.ratios.items()},
            "step_flops": [asdict(s) for s in self.step_flops],
            "peak_matmul_flops_per_s": self.peak_matmul_flops_per_s,
            "threshold_check": asdict(self.threshold_check) if self.threshold_check else None,
            "targets": [asdict(t) for t in self.targets],
            "published": dict(PUBLISHED),
            "model": self.model,
            "settings": asdict(self.settings),
            "machine": self.machine,
            "torch_version": self.torch_version,
            "git_commit": self.git_commit,
            "date_utc": self.date_utc,
            "wall_s": self.wall_s,
        }


# -- frames ----------------------------------------------------------------------------------------------------------
def make_frames(count: int, width: int, height: int, objects: int, seed: int = 0) -> list[tuple[np.ndarray, list]]:
    """`count` synthetic scenes of width x height with up to `objects` objects -> (image, object boxes) each."""
    frames = []
    for i in range(count):
        rng = np.random.default_rng(seed + i)
        scene = render_scene(sample_specs(rng, width, height, objects), width, height, background_seed=seed + i)
        boxes = [o.box for o in scene.objects if o.box[2] > o.box[0] and o.box[3] > o.box[1]]
        if not boxes:
            raise ConfigError(f"no object could be placed in a {width}x{height} frame; use a larger --frame-size")
        frames.append((scene.image, boxes))
    return frames


def _regions(boxes: Sequence[tuple[float, float, float, float]], n: int) -> list[RegionInput]:
    return [RegionInput(box=boxes[i % len(boxes)]) for i in range(n)]


# -- timing ------------------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    """(milliseconds, result) of fn(), with the device idle before and finished after."""
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1000.0, out


@dataclass(frozen=True)
class _Run:
    """One measured frame."""

    ms: float
    nfe: int
    tokens: int
    stages_ms: dict[str, float]


def _diffusion_run(cap: Captioner, image: np.ndarray, regions: list[RegionInput], mode: str,
                   steps: int | None) -> _Run:
    ms, res = _timed(cap.device, lambda: cap.caption(image, regions, mode=mode, steps=steps))
    failed = [r.error for r in res.regions if r.error]
    if failed:  # the frames are generated, so this is a bug, not user input
        raise RuntimeError(f"benchmark region refused: {failed[0]}")
    return _Run(ms, res.stats.nfe, res.stats.tokens, dict(res.stats.latency_ms))


def _ar_run(cap: Captioner, ar: ARRegionDecoder, image: np.ndarray, regions: list[RegionInput],
            caption_len: int | None = None) -> _Run:
    """The AR captioner's frame: the same vision, RoI tokens and prefix as the diffusion modes, then AR decoding."""
    model, dev = cap.model, cap.device
    length = cap.config.decoding.caption_len if caption_len is None else caption_len
    stages: dict[str, float] = {}

    def frame() -> Any:
        rgb = to_rgb_uint8(image)
        prepared, errors = prepare_regions(regions, rgb.shape[1], rgb.shape[0])
        if errors:
            raise RuntimeError(f"benchmark region refused: {next(iter(errors.values()))}")
        with torch.inference_mode():
            stages["vision"], enc = _timed(dev, lambda: model.encode_frame(rgb))
            stages["roi"], roi = _timed(dev, lambda: model.roi_tokens(enc, prepared))
            stages["prefix"], cache = _timed(dev, lambda: ar.prefix_cache(enc.prefix, roi.shape[1] + length))
            stages["decode"], res = _timed(dev, lambda: ar.decode_regions(cache, roi, length))
        return res

    ms, res = _timed(dev, frame)
    stages["total"] = ms
    return _Run(ms, res.nfe, res.tokens_generated, stages)


def _prefix_len(cap: Captioner, image: np.ndarray) -> int:
    with torch.inference_mode():
        return int(cap.model.encode_frame(to_rgb_uint8(image)).prefix.shape[0])


def _median_stages(runs: Sequence[_Run]) -> dict[str, float]:
    keys = set.intersection(*(set(r.stages_ms) for r in runs))
    return {k: statistics.median(r.stages_ms[k] for r in runs) for k in sorted(keys)}


def _measure_cell(cap: Captioner, ar: ARRegionDecoder, frames: list[tuple[np.ndarray, list]], mode: str, n: int,
                  s: BenchSettings) -> BenchRow:
    def run(i: int) -> _Run:
        image, boxes = frames[i % len(frames)]
        if mode == "ar":
            return _ar_run(cap, ar, image, _regions(boxes, n))
        return _diffusion_run(cap, image, _regions(boxes, n), mode, s.steps)

    for i in range(s.warmup):  # same forward shapes as the measured runs, one step each
        image, boxes = frames[i % len(frames)]
        if mode == "ar":
            _ar_run(cap, ar, image, _regions(boxes, n), caption_len=2)
        else:
            _diffusion_run(cap, image, _regions(boxes, n), "parallel" if mode == "threshold" else mode, 1)
    runs: list[_Run] = []
    start = time.perf_counter()
    for i in range(s.repeats):
        runs.append(run(i))
        if s.max_cell_s is not None and time.perf_counter() - start > s.max_cell_s:
            break
    if len({(r.nfe, r.tokens) for r in runs}) > 1:
        log.info("%s at %d regions: NFE/tokens vary between frames: %s", mode, n, [(r.nfe, r.tokens) for r in runs])
    latency = statistics.median(r.ms for r in runs)
    nfe = round(statistics.median(r.nfe for r in runs))
    tokens = round(statistics.median(r.tokens for r in runs))
    decode = statistics.median(r.stages_ms.get("decode", 0.0) for r in runs)
    return BenchRow(mode=mode, regions=n, latency_ms=latency, tokens_per_s=tokens / latency * 1000.0, nfe=nfe,
                    tpf=tokens / nfe if nfe else 0.0, tokens=tokens, decode_ms=decode,
                    step_ms=decode / nfe if nfe else 0.0, repeats=len(runs),
                    latencies_ms=tuple(r.ms for r in runs), stages_ms=_median_stages(runs))


# -- FLOP/s of the denoising step --------------------------------------------------------------------------------------
def _median_ms(device: torch.device, fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    return statistics.median(_timed(device, fn)[0] for _ in range(repeats))


def _step_matmuls(cap: Captioner, n: int, prefix_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every matrix product of one cached denoising step over n regions, as (a, b) pairs for torch.matmul.

    Weights are the model's own (so memory traffic is the real one); activations are random of the step's shapes.
    The attention products follow the `shared_prefix` formulation (pdlm_ros.model.attention).
    """
    cfg = cap.config
    d = cfg.decoder
    s = cfg.region.tokens + cfg.decoding.caption_len  # tokens per region block
    t, h, hd = n * s, d.n_heads, d.head_dim
    w = cap.model.decoder.wte.weight
    gen = torch.Generator().manual_seed(0)

    def act(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen).to(device=w.device, dtype=w.dtype)

    x, x_ff = act(t, d.d_model), act(t, d.mlp_hidden_size)
    q_all, probs_p, pk, pv = act(h, t, hd), act(h, t, prefix_len), act(h, hd, prefix_len), act(h, prefix_len, hd)
    q_blk, k_blk, probs_o, v_blk = act(n * h, s, hd), act(n * h, hd, s), act(n * h, s, s), act(n * h, s, hd)
    pairs = []
    for block in cap.model.decoder.blocks:
        pairs += [(x, block.q_proj.weight.t()), (x, block.k_proj.weight.t()), (x, block.v_proj.weight.t()),
                  (q_all, pk), (q_blk, k_blk), (probs_p, pv), (probs_o, v_blk), (x, block.attn_out.weight.t()),
                  (x, block.ff_proj.weight.t()), (x, block.up_proj.weight.t()), (x_ff, block.ff_out.weight.t())]
    pairs.append((act(n * cfg.decoding.caption_len, d.d_model), cap.model.decoder.ff_out.weight.t()))  # LM head
    return pairs


def measure_step_flops(cap: Captioner, image: np.ndarray, boxes: Sequence, n: int, repeats: int = 3) -> StepFlops:
    """Achieved FLOP/s of one cached denoising step vs the same matrix products alone, on the same device."""
    model, dev = cap.model, cap.device
    rgb = to_rgb_uint8(image)
    prepared, _ = prepare_regions(_regions(boxes, n), rgb.shape[1], rgb.shape[0])
    with torch.inference_mode():
        enc = model.encode_frame(rgb)
        roi = model.roi_tokens(enc, prepared)
        cache = model.prefix_cache(enc)
        tokens = torch.full((n, cap.config.decoding.caption_len), cap.config.mask_token_id, device=dev)
        step_ms = _median_ms(dev, lambda: model.region_logits(roi, tokens, cache, cap.attn_impl), repeats)
        pairs = _step_matmuls(cap, n, cache.length)

        def matmuls() -> None:
            for a, b in pairs:
                torch.matmul(a, b)

        matmul_ms = _median_ms(dev, matmuls, repeats)
    flops = float(sum(2 * a.numel() * b.shape[-1] for a, b in pairs))
    step_fs, mm_fs = flops / step_ms * 1e3, flops / matmul_ms * 1e3
    return StepFlops(n, cache.length, flops, step_ms, matmul_ms, step_fs, mm_fs, step_fs / mm_fs)


def peak_matmul_flops(device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """FLOP/s of one large square product: the device's practical limit for this dtype."""
    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    return 2 * size**3 / _median_ms(device, lambda: torch.matmul(a, b), repeats) * 1e3


# -- threshold mode on a trained model ---------------------------------------------------------------------------------
def threshold_check(cap: Captioner, scenes: int = 8) -> ThresholdCheck:
    """Default vs threshold decoding on held-out generated scenes, every object a mask region.

    Random weights almost never reach a 0.9 confidence, so the NFE saving of threshold mode can only be shown on a
    trained model; this runs one on the data it was trained for.
    """
    nfe_p = nfe_t = tokens_t = forwards_regions = n_regions = same = exact_p = exact_t = 0
    for seed in scene_seeds("heldout", scenes):
        scene = generate_scene(seed)
        regions = [RegionInput(mask=o.mask) for o in scene.objects]
        par = cap.caption(scene.image, regions)
        thr = cap.caption(scene.image, regions, mode="threshold")
        nfe_p += par.stats.nfe
        nfe_t += thr.stats.nfe
        tokens_t += thr.stats.tokens
        forwards_regions += thr.stats.nfe * len(regions)
        n_regions += len(regions)
        for obj, a, b in zip(scene.objects, par.regions, thr.regions):
            same += a.caption == b.caption
            exact_p += a.caption == obj.caption
            exact_t += b.caption == obj.caption
    return ThresholdCheck(model=cap.name, scenes=scenes, regions=n_regions, threshold=cap.config.decoding.threshold,
                          nfe_parallel=nfe_p, nfe_threshold=nfe_t, nfe_ratio=nfe_t / nfe_p,
                          tpf_per_region=tokens_t / forwards_regions, same_caption=same / n_regions,
                          exact_parallel=exact_p / n_regions, exact_threshold=exact_t / n_regions)


# -- report ------------------------------------------------------------------------------------------------------------
def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                            "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str | None:
    """HEAD of the source checkout, with "-dirty" when it has local changes; None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def _ratios(rows: list[BenchRow], regions: Sequence[int]) -> dict[str, dict[int, float]]:
    by = {(r.mode, r.regions): r for r in rows}
    out: dict[str, dict[int, float]] = {}
    for name, (num, den, metric) in RATIOS.items():
        vals = {n: getattr(by[num, n], metric) / getattr(by[den, n], metric)
                for n in regions if (num, n) in by and (den, n) in by and getattr(by[den, n], metric)}
        if vals:
            out[name] = vals
    if ("parallel", 1) in by:  # scaling with the number of regions, relative to one region
        one = by["parallel", 1]
        out["parallel_tokens_per_s_vs_n_x_1_region"] = {
            n: by["parallel", n].tokens_per_s / (n * one.tokens_per_s) for n in regions if ("parallel", n) in by}
        out["parallel_latency_vs_1_region"] = {
            n: by["parallel", n].latency_ms / one.latency_ms for n in regions if ("parallel", n) in by}
    return out


def _targets(ratios: dict[str, dict[int, float]], rows: list[BenchRow], check: ThresholdCheck | None,
             device: torch.device, steps: int) -> list[Target]:
    def target(name: str, value: float | None, goal: str, ok: Callable[[float], bool]) -> Target:
        return Target(name, value, goal, None if value is None else bool(ok(value)))

    def ratio(name: str, n: int) -> float | None:
        return ratios.get(name, {}).get(n)

    if device.type != "cuda":
        thr_value = check.nfe_ratio if check else ratio("threshold_vs_parallel_nfe", 4)
        thr_name = ("threshold NFE / default NFE (trained model, held-out scenes)" if check
                    else "threshold NFE / default NFE at 4 regions (this model)")
        return [
            target("parallel vs sequential_nocache throughput at 4 regions", ratio("parallel_vs_sequential_nocache", 4),
                   ">= 5 (published 3.44)", lambda v: v >= 5.0),
            target("cached step / uncached step at 4 regions", ratio("cached_vs_uncached_step", 4), "<= 0.333",
                   lambda v: v <= 1 / 3),
            target(thr_name, thr_value, "<= 0.5", lambda v: v <= 0.5),
        ]
    lat4 = next((r.latency_ms for r in rows if r.mode == "parallel" and r.regions == 4), None)
    return [
        target("parallel_nocache vs sequential_nocache throughput at 4 regions",
               ratio("parallel_nocache_vs_sequential_nocache", 4), ">= 3.44", lambda v: v >= 3.44),
        target("parallel vs sequential throughput at 4 regions", ratio("parallel_vs_sequential", 4), ">= 3.44",
               lambda v: v >= 3.44),
        target("parallel tokens/s at 16 regions / (16 x at 1 region)", ratio("parallel_tokens_per_s_vs_n_x_1_region", 16),
               ">= 0.7", lambda v: v >= 0.7),
        target("parallel latency at 8 regions / at 1 region", ratio("parallel_latency_vs_1_region", 8), "<= 1.5",
               lambda v: v <= 1.5),
        target(f"parallel latency at 4 regions, {steps} steps (ms)", lat4, "<= 500 with 32 steps on an H100",
               lambda v: v <= 500.0 and steps == 32),
    ]


def run_bench(cap: Captioner, settings: BenchSettings = BenchSettings(), *, ar: ARRegionDecoder | None = None,
              threshold_model: Captioner | None = None,
              on_row: Callable[[BenchRow], None] | None = None) -> BenchReport:
    """Measure every mode in `settings` at every region count on `cap`'s model and the same frames."""
    t_start = time.perf_counter()
    s = settings
    dev = cap.device
    ar = ar or ARRegionDecoder(cap.model.decoder)
    if max(s.regions) > cap.config.region.max_regions:
        log.warning("%d regions exceed the model's max_regions=%d: parallel modes take several passes",
                    max(s.regions), cap.config.region.max_regions)
    frames = make_frames(s.frames, *s.frame_size, objects=max(s.regions), seed=s.seed)
    if s.warmup:  # first use of the model: allocator, thread pools, kernel selection
        image, boxes = frames[0]
        _diffusion_run(cap, image, _regions(boxes, min(s.regions)), "parallel", s.steps)
        if "ar" in s.modes:
            _ar_run(cap, ar, image, _regions(boxes, 1))
    rows = []
    for n in s.regions:  # modes inside, so the modes of one region count are measured close together in time
        for mode in s.modes:
            row = _measure_cell(cap, ar, frames, mode, n, s)
            rows.append(row)
            log.info("%s %d regions: %.1f ms, %.1f tokens/s, NFE %d", mode, n, row.latency_ms, row.tokens_per_s, row.nfe)
            if on_row is not None:
                on_row(row)
    flops = [measure_step_flops(cap, *frames[0], n) for n in s.regions] if s.flops else []
    peak = peak_matmul_flops(dev, cap.model.decoder.wte.weight.dtype) if s.flops else None
    check = threshold_check(threshold_model) if threshold_model is not None else None
    ratios = _ratios(rows, s.regions)
    steps = s.steps or cap.config.decoding.steps
    cfg = cap.config
    model = {"name": cap.name, "attn_impl": cap.attn_impl, "dtype": str(cap.model.decoder.wte.weight.dtype),
             "d_model": cfg.decoder.d_model, "n_layers": cfg.decoder.n_layers, "vocab_size": cfg.decoder.vocab_size,
             "prefix_tokens": flops[0].prefix_len if flops else _prefix_len(cap, frames[0][0]),  # same frame
             "roi_tokens": cfg.region.tokens, "caption_len": cfg.decoding.caption_len, "steps": steps,
             "max_regions": cfg.region.max_regions,
             "parameters": sum(p.numel() for p in cap.model.parameters())}
    return BenchReport(rows=rows, ratios=ratios, step_flops=flops, peak_matmul_flops_per_s=peak, threshold_check=check,
                       targets=_targets(ratios, rows, check, dev, steps), model=model, settings=s,
                       machine=machine_info(dev), torch_version=torch.__version__, git_commit=_git_commit(),
                       date_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                       wall_s=time.perf_counter() - t_start)


# -- cross-frame batching ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CrossFrameRow:
    frames: int  # frames per call
    regions: int  # regions per frame
    passes: int  # denoising passes the batched call needed (ceil(frames x regions / max_regions))
    batched_ms: float  # median latency of one caption_frames call over all the frames
    one_by_one_ms: float  # median latency of the same frames captioned by one caption call each
    tokens: int  # caption tokens of all the frames (the same on both paths)
    batched_tokens_per_s: float
    one_by_one_tokens_per_s: float
    ratio: float  # batched / one-by-one tokens per second
    identical: bool  # every caption of every frame the same on both paths
    repeats: int


@dataclass(frozen=True)
class CrossFrameReport:
    rows: list[CrossFrameRow]
    model: dict[str, Any]
    frame_size: tuple[int, int]
    steps: int
    machine: dict[str, Any]
    torch_version: str
    git_commit: str | None
    date_utc: str
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "model": self.model, "frame_size": list(self.frame_size),
                "steps": self.steps, "machine": self.machine, "torch_version": self.torch_version,
                "git_commit": self.git_commit, "date_utc": self.date_utc, "wall_s": self.wall_s}

    def table(self) -> str:
        lines = [f"{'frames':>6}{'regions':>8}{'passes':>7}{'batched ms':>12}{'1-by-1 ms':>11}{'batched tok/s':>15}"
                 f"{'1-by-1 tok/s':>14}{'ratio':>7}{'identical':>10}{'runs':>6}"]
        for r in self.rows:
            lines.append(f"{r.frames:>6}{r.regions:>8}{r.passes:>7}{r.batched_ms:>12.1f}{r.one_by_one_ms:>11.1f}"
                         f"{r.batched_tokens_per_s:>15.1f}{r.one_by_one_tokens_per_s:>14.1f}{r.ratio:>7.2f}"
                         f"{'yes' if r.identical else 'NO':>10}{r.repeats:>6}")
        return "\n".join(lines)


def run_cross_frame_bench(cap: Captioner, frames: Sequence[int] = (1, 2, 4), regions: int = 4, *,
                          steps: int | None = None, repeats: int = 3, frame_size: tuple[int, int] = (1280, 720),
                          seed: int = 0, max_cell_s: float | None = 30.0,
                          on_row: Callable[[CrossFrameRow], None] | None = None) -> CrossFrameReport:
    """Tokens per second of F frames x `regions` regions in one `caption_frames` call against one frame at a time,
    for every F in `frames`, on the same frames, the two measured alternately (so a busy machine slows both)."""
    if not frames or any(f < 1 for f in frames) or regions < 1 or repeats < 1:
        raise ConfigError(f"need frame counts >= 1, regions >= 1 and repeats >= 1 (got {list(frames)}, {regions}, "
                          f"{repeats})")
    t_start = time.perf_counter()
    dev = cap.device
    scenes = make_frames(max(frames), *frame_size, objects=regions, seed=seed)
    batch_all = [(image, _regions(boxes, regions)) for image, boxes in scenes]
    per_pass = cap.config.region.max_regions
    cap.caption_frames(batch_all[:1], steps=1)  # warm-up: allocator, thread pools
    rows = []
    for f in frames:
        batch = batch_all[:f]
        cap.caption_frames(batch, steps=1)  # this batch's shapes once, unmeasured
        batched_ms, one_ms, identical = [], [], True
        start = time.perf_counter()
        for _ in range(repeats):
            ms, together = _timed(dev, lambda: cap.caption_frames(batch, steps=steps))
            batched_ms.append(ms)
            ms, alone = _timed(dev, lambda: [cap.caption(image, regs, steps=steps) for image, regs in batch])
            one_ms.append(ms)
            identical &= all([r.caption for r in a.regions] == [r.caption for r in b.regions]
                             for a, b in zip(together, alone))
            if max_cell_s is not None and time.perf_counter() - start > max_cell_s:
                break
        failed = [r.error for res in together for r in res.regions if r.error]
        if failed:  # the frames are generated, so this is a bug, not user input
            raise RuntimeError(f"benchmark region refused: {failed[0]}")
        tokens = sum(res.stats.tokens for res in together)
        b_ms, o_ms = statistics.median(batched_ms), statistics.median(one_ms)
        row = CrossFrameRow(frames=f, regions=regions, passes=-(-f * regions // per_pass), batched_ms=b_ms,
                            one_by_one_ms=o_ms, tokens=tokens, batched_tokens_per_s=tokens / b_ms * 1000.0,
                            one_by_one_tokens_per_s=tokens / o_ms * 1000.0, ratio=o_ms / b_ms, identical=identical,
                            repeats=len(batched_ms))
        rows.append(row)
        if on_row is not None:
            on_row(row)
    cfg = cap.config
    model = {"name": cap.name, "attn_impl": cap.attn_impl, "dtype": str(cap.model.decoder.wte.weight.dtype),
             "d_model": cfg.decoder.d_model, "n_layers": cfg.decoder.n_layers, "max_regions": per_pass,
             "caption_len": cfg.decoding.caption_len, "parameters": sum(p.numel() for p in cap.model.parameters())}
    return CrossFrameReport(rows=rows, model=model, frame_size=tuple(frame_size),
                            steps=steps or cfg.decoding.steps, machine=machine_info(dev),
                            torch_version=torch.__version__, git_commit=_git_commit(),
                            date_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                            wall_s=time.perf_counter() - t_start)
