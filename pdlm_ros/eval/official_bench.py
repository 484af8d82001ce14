"""Speed of the official layout's decoding modes, in one run on one model and the same frames.

Modes: `official` (a full forward of the whole sequence every step: what the released code does), `isolated` (the
prefix's K/V once per pass, then only the region tokens every step; exact under the structured rule) and `cached`
(the official rule, K/V of everything but the caption blocks refreshed every `refresh` steps). Each with the
official global re-masking by default.

Latency is end to end per frame (tiling, vision, RoI, decoding), the median over repeats, device synchronised;
tokens per second = caption tokens committed / latency. More regions than prompt_numbers take further passes.
The FLOPs of a frame's decoding are counted from the tokens each forward actually computes (linear layers and the
LM head, plus attention scores and sums against the keys they read), and the achieved rate is compared with one
large matrix product on the same device: how far the decoding is from the device's matrix-product rate.
"""

from __future__ import annotations

import datetime as _dt
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from pdlm_ros.captioner import Captioner
from pdlm_ros.errors import ConfigError
from pdlm_ros.eval.bench import _regions, _timed, machine_info, make_frames, peak_matmul_flops

__all__ = ["OFFICIAL_BENCH_MODES", "OfficialRow", "OfficialBenchReport", "run_official_bench", "decode_flops"]

OFFICIAL_BENCH_MODES = ("official", "isolated", "cached")
RATIOS = {"isolated_vs_official": ("isolated", "official"), "cached_vs_official": ("cached", "official")}


@dataclass(frozen=True)
class OfficialRow:
    mode: str
    sampler: str
    regions: int
    frames: int
    latency_s: float  # median per frame
    tokens_per_s: float
    nfe: int  # forwards per frame (all passes)
    tpf: float
    seq_len: int  # tokens of one pass's full sequence (the last pass)
    decoded_tokens: int  # tokens the decoder computed per frame, all forwards together
    flops: float  # of the frame's decoding (see module docstring)
    flops_per_s: float


@dataclass
class OfficialBenchReport:
    model: str
    machine: dict[str, Any]
    dtype: str
    frame_size: tuple[int, int]
    refresh: int
    rows: list[OfficialRow] = field(default_factory=list)
    ratios: dict[str, dict[int, float]] = field(default_factory=dict)
    peak_matmul_flops: float = 0.0
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        lines = ["| mode | sampler | regions | latency s | tokens/s | NFE | TPF | seq | decoded tokens | GFLOP/s |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r.mode} | {r.sampler} | {r.regions} | {r.latency_s:.2f} | {r.tokens_per_s:.1f} | {r.nfe} | "
                         f"{r.tpf:.2f} | {r.seq_len} | {r.decoded_tokens} | {r.flops_per_s / 1e9:.1f} |")
        for name, by_n in self.ratios.items():
            lines.append(f"\n{name} (tokens/s): " + ", ".join(f"{n}: {v:.2f}x" for n, v in by_n.items()))
        lines.append(f"\npeak matmul: {self.peak_matmul_flops / 1e9:.1f} GFLOP/s")
        return "\n".join(lines)


def decode_flops(cap: Captioner, decoded_tokens: int, seq_len: int, caption_tokens_scored: int) -> float:
    """FLOPs of decoding: 2 x the per-token weight products for every computed token (4 d^2 attention projections
    and 3 d f SwiGLU per layer), attention against seq_len keys (4 d per key per layer), and the LM head for the
    caption positions scored."""
    d = cap.config.decoder
    per_token = d.n_layers * (2 * (4 * d.d_model**2 + 3 * d.d_model * d.mlp_hidden_size) + 4 * d.d_model * seq_len)
    return float(decoded_tokens * per_token + 2 * caption_tokens_scored * d.d_model * d.vocab_size)


def run_official_bench(cap: Captioner, *, regions: Sequence[int] = (1, 2, 4, 8, 16),
                       modes: Sequence[str] = OFFICIAL_BENCH_MODES, samplers: Sequence[str] = ("global",),
                       refresh: int = 4, repeats: int = 3,
                       warmup: int = 1, frame_size: tuple[int, int] = (640, 480), steps: int | None = None,
                       max_cell_seconds: float = 30.0, flops: bool = True, seed: int = 0,
                       progress: Any = None) -> OfficialBenchReport:
    if cap.layout != "official":
        raise ConfigError(f"{cap.name} has the {cap.layout} layout; this benchmark is for official checkpoints")
    unknown = sorted(set(modes) - set(OFFICIAL_BENCH_MODES))
    if unknown:
        raise ConfigError(f"unknown official mode(s) {', '.join(unknown)}; choose from {', '.join(OFFICIAL_BENCH_MODES)}")
    w, h = frame_size
    frames = make_frames(max(repeats, 1) + warmup, w, h, objects=8, seed=seed)
    dtype = cap.model.decoder.wte.weight.dtype
    report = OfficialBenchReport(model=cap.name, machine=machine_info(cap.device), dtype=str(dtype).replace("torch.", ""),
                                 frame_size=frame_size, refresh=refresh,
                                 created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    cells = [(m, smp, n) for m in modes for smp in samplers for n in regions]
    for mode, sampler, n in cells:
        kwargs: dict[str, Any] = {"sampler": sampler, **({"refresh": refresh} if mode == "cached" else {})}
        times, runs = [], []
        started = time.perf_counter()
        for k, (image, boxes) in enumerate(frames):
            regs = _regions(boxes, n)
            ms, res = _timed(cap.device, lambda: cap.caption(image, regs, mode=mode, steps=steps, **kwargs))
            if k < warmup:
                continue
            times.append(ms / 1000.0)
            runs.append(res)
            if max_cell_seconds and time.perf_counter() - started > max_cell_seconds:
                break
        res = runs[len(runs) // 2]
        latency = statistics.median(times)
        seq_len = res.stats.sequence_len
        # every forward scores every caption position of its pass: forwards per pass x regions x caption_len
        passes = -(-n // cap.config.official.prompt_numbers)
        scored = round(res.stats.nfe / passes * n * cap.config.decoding.caption_len)
        fl = decode_flops(cap, res.stats.decoded_tokens, seq_len, scored)
        decode_s = res.stats.latency_ms.get("decode", latency * 1000.0) / 1000.0
        report.rows.append(OfficialRow(mode, sampler, n, len(times), latency, res.stats.tokens / latency,
                                       res.stats.nfe, res.stats.tpf, seq_len, res.stats.decoded_tokens, fl,
                                       fl / decode_s))
        if progress is not None:
            progress(report.rows[-1])
    by = {(r.mode, r.regions): r for r in report.rows if r.sampler == samplers[0]}
    for name, (a, b) in RATIOS.items():
        report.ratios[name] = {n: by[(a, n)].tokens_per_s / by[(b, n)].tokens_per_s for n in regions
                               if (a, n) in by and (b, n) in by}
    if flops:
        report.peak_matmul_flops = peak_matmul_flops(cap.device, dtype)
    return report
