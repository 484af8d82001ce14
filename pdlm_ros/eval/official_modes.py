"""What each fast decoding mode of an official-layout checkpoint costs in captions, and what it buys in speed.

One run, one model: every (mode, sampler) pair captions the same held-out scenes (all objects of a scene in one call,
masks), the offline rule judge scores them ParaDLC-style (Pos / Neg / Avg), and each pair's captions are compared
with `official`/`global` (the parity-tested path): the share that is identical. Then the speed of every pair at
1..16 regions per frame (`official_bench`), on the same model.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from pdlm_ros.captioner import Captioner
from pdlm_ros.data.scenes import generate_scene, scene_seeds
from pdlm_ros.errors import ConfigError
from pdlm_ros.eval.harness import evaluate
from pdlm_ros.eval.judges import RuleJudge
from pdlm_ros.eval.official_bench import run_official_bench
from pdlm_ros.types import FrameResult, RegionInput

__all__ = ["MODE_GRID", "ModeRow", "ModesReport", "compare_modes"]

MODE_GRID: tuple[tuple[str, str], ...] = tuple((m, s) for m in ("official", "isolated", "cached")
                                                for s in ("global", "span", "threshold"))


class _WithOptions:
    """A captioner with the sampler (and refresh) fixed, recording every caption it returns, in order."""

    def __init__(self, cap: Captioner, sampler: str, refresh: int | None) -> None:
        self.cap, self.sampler, self.refresh = cap, sampler, refresh
        self.name = cap.name
        self.captions: list[str] = []

    def caption(self, image: Any, regions: list[RegionInput], *, mode: str = "auto", steps: int | None = None,
                **kwargs: Any) -> FrameResult:
        res = self.cap.caption(image, regions, mode=mode, steps=steps, sampler=self.sampler, refresh=self.refresh,
                               **kwargs)
        self.captions.extend(r.caption for r in res.regions)
        return res


@dataclass(frozen=True)
class ModeRow:
    mode: str
    sampler: str
    pos: float
    neg: float
    avg: float
    identical_to_official: float  # share of captions equal to official/global's, in [0, 1]
    nfe_per_frame: float
    tpf: float
    caption_seconds: float
    speed: dict[int, dict[str, float]] = field(default_factory=dict)  # regions -> latency_s, tokens_per_s, nfe


@dataclass
class ModesReport:
    model: str
    regions: int
    refresh: int
    frame_size: tuple[int, int]
    rows: list[ModeRow] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self, speed_regions: Sequence[int]) -> str:
        head = ("| mode | sampler | Pos | Neg | Avg | identical to official | NFE/frame | TPF | "
                + " | ".join(f"{n} regions s / tok/s" for n in speed_regions) + " |")
        lines = [head, "|" + "---|" * (8 + len(speed_regions))]
        for r in self.rows:
            cells = [f"{r.speed[n]['latency_s']:.2f} / {r.speed[n]['tokens_per_s']:.0f}" if n in r.speed else "-"
                     for n in speed_regions]
            lines.append(f"| {r.mode} | {r.sampler} | {r.pos:.1f} | {r.neg:.1f} | {r.avg:.1f} | "
                         f"{100 * r.identical_to_official:.1f} % | {r.nfe_per_frame:.1f} | {r.tpf:.2f} | "
                         + " | ".join(cells) + " |")
        return "\n".join(lines)


def compare_modes(cap: Captioner, *, regions: int = 300, grid: Sequence[tuple[str, str]] = MODE_GRID,
                  refresh: int = 4, speed_regions: Sequence[int] = (1, 2, 4, 8, 16), speed_repeats: int = 2,
                  frame_size: tuple[int, int] = (160, 120), progress: bool = True, log: Any = None) -> ModesReport:
    if cap.layout != "official":
        raise ConfigError(f"{cap.name} has the {cap.layout} layout; compare-modes is for official checkpoints")
    if ("official", "global") not in grid:
        grid = (("official", "global"), *grid)
    report = ModesReport(model=cap.name, regions=regions, refresh=refresh, frame_size=frame_size,
                         created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    scenes = [generate_scene(s) for s in scene_seeds("heldout", regions)]  # what `pdlm-ros eval` uses
    judge = RuleJudge()
    reference: list[str] = []
    results = []
    for mode, sampler in grid:
        runner = _WithOptions(cap, sampler, refresh if mode == "cached" else None)
        rep = evaluate(runner, scenes, judge, mode=mode, limit=regions, progress=progress)
        if (mode, sampler) == ("official", "global"):
            reference = runner.captions
        results.append((mode, sampler, rep, runner.captions))
        if log:
            log(f"{mode}/{sampler}: Avg {rep.scores.avg:.1f}, NFE/frame {rep.nfe / max(rep.frames, 1):.1f}")
    for mode, sampler, rep, captions in results:
        same = sum(a == b for a, b in zip(captions, reference)) / max(len(reference), 1)
        speed = {}
        bench = run_official_bench(cap, regions=speed_regions, modes=(mode,), samplers=(sampler,), refresh=refresh,
                                   repeats=speed_repeats, warmup=1, frame_size=frame_size, flops=False)
        for row in bench.rows:
            speed[row.regions] = {"latency_s": row.latency_s, "tokens_per_s": row.tokens_per_s, "nfe": row.nfe}
        s = rep.scores
        report.rows.append(ModeRow(mode, sampler, s.pos, s.neg, s.avg, same, rep.nfe / max(rep.frames, 1), rep.tpf,
                                   rep.caption_seconds, speed))
        report.machine = bench.machine
        if log:
            log(f"{mode}/{sampler}: speed " + ", ".join(f"{n}: {v['tokens_per_s']:.0f} tok/s" for n, v in speed.items()))
    return report
