"""The published benchmarks, ParaDLC-Bench and DLC-Bench, run with their official judging protocol.

Two phases, each resumable from a cache:
1. caption: every image's regions go to the captioner together, in passes of at most the model's `max_regions`
   (the official script's `prompt_numbers`), formed in qa.json order and sorted by mask area, largest first, within a
   pass (what the official inference does, and what the released model was trained on). DLC-Bench's official
   inference takes one mask per pass, and so does this by default (`masks_per_pass`). NFE, tokens and the wall
   time of each `caption` call are summed: the benchmark's "total time" is captioning time only.
2. judge: for every region, a recognition question, then its qa.json questions, each one request to an
   OpenAI-compatible chat endpoint, with the official prompt, temperature 0, max_tokens 300. ParaDLC-Bench's judge
   is multimodal: each request carries the focal crop (about 3x the mask's box, at least 56 px a side) and the
   crop of the mask as PNG data URLs. DLC-Bench's judge reads text only. Replies are parsed with the official rules
   (`parse_choice_official`); a reply naming no choice scores 0; if the recognition answer is not "Yes", every
   score of the region is capped at 0 (see `pdlm_ros.eval.scoring.benchmark_scores`).

Departures from the official scripts, all where those crash or drop regions: a region the captioner refuses scores
0 on every question and is counted (ParaDLC-Bench's script skips regions without a caption); a recognition reply that
names neither Yes nor No counts as not recognised (the scripts raise); images are read from one folder; a judge
request that still fails after its retries stops the run with JudgeError instead of scoring 0, so an outage never
shows up as a low score (what was answered is cached; a rerun continues).

Caches (JSON, rewritten atomically): captions per image, keyed by model (with a fingerprint of the checkpoint's
files), mode, steps and masks per pass; judge replies keyed by a hash of the whole request (judge model, prompt,
images), so a changed caption is asked again and an unchanged one never is. `max_calls` bounds the HTTP requests a
run may send, retries included.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from pdlm_ros.errors import CheckpointError, ConfigError, DatasetError, JudgeError, PDLMError
from pdlm_ros.eval.cache import JsonCache
from pdlm_ros.eval.dlcbench import Benchmark, BenchItem
from pdlm_ros.eval.judges import (
    DLC_PROMPT,
    PARADLC_PROMPT,
    Judgement,
    QuestionResult,
    Retryable,
    failed_result,
    gated_result,
    chat_completion,
    format_question_official,
    paradlc_recognition_question,
    parse_choice_official,
    recognition_question,
    refused_judgement,
)
from pdlm_ros.eval.questions import Question
from pdlm_ros.types import CaptionerLike, RegionInput

__all__ = ["PROTOCOLS", "BenchProtocol", "JudgeClient", "CaptionRun", "focal_crop", "judge_messages",
           "caption_benchmark", "judge_benchmark", "BenchReport", "run_benchmark", "machine_description"]

log = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------------------- protocol
@dataclass(frozen=True)
class BenchProtocol:
    name: str
    title: str
    multimodal: bool  # the judge sees the focal crop and its mask
    prompt: str
    recognition: Callable[[str], Question]
    default_max_calls: int  # the official scripts' --api-call-limit default
    reference_judge: str  # the judge the published numbers used
    masks_per_pass: int | None  # the official inference's: None = as many as the model takes


PROTOCOLS = {
    "paradlc": BenchProtocol("paradlc", "ParaDLC-Bench", True, PARADLC_PROMPT, paradlc_recognition_question, 5000,
                             "gpt-5.2-2025-12-11 (Azure OpenAI)", None),
    # DLC-Bench is single-region: its official inference captions one mask per pass
    "dlcbench": BenchProtocol("dlcbench", "DLC-Bench", False, DLC_PROMPT, recognition_question, 1000,
                              "Llama-3.1-8B-Instruct (vLLM)", 1),
}


def focal_crop(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The judge's view of a region: the mask's box widened to >= 56 px a side about its centre, then the window
    from one box size before to two after in each axis, clipped to the image (as eval_gpt_with_image.py)."""
    ys, xs = np.nonzero(mask)
    if not ys.size:
        return image, mask  # never sent: the captioner refuses empty masks
    x0, y0 = int(xs.min()), int(ys.min())
    w, h = int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0
    xc, yc = x0 + w / 2, y0 + h / 2
    w, h = max(w, 56), max(h, 56)
    x0, y0 = int(xc - w / 2), int(yc - h / 2)
    H, W = mask.shape
    window = (slice(max(y0 - h, 0), min(y0 + 2 * h, H)), slice(max(x0 - w, 0), min(x0 + 2 * w, W)))
    return image[window], mask[window]


def _png_b64(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def judge_messages(protocol: BenchProtocol, caption: str, question: Question,
                   images: tuple[str, str] | None = None) -> list[dict[str, Any]]:
    """The chat messages of one judge request; `images` = base64 PNGs of the crop and its mask (ParaDLC-Bench)."""
    prompt = protocol.prompt.format(caption=caption, question=format_question_official(question))
    if not protocol.multimodal:
        return [{"role": "user", "content": prompt}]
    if images is None:
        raise ConfigError(f"the {protocol.title} judge needs the focal crop and its mask")
    # The official script labels these PNG bytes image/jpeg; servers decode by content, so the true type is sent.
    return [{"role": "user", "content": [
        {"type": "text", "text": "The image:\n"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{images[0]}"}},
        {"type": "text", "text": "\nThe mask of the image:\n"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{images[1]}"}},
        {"type": "text", "text": f"\n{prompt}\n"},
    ]}]


# ---------------------------------------------------------------------------------------------------------- caption
@dataclass
class CaptionRun:
    """Captions of every region (key -> caption; refused regions -> their error) and the decoding accounting."""

    captions: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    images: int = 0
    passes: int = 0  # caption calls
    nfe: int = 0
    tokens: int = 0
    seconds: float = 0.0  # summed wall time of the caption calls (cached images: as measured when they ran)
    cached_images: int = 0

    @property
    def tpf(self) -> float:
        return self.tokens / self.nfe if self.nfe else 0.0


def _per_pass(captioner: CaptionerLike) -> int | None:
    """Masks the model takes in one pass: `region.max_regions`, and for the official layout its prompt_numbers
    (one learned mask-id embedding each). None (a backend without a config): all of an image's masks at once."""
    config = getattr(captioner, "config", None)
    limits = [getattr(getattr(config, "region", None), "max_regions", None),
              getattr(getattr(config, "official", None), "prompt_numbers", None)]
    limits = [int(n) for n in limits if isinstance(n, int) and n > 0]
    return min(limits) if limits else None


def _passes(items: Sequence[BenchItem], masks: Sequence[np.ndarray], per_pass: int | None) -> list[list[int]]:
    """Region indices per caption call: chunks in qa.json order, each sorted by mask area, largest first."""
    order = list(range(len(items)))
    size = per_pass or len(order) or 1
    chunks = [order[i:i + size] for i in range(0, len(order), size)]
    return [sorted(c, key=lambda i: (-int(masks[i].sum()), i)) for c in chunks]


def caption_benchmark(captioner: CaptionerLike, bench: Benchmark, *, mode: str = "auto",
                      steps: int | None = None, cache: JsonCache | None = None, limit: int | None = None,
                      masks_per_pass: int | None = None, progress: bool = False) -> CaptionRun:
    """Caption every region of the benchmark (first `limit` regions), one image at a time, at most
    `masks_per_pass` masks per caption call (None: as many as the model takes in one pass)."""
    from pdlm_ros.eval.harness import resolve_mode

    mode = resolve_mode(captioner, mode)
    run = CaptionRun()
    if masks_per_pass is not None and masks_per_pass < 1:
        raise ConfigError(f"masks per pass must be >= 1 (got {masks_per_pass})")
    limits = [n for n in (_per_pass(captioner), masks_per_pass) if n is not None]
    per_pass = None if mode.startswith("sequential") or not limits else min(limits)
    groups = bench.groups(limit)
    bar = tqdm(total=sum(len(g) for _, g in groups), unit="region", desc=f"caption {mode}", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        for image_key, items in groups:
            entry = cache.get(image_key) if cache is not None else None
            if entry is None or set(entry["captions"]) | set(entry["errors"]) != {it.ann_id for it in items}:
                entry = _caption_image(captioner, bench, items, mode, steps, per_pass)
                if cache is not None:
                    cache.put(image_key, entry)
            else:
                run.cached_images += 1
            run.images += 1
            run.captions.update(entry["captions"])
            run.errors.update(entry["errors"])
            run.passes += entry["passes"]
            run.nfe += entry["nfe"]
            run.tokens += entry["tokens"]
            run.seconds += entry["seconds"]
            bar.update(len(items))
    finally:
        bar.close()
        if cache is not None:
            cache.flush()
    return run


def _caption_image(captioner: CaptionerLike, bench: Benchmark, items: list[BenchItem], mode: str,
                   steps: int | None, per_pass: int | None) -> dict[str, Any]:
    image = bench.load_image(items[0])
    masks = [bench.mask(it) for it in items]
    entry: dict[str, Any] = {"captions": {}, "errors": {}, "passes": 0, "nfe": 0, "tokens": 0, "seconds": 0.0}
    for chunk in _passes(items, masks, per_pass):
        regions = [RegionInput(mask=masks[i], region_id=items[i].ann_id, source_index=i) for i in chunk]
        t0 = time.perf_counter()
        try:
            result = captioner.caption(image, regions, mode=mode, steps=steps)
        except (CheckpointError, ConfigError):
            raise  # the model or the options are wrong: every image would fail the same way
        except PDLMError as err:
            log.warning("image %s refused: %s", items[0].image_file, err)
            entry["errors"].update({items[i].ann_id: str(err) for i in chunk})
            continue
        entry["seconds"] += time.perf_counter() - t0
        if len(result.regions) != len(regions):
            raise PDLMError(f"captioner returned {len(result.regions)} captions for {len(regions)} regions")
        entry["passes"] += 1
        entry["nfe"] += int(result.stats.nfe)
        entry["tokens"] += int(result.stats.tokens)
        for i, region in zip(chunk, result.regions):
            if region.error:
                entry["errors"][items[i].ann_id] = region.error
            else:
                entry["captions"][items[i].ann_id] = region.caption
    return entry


# ------------------------------------------------------------------------------------------------------------ judge
@dataclass
class JudgeClient:
    """The judge endpoint: bounded concurrency, retries with exponential backoff, a reply cache, a call limit."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 1.0
    concurrency: int = 8
    max_calls: int = 5000
    cache: JsonCache | None = None
    calls: int = field(default=0, init=False)
    cached: int = field(default=0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise JudgeError(f"judge endpoint must be an http(s) URL such as http://127.0.0.1:8000/v1 "
                             f"(got {self.base_url!r})")
        if self.retries < 0 or self.timeout <= 0 or self.backoff < 0 or self.concurrency < 1 or self.max_calls < 1:
            raise ConfigError(f"need judge retries >= 0, timeout > 0, backoff >= 0, concurrency >= 1 and a call "
                              f"limit >= 1 (got {self.retries}, {self.timeout}, {self.backoff}, {self.concurrency}, "
                              f"{self.max_calls})")
        self.base_url = self.base_url.rstrip("/")

    def describe(self) -> dict[str, str]:
        return {"name": "openai", "endpoint": self.base_url, "model": self.model}

    def _spend(self) -> None:
        with self._lock:
            if self.calls >= self.max_calls:
                where = f"; answers so far are cached in {self.cache.path}" if self.cache is not None else ""
                raise JudgeError(f"judge call limit of {self.max_calls} reached{where}: rerun with a higher "
                                 "--max-judge-calls to continue")
            self.calls += 1

    def _request(self, messages: list[dict[str, Any]], max_tokens: int) -> str:
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            self._spend()
            try:
                return chat_completion(self.base_url, self.model, messages, api_key=self.api_key,
                                       timeout=self.timeout, max_tokens=max_tokens)
            except Retryable as err:
                reason = str(err)
                log.warning("judge attempt %d/%d failed: %s", attempt + 1, self.retries + 1, reason)
        raise JudgeError(f"judge endpoint {self.base_url} failed {self.retries + 1} attempts: {reason}. Is an "
                         f"OpenAI-compatible server serving {self.model!r} there?")

    def ask(self, messages: list[dict[str, Any]], max_tokens: int = 300) -> str:
        key = hashlib.sha256(json.dumps([self.model, max_tokens, messages], sort_keys=True).encode()).hexdigest()
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                with self._lock:
                    self.cached += 1
                return str(hit)
        reply = self._request(messages, max_tokens)
        if self.cache is not None:
            self.cache.put(key, reply)
        return reply

    def check(self, protocol: BenchProtocol) -> None:
        """One small request in the protocol's shape (with an image for a multimodal judge): fails before any
        captioning is spent when the endpoint is down, answers garbage or cannot take images."""
        text = "Answer with the single letter A."
        messages: list[dict[str, Any]] = [{"role": "user", "content": text}]
        if protocol.multimodal:
            png = _png_b64(np.zeros((28, 28, 3), np.uint8))
            messages = [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                {"type": "text", "text": text}]}]
        self._request(messages, 1)


def _region_judgement(item: BenchItem, caption: str, recognition: Question, rec_reply: str,
                      replies: Sequence[str]) -> Judgement:
    recognized = parse_choice_official(rec_reply, [c for c, _ in recognition.choices]) == 0
    results: list[QuestionResult] = []
    for q, reply in zip(item.questions, replies):
        choice = parse_choice_official(reply, [c for c, _ in q.choices])
        results.append(failed_result(q, f"reply names no choice: {reply.strip()[:120]!r}", reply) if choice is None
                       else gated_result(q, choice, recognized, reply))
    return Judgement(key=item.ann_id, caption=caption, results=results, recognized=recognized,
                     class_name=item.class_name, recognition_reply=rec_reply)


def judge_benchmark(bench: Benchmark, protocol: BenchProtocol, captions: CaptionRun, client: JudgeClient, *,
                    limit: int | None = None, progress: bool = False) -> list[Judgement]:
    """Judge every captioned region; refused regions score 0 without a request. Order: qa.json's."""
    groups = bench.groups(limit)
    total = sum(len(it.questions) + 1 for _, g in groups for it in g if it.ann_id in captions.captions)
    bar = tqdm(total=total, unit="question", desc="judge", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    by_key: dict[str, Judgement] = {}
    pool = ThreadPoolExecutor(max_workers=client.concurrency, thread_name_prefix="judge")

    def ask(messages: list[dict[str, Any]]) -> str:
        reply = client.ask(messages)
        bar.update(1)
        return reply

    try:
        for _, items in groups:
            todo = [it for it in items if it.ann_id in captions.captions]
            for it in items:
                if it.ann_id not in captions.captions:
                    reason = captions.errors.get(it.ann_id, "no caption")
                    by_key[it.ann_id] = refused_judgement(it.ann_id, it.questions, reason, it.class_name)
            if not todo:
                continue
            image = bench.load_image(todo[0]) if protocol.multimodal else None
            futures = {}
            for it in todo:
                images = None
                if image is not None:
                    crop, crop_mask = focal_crop(image, bench.mask(it))
                    images = (_png_b64(np.ascontiguousarray(crop)),
                              _png_b64(np.ascontiguousarray(crop_mask).astype(np.uint8) * 255))
                caption = captions.captions[it.ann_id]
                recognition = protocol.recognition(it.class_name)
                futures[it.ann_id] = [pool.submit(ask, judge_messages(protocol, caption, q, images))
                                      for q in (recognition, *it.questions)]
            flat = [f for fs in futures.values() for f in fs]
            done, _ = wait(flat, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    raise f.exception()  # type: ignore[misc]
            for it in todo:
                replies = [f.result() for f in futures[it.ann_id]]
                by_key[it.ann_id] = _region_judgement(it, captions.captions[it.ann_id],
                                                      protocol.recognition(it.class_name), replies[0], replies[1:])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        if client.cache is not None:
            client.cache.flush()
    return [by_key[it.ann_id] for _, items in groups for it in items]


# ----------------------------------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class BenchReport:
    """One benchmark run: Table 2's numbers, the settings behind them and every region's caption and answers."""

    bench: str  # "paradlc" | "dlcbench"
    model: str
    model_id: str
    mode: str
    steps: int | None
    judge: dict[str, str]
    scores: Any  # BenchmarkScores
    judgements: list[Judgement] = field(repr=False)
    captions: CaptionRun = field(repr=False)
    masks_per_pass: int | None = None  # None: the model's limit
    judge_calls: int = 0
    judge_cached: int = 0
    judge_seconds: float = 0.0
    created: str = ""  # UTC, ISO 8601
    machine: str = ""

    @property
    def title(self) -> str:
        return PROTOCOLS[self.bench].title

    def table_row(self) -> dict[str, Any]:
        """The paper's Table 2 columns (Method, Type, ParaDLC-Bench Avg %, TPF, Time s), with Pos, Neg and NFE."""
        s, c = self.scores, self.captions
        return {"method": self.model, "type": f"diffusion ({self.mode})", "pos": round(s.pos, 1),
                "neg": round(s.neg, 1), "avg": round(s.avg, 1), "tpf": round(c.tpf, 2),
                "nfe_per_image": round(c.nfe / c.images, 1) if c.images else 0.0, "nfe_total": c.nfe,
                "time_s": round(c.seconds, 1)}

    def to_dict(self, details: bool = True) -> dict[str, Any]:
        c = self.captions
        out: dict[str, Any] = {
            "benchmark": self.title, "table": self.table_row(), "scores": self.scores.to_dict(),
            "model": self.model, "model_id": self.model_id, "mode": self.mode, "steps": self.steps,
            "captioning": {"images": c.images, "regions": len(c.captions) + len(c.errors), "passes": c.passes,
                           "masks_per_pass": self.masks_per_pass,
                           "nfe": c.nfe, "tokens": c.tokens, "tpf": round(c.tpf, 4), "seconds": round(c.seconds, 3),
                           "cached_images": c.cached_images},
            "judge": {**self.judge, "protocol": self.title, "reference_judge": PROTOCOLS[self.bench].reference_judge,
                      "requests": self.judge_calls, "cached_answers": self.judge_cached,
                      "seconds": round(self.judge_seconds, 3)},
            "created": self.created, "machine": self.machine,
        }
        if details:
            out["regions"] = [{
                "key": j.key, "class_name": j.class_name, "caption": j.caption, "refused": j.refused,
                "recognized": j.recognized, "recognition_reply": j.recognition_reply,
                "questions": [{"type": r.question.kind, "subtype": r.question.subtype, "question": r.question.text,
                               "reply": r.reply, "choice": r.choice_text, "score": r.score, "failed": r.failed}
                              for r in j.results]} for j in self.judgements]
        return out


def machine_description() -> str:
    import platform

    try:
        import torch

        dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        torch_v = f"PyTorch {torch.__version__}"
    except Exception:  # noqa: BLE001 - a description only; never stops a run
        dev, torch_v = "unknown accelerator", "PyTorch unknown"
    return f"{platform.machine()} {os.cpu_count()} CPU cores, {dev}, {torch_v}, Python {platform.python_version()}"


def _fingerprint(checkpoint: str | Path | None) -> str:
    """Names, sizes and mtimes of a checkpoint directory's files: a retrained model gets new cache keys."""
    if checkpoint is None:
        return ""
    root = Path(checkpoint)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []
    stat = [(str(p.relative_to(root)), p.stat().st_size, int(p.stat().st_mtime)) for p in files]
    return hashlib.sha256(json.dumps(stat).encode()).hexdigest()[:16]


def run_benchmark(captioner: CaptionerLike, bench: Benchmark, client: JudgeClient, *, model_id: str,
                  checkpoint: str | Path | None = None, mode: str = "auto", steps: int | None = None,
                  cache_dir: str | Path | None = None, limit: int | None = None, progress: bool = False,
                  check: bool = True, masks_per_pass: int | None | str = "official") -> BenchReport:
    """Caption, judge and score `bench`; caches live in `cache_dir` (None: no cache). `check`: probe the judge
    first (the CLI does so before loading the model). `masks_per_pass`: "official" (the benchmark's own inference:
    1 for DLC-Bench, the model's limit for ParaDLC-Bench), None (the model's limit) or a number."""
    from datetime import datetime, timezone

    from pdlm_ros.eval.scoring import benchmark_scores

    from pdlm_ros.eval.harness import resolve_mode

    protocol = PROTOCOLS[bench.name]
    mode = resolve_mode(captioner, mode)
    per_pass = protocol.masks_per_pass if masks_per_pass == "official" else masks_per_pass
    if per_pass is not None and not isinstance(per_pass, int):
        raise ConfigError(f"masks_per_pass must be 'official', None or a number (got {masks_per_pass!r})")
    if limit is not None and limit < 1:
        raise DatasetError(f"number of regions to evaluate must be >= 1 (got {limit})")
    if not len(bench):
        raise DatasetError(f"{bench.title} folder {bench.root} lists no regions in qa.json")
    caption_cache = judge_cache = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        meta = {"bench": bench.name, "model": model_id, "fingerprint": _fingerprint(checkpoint), "mode": mode,
                "steps": steps, "masks_per_pass": per_pass}
        slug = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
        caption_cache = JsonCache(cache_dir / f"captions-{bench.name}-{mode}-{slug}.json", meta, every=5)
        judge_slug = hashlib.sha256(client.model.encode()).hexdigest()[:8]
        judge_cache = JsonCache(cache_dir / f"judge-{bench.name}-{judge_slug}.json",
                                {"bench": bench.name, "judge": client.model})
        client.cache = judge_cache
    if check:
        client.check(protocol)  # before any captioning is spent
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    captions = caption_benchmark(captioner, bench, mode=mode, steps=steps, cache=caption_cache, limit=limit,
                                 masks_per_pass=per_pass, progress=progress)
    t0 = time.perf_counter()
    judgements = judge_benchmark(bench, protocol, captions, client, limit=limit, progress=progress)
    return BenchReport(bench=bench.name, model=str(getattr(captioner, "name", "")), model_id=model_id, mode=mode,
                       steps=steps, judge=client.describe(), scores=benchmark_scores(judgements),
                       judgements=judgements, captions=captions, masks_per_pass=per_pass, judge_calls=client.calls,
                       judge_cached=client.cached, judge_seconds=time.perf_counter() - t0, created=created,
                       machine=machine_description())
