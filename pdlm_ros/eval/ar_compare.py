"""The diffusion model against its autoregressive twin: accuracy and speed from one run.

Both models have the same preset, vision tower and RoI replay and were trained on the same scene stream for the same
CPU time (`pdlm-ros train --objective ar` makes the twin). Accuracy: the held-out scenes `pdlm-ros eval` uses, masks,
the offline rule judge (Pos / Neg / Avg). Speed: frames of held-out scenes with exactly N regions (a scene's objects,
repeated when it has fewer than N), the same frames for every row, timed per frame after a warm-up frame.

Caption tokens are counted the same way for every row: the tokens of the returned caption text plus its end token.
A diffusion span also commits EOS padding after the caption; that padding is work, not output, and is not counted.
"""

from __future__ import annotations

import datetime as _dt
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from pdlm_ros.captioner import Captioner
from pdlm_ros.data.scenes import generate_scene, scene_seeds
from pdlm_ros.errors import ConfigError
from pdlm_ros.eval.bench import machine_info
from pdlm_ros.eval.harness import evaluate
from pdlm_ros.eval.judges import RuleJudge
from pdlm_ros.types import RegionInput

__all__ = ["TwinRow", "TwinReport", "compare_twin"]


@dataclass(frozen=True)
class TwinRow:
    model: str  # diffusion or ar
    mode: str
    pos: float
    neg: float
    avg: float
    shape: float  # per-attribute accuracy of the shape word, %
    nfe_per_frame: float
    speed: dict[int, dict[str, float]] = field(default_factory=dict)  # regions -> latency_s, tokens_per_s, nfe


@dataclass
class TwinReport:
    diffusion: str
    twin: str
    regions: int
    speed_frames: int
    rows: list[TwinRow] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self, speed_regions: Sequence[int]) -> str:
        head = ("| model | mode | Pos | Neg | Avg | shape | NFE/frame | "
                + " | ".join(f"{n} regions: ms / tok/s" for n in speed_regions) + " |")
        lines = [head, "|" + "---|" * (7 + len(speed_regions))]
        for r in self.rows:
            cells = [f"{1000 * r.speed[n]['latency_s']:.0f} / {r.speed[n]['tokens_per_s']:.0f}" if n in r.speed
                     else "-" for n in speed_regions]
            lines.append(f"| {r.model} | {r.mode} | {r.pos:.1f} | {r.neg:.1f} | {r.avg:.1f} | {r.shape:.1f} | "
                         f"{r.nfe_per_frame:.1f} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _speed_frames(n_regions: int, frames: int) -> list[tuple[Any, list[RegionInput]]]:
    out = []
    for seed in scene_seeds("heldout", frames, offset=500_000_000):  # apart from the accuracy scenes
        scene = generate_scene(seed)
        objs = [scene.objects[i % len(scene.objects)] for i in range(n_regions)]
        out.append((scene.image, [RegionInput(mask=o.mask) for o in objs]))
    return out


def _caption_tokens(cap: Captioner, captions: Sequence[str]) -> int:
    return sum(len(cap.tokenizer.encode(c, add_special_tokens=False).ids) + 1 for c in captions)


def _speed(cap: Captioner, mode: str, speed_regions: Sequence[int], frames: int) -> dict[int, dict[str, float]]:
    out = {}
    for n in speed_regions:
        batch = _speed_frames(n, frames + 1)
        cap.caption(*batch[0], mode=mode)  # warm-up
        times, tokens, nfe = [], [], []
        for image, regions in batch[1:]:
            t0 = time.perf_counter()
            res = cap.caption(image, regions, mode=mode)
            times.append(time.perf_counter() - t0)
            tokens.append(_caption_tokens(cap, [r.caption for r in res.regions]))
            nfe.append(res.stats.nfe)
        out[n] = {"latency_s": statistics.median(times), "tokens_per_s": sum(tokens) / sum(times),
                  "nfe": statistics.mean(nfe)}
    return out


def compare_twin(diffusion: Captioner, twin: Captioner, *, regions: int = 300, speed_regions: Sequence[int] = (1, 4, 8, 16),
                 speed_frames: int = 5, progress: bool = True, log: Any = None) -> TwinReport:
    if twin.config.objective != "ar":
        raise ConfigError(f"{twin.name} is not an autoregressive twin (objective {twin.config.objective!r}); make one "
                          "with `pdlm-ros train --objective ar`")
    if diffusion.config.objective != "diffusion" or diffusion.layout != "native":
        raise ConfigError(f"{diffusion.name} must be a native-layout diffusion model")
    if regions < 1 or speed_frames < 1 or not speed_regions or min(speed_regions) < 1:
        raise ConfigError("regions, speed frames and every speed region count must be >= 1")
    report = TwinReport(diffusion=diffusion.name, twin=twin.name, regions=regions, speed_frames=speed_frames,
                        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                        machine=machine_info(torch.device("cpu")))
    scenes = [generate_scene(s) for s in scene_seeds("heldout", regions)]  # what `pdlm-ros eval` uses
    for name, cap, mode in (("ar", twin, "ar"), ("diffusion", diffusion, "parallel"),
                            ("diffusion", diffusion, "threshold")):
        rep = evaluate(cap, scenes, RuleJudge(), mode=mode, limit=regions, progress=progress)
        speed = _speed(cap, mode, speed_regions, speed_frames)
        s = rep.scores
        report.rows.append(TwinRow(name, mode, s.pos, s.neg, s.avg, s.per_attribute.get("shape", float("nan")),
                                   rep.nfe / max(rep.frames, 1), speed))
        if log:
            log(f"{name}/{mode}: Avg {s.avg:.1f}; " + ", ".join(f"{n}: {v['tokens_per_s']:.0f} tok/s"
                                                             for n, v in speed.items()))
    return report
