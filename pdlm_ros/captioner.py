"""`Captioner`: image + regions in, one caption per region out. The public entry point of the core.

Decoding modes (all share one model and one sampler):
- `parallel` (default): the frame's prefix K/V computed once, then every region's span decoded in one denoising pass;
- `threshold`: the same, committing every position whose confidence passes `threshold` (fewer forwards);
- `sequential`: one region per pass (TPF = 1), with the prefix cache; the cost of a one-region-at-a-time captioner;
- `sequential_nocache`, `parallel_nocache`: the whole packed sequence recomputed at every step (the published
  baselines; same captions, more work);
- `nomask`: the structured mask switched off (every token sees every token): an ablation that shows what the mask buys.

Official-layout checkpoints (the released PerceptionDLM) decode by their own rules (`pdlm_ros.model.official`):
- `official`: exactly as the official code does, parity-tested: masks sorted by area, up to prompt_numbers per pass,
  a full forward of the whole sequence at every step, global re-masking;
- `isolated`: this package's structured rule on those weights: the prefix's K/V computed once per pass (exact under
  that rule), then only the region tokens at every step; regions still meet through the mask-id embeddings;
- `cached`: the official rule with the K/V of everything but the caption blocks reused and refreshed every
  `refresh` steps (default 4; 1 = official).
Each takes `sampler`: `global` (the official re-masking, default), `span` (LLaDA's per-span schedule) or
`threshold` (commit every position above `threshold`, at least one per span).
`auto` (the default) picks `parallel` for native checkpoints and `official` for official ones.

Region rules: a refused region (empty mask, NaN box, box outside the image or under one pixel a side, ...) gets an
error in its result and the others are still captioned. At most `budget` usable regions (default 256) are captioned
per call, the best by detector score, then by area; the rest are refused with that reason, so one message of 10,000
boxes costs a bounded amount of work. More regions than `max_regions` are processed in further passes of at most
`max_regions` each: with isolated regions this gives exactly the same captions, and NFE adds up. No region is ever
dropped. In the
official layout a box-only region is given to the model as its box filled in as a mask, and a pass holds at most
prompt_numbers masks (in request order); there regions of one pass do influence each other (official rule).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer

from pdlm_ros.errors import Cancelled, CheckpointError, ConfigError
from pdlm_ros.model.checkpoint import load_pretrained
from pdlm_ros.model.config import PDLMConfig
from pdlm_ros.model.config import preset as get_preset
from pdlm_ros.model.image import to_rgb_uint8
from pdlm_ros.model.pdlm import PerceptionDLM
from pdlm_ros.model.decoder import PrefixCache
from pdlm_ros.model.regions import DEFAULT_REGION_BUDGET, PreparedRegion, prepare_regions, select_within_budget
from pdlm_ros.model.official import attach_special_tokens, box_mask, decode_pass, make_forward, prepare_pass
from pdlm_ros.model.ar_baseline import decode_twin
from pdlm_ros.model.sampler import diffusion_decode
from pdlm_ros.model.tokenizer import build_llada_layout_tokenizer, build_tiny_official_tokenizer, build_tiny_tokenizer
from pdlm_ros.types import (AR_MODES, CACHED_MODES, MODES, NATIVE_MODES, OFFICIAL_MODES, OFFICIAL_SAMPLERS, FrameResult,
                            FrameStats, RegionCaption, RegionInput)

__all__ = ["Captioner", "DEFAULT_CHECKPOINT", "MODES"]

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "assets" / "default"


class Captioner:
    region_budget: int = DEFAULT_REGION_BUDGET  # usable regions captioned per call; `caption(budget=)` overrides
    log_throttle: float = 5.0  # seconds between two "regions refused" warnings (the node sets its log.throttle)

    def __init__(self, model: PerceptionDLM, tokenizer: Tokenizer | None, *, name: str | None = None,
                 attn_impl: str = "shared_prefix") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name or model.cfg.name
        self.attn_impl = attn_impl
        self._refusal_log = _RefusalLog()

    @property
    def config(self) -> PDLMConfig:
        return self.model.cfg

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def layout(self) -> str:
        return self.model.cfg.layout

    @property
    def modes(self) -> tuple[str, ...]:
        """The decoding modes this model runs (besides `auto`)."""
        if self.config.objective == "ar":
            return AR_MODES
        return OFFICIAL_MODES if self.layout == "official" else NATIVE_MODES

    def resolve_mode(self, mode: str) -> str:
        if mode == "auto":
            return self.modes[0]
        if mode not in MODES:
            raise ConfigError(f"unknown decoding mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode not in self.modes:
            kind = "autoregressive twin" if self.config.objective == "ar" else f"{self.layout} layout"
            raise ConfigError(f"mode {mode!r} is not one of the {kind}'s modes "
                              f"({', '.join(self.modes)}); use one of those or auto")
        return mode

    @classmethod
    def load(cls, checkpoint: str | Path | None = None, *, preset: str | None = None, device: str = "cpu",
             seed: int = 0, dtype: torch.dtype | None = None, attn_impl: str | None = None) -> "Captioner":
        """A checkpoint directory, a randomly initialised preset, or (neither given) the bundled default model."""
        if checkpoint is not None and preset is not None:
            raise ConfigError("give a checkpoint or a preset, not both")
        if attn_impl is None:
            attn_impl = "triton" if str(device).startswith("cuda") and _triton_ready() else "shared_prefix"
        if preset is not None:
            cfg = get_preset(preset)
            build = build_tiny_official_tokenizer if cfg.official is not None else build_tiny_tokenizer
            tokenizer = build() if cfg.decoder.vocab_size == build().get_vocab_size() else None
            if tokenizer is None and cfg.official is not None:  # the real shapes: LLaDA's ids, placeholder words
                tokenizer = build_llada_layout_tokenizer(cfg.decoder.vocab_size)
            prompt_ids = (tokenizer.encode(cfg.prompt, add_special_tokens=False).ids if tokenizer is not None
                          else [i % cfg.decoder.vocab_size for i in range(100, 132)])  # random 8b: no tokenizer
            torch.manual_seed(seed)
            model = PerceptionDLM(cfg, prompt_ids).to(device=device, dtype=dtype)
            if cfg.official is not None and tokenizer is not None:
                attach_special_tokens(model, tokenizer, f"preset {preset}")
            return cls(model, tokenizer, name=f"{cfg.name} (random init, seed {seed})", attn_impl=attn_impl)
        path = Path(checkpoint) if checkpoint is not None else DEFAULT_CHECKPOINT
        if checkpoint is None and not (path / "model.safetensors").is_file():
            raise CheckpointError(f"the bundled default model is missing ({path}); reinstall the package, train one "
                                  "with `pdlm-ros train`, or pass preset='tiny' for a random model")
        model, tokenizer = load_pretrained(path, device=device, dtype=dtype)
        return cls(model, tokenizer, attn_impl=attn_impl)

    # -------------------------------------------------------------------------------------------------------------
    def caption(self, image: object, regions: Sequence[RegionInput], *, mode: str = "auto",
                steps: int | None = None, threshold: float | None = None, temperature: float | None = None,
                seed: int | None = None, sampler: str | None = None, refresh: int | None = None,
                prompt: str | None = None, budget: int | None = None, cancel: Any = None) -> FrameResult:
        """Caption every region. `prompt` replaces the model's instruction for this call: the question of an
        official checkpoint, the text after the visual tokens of a native one (a native checkpoint with a chat
        template keeps its prompt). At most `budget` usable regions (default `region_budget`) are captioned, ranked
        by detector score, then area; the others are refused with the reason. `cancel` (a threading.Event) stops
        the call between two model forwards with `Cancelled` once it is set."""
        mode = self.resolve_mode(mode)
        prompt_ids = self._prompt_ids(prompt)
        if self.layout != "official" and (sampler is not None or refresh is not None):
            raise ConfigError("sampler and refresh apply to official-layout checkpoints only")
        sampler = "global" if sampler is None else sampler
        if sampler not in OFFICIAL_SAMPLERS:
            raise ConfigError(f"unknown sampler {sampler!r}; choose one of {', '.join(OFFICIAL_SAMPLERS)}")
        if refresh is not None and (mode != "cached" or refresh < 1):
            raise ConfigError(f"refresh (got {refresh}) is an integer >= 1 for mode cached only")
        dec = self.config.decoding
        steps, threshold, temperature = self._decoding_options(mode, steps, threshold, temperature, sampler)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None

        t_start = time.perf_counter()
        rgb = to_rgb_uint8(image)
        h, w = rgb.shape[:2]
        prepared, errors = self._usable_regions(regions, w, h, budget)
        check = _stop_check(cancel)
        check()
        timings: dict[str, float] = {}
        decoded: dict[int, tuple[str, float]] = {}
        nfe = tokens = 0
        cost = {"decoded_tokens": 0, "sequence_len": 0}
        if prepared and self.layout == "official":
            nfe, tokens = self._decode_official(rgb, prepared, mode, sampler, refresh or 4, steps, threshold,
                                                temperature, generator, decoded, timings, cost, prompt, check=check)
        elif prepared:
            with torch.inference_mode():
                mark = self._clock()
                frame = self.model.encode_frame(rgb) if prompt_ids is None else \
                    self.model.encode_frame(rgb, prompt_ids)
                timings["vision"], mark = self._lap(mark)
                roi = self._roi_tokens(frame, prepared, check)
                timings["roi"], mark = self._lap(mark)
                cache = None
                if mode in CACHED_MODES:
                    cache = self.model.prefix_cache(frame)
                    timings["prefix"], mark = self._lap(mark)
                chunk = 1 if mode.startswith("sequential") else self.config.region.max_regions
                if mode == "ar":  # the autoregressive twin decodes by its own loop, one region at a time
                    nfe, tokens = self._decode_ar(frame, roi, prepared, decoded)
                for start in range(0, len(prepared) if mode != "ar" else 0, chunk):
                    part = prepared[start:start + chunk]
                    r = roi[start:start + chunk]
                    logits_fn = _Checked(self._logits_fn(mode, frame.prefix, r, cache), check)
                    result = diffusion_decode(logits_fn, len(part), dec.caption_len, self.config.mask_token_id,
                                              steps=steps, temperature=temperature, threshold=threshold,
                                              generator=generator, device=self.device)
                    nfe += result.nfe
                    tokens += result.tokens_committed
                    for j, reg in enumerate(part):
                        decoded[reg.index] = self._text(result.tokens[j], result.confidence[j])
                timings["decode"], mark = self._lap(mark)
        timings["total"] = (time.perf_counter() - t_start) * 1000.0
        return FrameResult(self._results(regions, prepared, errors, decoded),
                           FrameStats(nfe=nfe, tokens=tokens, tpf=tokens / nfe if nfe else 0.0, latency_ms=timings,
                                      **cost),
                           self.name)

    def _decode_official(self, rgb: np.ndarray, prepared: list[PreparedRegion], mode: str, sampler: str,
                         refresh: int, steps: int, threshold: float | None, temperature: float,
                         generator: torch.Generator | None, decoded: dict[int, tuple[str, float]],
                         timings: dict[str, float], cost: dict[str, int], question: str | None,
                         check: Callable[[], None] = lambda: None) -> tuple[int, int]:
        """The official layout, pass by pass of at most prompt_numbers masks (request order)."""
        model, cfg = self.model, self.config
        per_pass, length = cfg.official.prompt_numbers, cfg.decoding.caption_len
        h, w = rgb.shape[:2]
        nfe = tokens = 0
        timings["vision"] = timings["decode"] = 0.0
        runner = model.official_runner()
        with torch.inference_mode():
            for start in range(0, len(prepared), per_pass):
                part = prepared[start:start + per_pass]
                mark = self._clock()
                masks = [r.mask if r.mask is not None else box_mask(r.box, w, h) for r in part]
                ps = prepare_pass(runner, cfg, self.tokenizer, model.special_tokens, rgb, masks, length, question)
                dt, mark = self._lap(mark)
                timings["vision"] += dt
                try:
                    forward = _Checked(make_forward(mode, runner, ps, refresh), check)
                except ValueError as err:
                    raise ConfigError(str(err)) from None
                result = decode_pass(forward, len(part), length, cfg.mask_token_id, sampler=sampler, steps=steps,
                                     temperature=temperature, threshold=threshold or cfg.decoding.threshold,
                                     generator=generator, device=self.device)
                timings["decode"] += self._lap(mark)[0]
                nfe += result.nfe
                tokens += result.tokens_committed
                cost["decoded_tokens"] += forward.tokens_computed
                cost["sequence_len"] = max(cost["sequence_len"], int(ps.seq.ids.numel()))
                for slot, k in enumerate(ps.order):  # prompt slot -> the mask's place in this pass
                    decoded[part[k].index] = self._text(result.tokens[slot], result.confidence[slot],
                                                        model.special_tokens.stop)
        return nfe, tokens

    def _decode_ar(self, frame, roi: torch.Tensor, prepared: list[PreparedRegion],  # noqa: ANN001
                   decoded: dict[int, tuple[str, float]]) -> tuple[int, int]:
        ids, conf, nfe = decode_twin(self.model, frame, roi, self.config.decoding.caption_len,
                                     self.config.eos_token_id)
        for reg, body, c in zip(prepared, ids, conf):
            decoded[reg.index] = (self._words(body), c)
        return nfe, nfe  # one token per forward, EOS included

    # -- several frames -------------------------------------------------------------------------------------------
    def caption_frames(self, frames: Sequence[tuple[object, Sequence[RegionInput]]], *, mode: str = "auto",
                       steps: int | None = None, threshold: float | None = None, temperature: float | None = None,
                       seed: int | None = None, prompt: str | None = None, max_regions: int | None = None,
                       budget: int | None = None, cancel: Any = None, **options: object) -> list[FrameResult]:
        """Caption several frames (several cameras, or a queue of frames): one FrameResult per frame, in order.

        Native checkpoints in modes parallel and threshold decode the regions of several frames in shared denoising
        passes of at most `max_regions` regions (default: the model's region.max_regions): each frame's prefix K/V
        are computed once, stacked, and every region reads its own frame's prefix only, at its own frame's
        positions, so each caption and its tokens are those `caption(image, regions)` gives on that frame alone
        (the region rules and `budget` apply to each frame as there).
        Per frame, the stats count the forwards its regions took part in and its own tokens; latency_ms holds its
        own vision/roi/prefix times, the time of the passes it shared as decode, and as total its share of the
        call (the totals add up to the call's time).

        One frame at a time, through `caption`: official-layout checkpoints (their rule makes the regions of a pass
        meet), the other modes (sequential: one region per pass by definition; *_nocache, nomask: the whole
        sequence recomputed), graph backends (their step graph takes one prefix), seeded sampling at
        temperature > 0 (each frame keeps the draws of its own call), and options only `caption` takes.
        An unusable image raises ImageInputError, as `caption` does, before any frame of the call is captioned.
        `cancel` stops the call between two model forwards with `Cancelled`, as in `caption`.
        """
        mode = self.resolve_mode(mode)
        temp = self.config.decoding.temperature if temperature is None else temperature
        together = (isinstance(self.model, PerceptionDLM) and mode in ("parallel", "threshold") and not options
                    and not (seed is not None and temp > 0))
        if not together:
            return [self.caption(image, regions, mode=mode, steps=steps, threshold=threshold,  # type: ignore[arg-type]
                                 temperature=temperature, seed=seed, prompt=prompt, budget=budget, cancel=cancel,
                                 **options)
                    for image, regions in frames]
        steps, threshold, temp = self._decoding_options(mode, steps, threshold, temperature)
        per_pass = self.config.region.max_regions if max_regions is None else max_regions
        if per_pass < 1:
            raise ConfigError(f"max_regions must be >= 1 (got {per_pass})")
        return self._caption_frames_together(frames, steps, threshold, temp, self._prompt_ids(prompt), per_pass,
                                             budget, _stop_check(cancel))

    def _caption_frames_together(self, frames: Sequence[tuple[object, Sequence[RegionInput]]], steps: int,
                                 threshold: float | None, temperature: float, prompt_ids: torch.Tensor | None,
                                 per_pass: int, budget: int | None, check: Callable[[], None]) -> list[FrameResult]:
        t_start = time.perf_counter()
        check()
        model, dec = self.model, self.config.decoding
        count = len(frames)
        frame_regions = []  # per frame: (RGB image, regions to caption, refusals)
        for i, (image, regions) in enumerate(frames):
            rgb = to_rgb_uint8(image)
            prepared, errors = self._usable_regions(regions, rgb.shape[1], rgb.shape[0], budget)
            frame_regions.append((rgb, prepared, errors))
        timings: list[dict[str, float]] = [{} for _ in range(count)]
        encoded: dict[int, tuple[torch.Tensor, PrefixCache]] = {}  # frame -> RoI tokens (N, R, C), prefix cache
        decoded: list[dict[int, tuple[str, float]]] = [{} for _ in range(count)]
        nfe, tokens = [0] * count, [0] * count
        with torch.inference_mode():
            for i, (rgb, prepared, _) in enumerate(frame_regions):
                if not prepared:
                    continue
                check()
                mark = self._clock()
                enc = model.encode_frame(rgb) if prompt_ids is None else model.encode_frame(rgb, prompt_ids)
                timings[i]["vision"], mark = self._lap(mark)
                roi = self._roi_tokens(enc, prepared, check)
                timings[i]["roi"], mark = self._lap(mark)
                encoded[i] = (roi, model.prefix_cache(enc))
                timings[i]["prefix"], mark = self._lap(mark)
            spans = [(i, j) for i in encoded for j in range(len(frame_regions[i][1]))]
            for start in range(0, len(spans), per_pass):
                part = spans[start:start + per_pass]
                mark = self._clock()
                members = list(dict.fromkeys(i for i, _ in part))  # this pass's frames, in order
                rows = {i: [k for k, (f, _) in enumerate(part) if f == i] for i in members}
                roi = torch.cat([encoded[i][0][part[r[0]][1]:part[r[-1]][1] + 1] for i, r in rows.items()])
                cache = PrefixCache.stack([encoded[i][1] for i in members])
                index = torch.tensor([members.index(i) for i, _ in part], device=self.device)
                result = diffusion_decode(
                    _Checked(lambda toks, act: model.region_logits(roi[act], toks, cache, self.attn_impl, index[act]),
                             check),
                    len(part), dec.caption_len, self.config.mask_token_id, steps=steps, temperature=temperature,
                    threshold=threshold, device=self.device)
                elapsed, mark = self._lap(mark)
                for k, (i, j) in enumerate(part):
                    decoded[i][frame_regions[i][1][j].index] = self._text(result.tokens[k], result.confidence[k])
                for i, r in rows.items():  # a region takes part in a forward exactly when it commits in it
                    nfe[i] += sum(1 for step in result.commits if any(step[k] for k in r))
                    tokens[i] += sum(step[k] for step in result.commits for k in r)
                    timings[i]["decode"] = timings[i].get("decode", 0.0) + elapsed
        share = (time.perf_counter() - t_start) * 1000.0 / max(count, 1)
        out = []
        for i, (image, regions) in enumerate(frames):
            _, prepared, errors = frame_regions[i]
            timings[i]["total"] = share
            stats = FrameStats(nfe=nfe[i], tokens=tokens[i], tpf=tokens[i] / nfe[i] if nfe[i] else 0.0,
                               latency_ms=timings[i])
            out.append(FrameResult(self._results(regions, prepared, errors, decoded[i]), stats, self.name))
        return out

    # -- helpers --------------------------------------------------------------------------------------------------
    def _decoding_options(self, mode: str, steps: int | None, threshold: float | None, temperature: float | None,
                          sampler: str = "global") -> tuple[int, float | None, float]:
        """Steps, threshold and temperature of a call, defaults filled in from the config; ConfigError naming the
        first one out of range."""
        dec = self.config.decoding
        steps = dec.steps if steps is None else steps
        max_steps = dec.caption_len * (self.config.official.prompt_numbers if self.config.official else 1)
        if not 1 <= steps <= max_steps:
            raise ConfigError(f"steps must be in 1..{max_steps} (got {steps})")
        temperature = dec.temperature if temperature is None else temperature
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ConfigError(f"temperature must be a finite number >= 0 (got {temperature})")
        if mode == "threshold" or sampler == "threshold":
            threshold = dec.threshold if threshold is None else threshold
            if not (math.isfinite(threshold) and 0 < threshold <= 1):
                raise ConfigError(f"threshold must be in (0, 1] (got {threshold})")
        elif threshold is not None:
            raise ConfigError(f"threshold is only used in threshold mode (mode is {mode!r})")
        return steps, threshold, temperature

    def _usable_regions(self, regions: Sequence[RegionInput], width: int, height: int,
                        budget: int | None) -> tuple[list[PreparedRegion], dict[int, str]]:
        """The region rules and the budget (default `region_budget`) applied to one frame: (regions to caption,
        refusal reason by request index); refusals are logged under the throttle."""
        prepared, errors = prepare_regions(regions, width, height)
        prepared, over_budget = select_within_budget(prepared, regions, self.region_budget if budget is None else budget)
        errors.update(over_budget)
        self._refusal_log.log(errors, len(regions), self.log_throttle)
        return prepared, errors

    def _roi_tokens(self, frame: Any, prepared: list[PreparedRegion], check: Callable[[], None]) -> torch.Tensor:
        """RoI tokens of every region, max_regions at a time (regions are independent), so a stop is seen
        between two groups and no tensor holds a whole large request's samples at once."""
        step = max(int(self.config.region.max_regions), 1)
        parts = []
        for start in range(0, len(prepared), step):
            check()
            parts.append(self.model.roi_tokens(frame, prepared[start:start + step]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _prompt_ids(self, prompt: str | None) -> torch.Tensor | None:
        """Token ids of a native per-request prompt (None: the model's own; official prompts go in as text)."""
        if not prompt or self.layout == "official":
            return None
        if self.tokenizer is None:
            raise ConfigError("this model has no tokenizer, so it takes no per-request prompt")
        if getattr(self.model, "prompt_prefix_ids", torch.empty(0)).numel():
            raise ConfigError("this checkpoint builds its prompt from a chat template; it takes no per-request "
                              "prompt")
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        if not ids:
            raise ConfigError(f"prompt {prompt!r} has no tokens")
        return torch.tensor(ids, dtype=torch.long)

    def _logits_fn(self, mode: str, prefix: torch.Tensor, roi: torch.Tensor, cache):  # noqa: ANN001
        model = self.model
        if cache is not None:
            return lambda toks, act: model.region_logits(roi[act], toks, cache, self.attn_impl)
        structured = mode != "nomask"
        if mode == "nomask":
            # Without the mask, regions see each other, so every span stays in the sequence until all are done.
            def fn(toks: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
                if act.numel() != roi.shape[0]:
                    raise RuntimeError("nomask decoding needs every span in every forward")
                return model.dense_logits(prefix, roi, toks, structured=False)
            return fn
        return lambda toks, act: model.dense_logits(prefix, roi[act], toks, structured=structured)

    def _text(self, ids: torch.Tensor, conf: torch.Tensor, stops: Sequence[int] = ()) -> tuple[str, float]:
        """A caption's text up to its first end token (EOS, or any of `stops`), and its mean confidence."""
        ids_l = ids.tolist()
        ends = {self.config.eos_token_id, *stops}
        end = next((i for i, t in enumerate(ids_l) if t in ends), len(ids_l))
        confidence = float(conf[: min(end + 1, len(ids_l))].mean())
        return self._words(ids_l[:end]), confidence

    def _words(self, body: Sequence[int]) -> str:
        """Caption token ids (no end token) -> text; the ids themselves when the model has no tokenizer."""
        if self.tokenizer is None:
            return " ".join(str(i) for i in body)
        return self.tokenizer.decode(list(body), skip_special_tokens=True).strip()

    @staticmethod
    def _results(regions: Sequence[RegionInput], prepared: list[PreparedRegion], errors: dict[int, str],
                 decoded: dict[int, tuple[str, float]]) -> list[RegionCaption]:
        boxes = {p.index: p.box for p in prepared}
        out = []
        for i, reg in enumerate(regions):
            box = boxes.get(i) or (tuple(float(v) for v in reg.box) if _box_like(reg.box) else (math.nan,) * 4)
            text, conf = decoded.get(i, ("", 0.0))
            out.append(RegionCaption(index=i, region_id=reg.region_id, box=box, caption=text, confidence=conf,
                                     source_index=reg.source_index if reg.source_index >= 0 else i,
                                     class_id=reg.class_id, score=reg.score, error=errors.get(i, "")))
        return out

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _lap(self, mark: float) -> tuple[float, float]:
        now = self._clock()
        return (now - mark) * 1000.0, now


class _RefusalLog:
    """Refused regions as one warning line per call at most, and at most one line per `period` seconds (one frame of
    10,000 NaN boxes wrote 10,000 lines); the regions refused meanwhile are counted into the next line."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = -math.inf
        self._held = 0

    def log(self, errors: dict[int, str], total: int, period: float) -> None:
        if not errors:
            return
        now = time.monotonic()
        with self._lock:
            if now - self._last < period:
                self._held += len(errors)
                return
            held, self._held, self._last = self._held, 0, now
        first = min(errors)
        log.warning("%d of %d regions refused (region %d: %s)%s", len(errors), total, first, errors[first],
                    f"; {held} more refused since the last such line" if held else "")


class _Checked:
    """A model call (a logits function, an official forward) that first raises `Cancelled` if a stop was asked;
    other attributes (the forward's token counter) read through."""

    def __init__(self, fn: Any, check: Callable[[], None]) -> None:
        self._fn, self._check = fn, check

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._check()
        return self._fn(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fn, name)


def _stop_check(cancel: Any) -> Callable[[], None]:
    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("captioning stopped on request before the frame was done")
    return check


def _box_like(box: object) -> bool:
    try:
        return box is not None and len(box) == 4 and all(isinstance(float(v), float) for v in box)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _triton_ready() -> bool:
    try:
        from pdlm_ros.runtime.triton_attention import register

        return register()
    except ImportError:
        return False
