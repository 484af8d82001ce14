"""Training on generated multi-region scenes: the visual instruction tuning loss of LLaDA-V, all regions of a frame in
one sequence with the structured mask.

Per scene: encode the frame and run the prefix ONCE (the structured mask makes the prefix independent of every caption
token, so one prefix pass serves all regions exactly, with gradients flowing through its K/V); then for every region
(and `noise_draws` independent noise draws of it) draw t ~ U(0, 1), mask each caption token with probability
p = (1 - eps) t + eps, and add CE(masked tokens) / p, averaged over the span length (answers are padded with EOS
to the fixed span, as in LLaDA's SFT). Only response tokens are ever masked or scored.

Checkpoints are safetensors: `model.safetensors` + `config.json` + `tokenizer.json` (a loadable PerceptionDLM
directory) plus `optimizer.safetensors` and `trainer_state.json` for exact resume (same data order, same schedule).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from pdlm_ros.errors import CheckpointError, DatasetError
from pdlm_ros.model.checkpoint import load_pretrained, save_pretrained
from pdlm_ros.model.config import preset as get_preset
from pdlm_ros.model.pdlm import PerceptionDLM
from pdlm_ros.model.regions import PreparedRegion
from pdlm_ros.model.tokenizer import build_tiny_tokenizer

__all__ = ["TrainConfig", "train", "masked_diffusion_loss", "scene_regions"]

log = logging.getLogger(__name__)
EPS = 1e-3


@dataclass
class TrainConfig:
    out: str
    preset: str = "tiny"
    steps: int = 1500
    scenes_per_step: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    noise_draws: int = 2  # noise draws per region per scene (reuses the frame's prefix pass)
    box_fraction: float = 0.5  # share of regions given as boxes (the rest as instance masks)
    seed: int = 0
    save_every: int = 100
    eval_every: int = 250
    eval_scenes: int = 24
    max_minutes: float = 0.0  # 0 = no time cap
    threads: int = 0  # 0 = torch default


@dataclass
class TrainState:
    step: int = 0
    seconds: float = 0.0
    curve: list[dict] = field(default_factory=list)  # {"step", "loss", "lr", "seconds"} every few steps
    evals: list[dict] = field(default_factory=list)  # {"step", attribute accuracies}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def scene_regions(scene, rng: random.Random, box_fraction: float) -> list[PreparedRegion]:  # noqa: ANN001
    regions = []
    for i, obj in enumerate(scene.objects):
        as_box = rng.random() < box_fraction
        regions.append(PreparedRegion(i, tuple(float(v) for v in obj.box), None if as_box else obj.mask))
    return regions


def caption_targets(captions: list[str], tokenizer, span_len: int, eos_id: int) -> torch.Tensor:  # noqa: ANN001
    """(N, L) token ids: each caption then EOS padding to the span length."""
    rows = []
    for text in captions:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) >= span_len:
            raise DatasetError(f"caption {text!r} has {len(ids)} tokens; the span holds {span_len - 1} plus EOS")
        rows.append(ids + [eos_id] * (span_len - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def masked_diffusion_loss(model: PerceptionDLM, rgb: np.ndarray, regions: list[PreparedRegion], targets: torch.Tensor,
                          noise_draws: int, generator: torch.Generator) -> torch.Tensor:
    """LLaDA SFT loss for all regions of one frame. targets (N, L)."""
    frame = model.encode_frame(rgb)
    cache = model.decoder.forward_prefix(frame.prefix)
    roi = model.roi_tokens(frame, regions)  # (N, R, C)
    x0 = targets.repeat(noise_draws, 1)  # (K*N, L)
    roi = roi.repeat(noise_draws, 1, 1)
    t = torch.rand(x0.shape[0], 1, generator=generator)
    p_mask = (1 - EPS) * t + EPS  # (K*N, 1)
    masked = torch.rand(x0.shape, generator=generator) < p_mask
    noisy = torch.where(masked, torch.full_like(x0, model.cfg.mask_token_id), x0)
    logits = model.region_logits(roi, noisy, cache)  # (K*N, L, V)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x0, reduction="none")  # (K*N, L)
    per_span = (ce * masked / p_mask).sum(1) / x0.shape[1]
    return per_span.mean()


def _save(model: PerceptionDLM, tokenizer, opt: torch.optim.Optimizer, state: TrainState, cfg: TrainConfig,  # noqa: ANN001
          out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    save_pretrained(model, tokenizer, tmp, metadata={"format": "pt", "step": str(state.step)})
    tensors = {}
    for i, group in enumerate(opt.param_groups):
        for j, p in enumerate(group["params"]):
            for k, v in opt.state.get(p, {}).items():
                if torch.is_tensor(v):
                    tensors[f"{i}.{j}.{k}"] = v.detach().contiguous().cpu().reshape(v.shape)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({"state": asdict(state), "config": asdict(cfg)}, indent=1))
    if out.exists():
        for f in out.iterdir():
            f.unlink()
        out.rmdir()
    tmp.rename(out)


def _resume(out: Path, model: PerceptionDLM, opt: torch.optim.Optimizer) -> TrainState:
    """Load weights, optimizer moments and the step counter saved by `_save`."""
    try:
        loaded, _ = load_pretrained(out)
        meta = json.loads((out / "trainer_state.json").read_text())
        tensors = load_file(str(out / "optimizer.safetensors"))
    except (OSError, json.JSONDecodeError, CheckpointError) as err:
        raise CheckpointError(f"cannot resume from {out}: {err}") from err
    model.load_state_dict(loaded.state_dict())
    for i, group in enumerate(opt.param_groups):
        for j, p in enumerate(group["params"]):
            st = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"{i}.{j}.")}
            if st:
                opt.state[p] = st
    return TrainState(**meta["state"])


def quick_eval(model: PerceptionDLM, tokenizer, seeds: list[int]) -> dict[str, float]:  # noqa: ANN001
    """Attribute accuracy of greedy parallel captions on held-out scenes (word-level, for the training curve)."""
    from pdlm_ros.captioner import Captioner
    from pdlm_ros.data.scenes import generate_scene
    from pdlm_ros.types import RegionInput

    cap = Captioner(model, tokenizer)
    hits = {"shape": 0, "color": 0, "pattern": 0, "size": 0, "exact": 0}
    n = 0
    was_training = model.training
    model.eval()
    for seed in seeds:
        scene = generate_scene(seed)
        res = cap.caption(scene.image, [RegionInput(mask=o.mask) for o in scene.objects])
        for obj, rc in zip(scene.objects, res.regions):
            words = set(rc.caption.split())
            n += 1
            hits["exact"] += rc.caption == obj.caption
            for attr in ("shape", "color", "pattern", "size"):
                hits[attr] += getattr(obj, attr) in words
    model.train(was_training)
    return {k: 100.0 * v / max(n, 1) for k, v in hits.items()} | {"regions": n}


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    from pdlm_ros.data.scenes import generate_scene, scene_seeds

    if cfg.steps < 1 or cfg.scenes_per_step < 1:
        raise DatasetError(f"nothing to train on: steps={cfg.steps}, scenes_per_step={cfg.scenes_per_step}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    ckpt = out / "checkpoint"
    tokenizer = build_tiny_tokenizer()
    model_cfg = get_preset(cfg.preset)
    torch.manual_seed(cfg.seed)
    model = PerceptionDLM(model_cfg, tokenizer.encode(model_cfg.prompt, add_special_tokens=False).ids)
    state = TrainState()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    if resume and ckpt.is_dir():
        state = _resume(ckpt, model, opt)
        log.info("resumed from %s at step %d", ckpt, state.step)
    out.mkdir(parents=True, exist_ok=True)
    model.train()
    span, eos = model_cfg.decoding.caption_len, model_cfg.eos_token_id
    all_seeds = scene_seeds("train", cfg.steps * cfg.scenes_per_step)
    eval_seeds = scene_seeds("heldout", cfg.eval_scenes, offset=999_000_000)  # apart from `pdlm-ros eval` seeds
    bar = tqdm(total=cfg.steps, initial=state.step, desc="train", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter() - state.seconds
    running = None
    while state.step < cfg.steps:
        step = state.step
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for j in range(cfg.scenes_per_step):
            seed = all_seeds[step * cfg.scenes_per_step + j]
            scene = generate_scene(seed)
            rng = random.Random(seed)
            regions = scene_regions(scene, rng, cfg.box_fraction)
            targets = caption_targets([o.caption for o in scene.objects], tokenizer, span, eos)
            gen = torch.Generator().manual_seed(seed)
            loss = masked_diffusion_loss(model, scene.image, regions, targets, cfg.noise_draws, gen)
            (loss / cfg.scenes_per_step).backward()
            total += loss.item() / cfg.scenes_per_step
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        state.step += 1
        state.seconds = time.perf_counter() - t0
        running = total if running is None else 0.95 * running + 0.05 * total
        if state.step % 10 == 0 or state.step == 1:
            state.curve.append({"step": state.step, "loss": round(total, 4), "smooth": round(running, 4),
                                "lr": lr_at(step, cfg), "seconds": round(state.seconds, 1)})
        bar.set_postfix(loss=f"{running:.3f}", lr=f"{lr_at(step, cfg):.2e}")
        bar.update(1)
        if cfg.eval_every and state.step % cfg.eval_every == 0:
            acc = quick_eval(model, tokenizer, eval_seeds)
            state.evals.append({"step": state.step, **{k: round(v, 1) for k, v in acc.items()}})
            log.info("step %d eval %s", state.step, acc)
            bar.write(f"step {state.step}: " + " ".join(f"{k} {v:.1f}" for k, v in acc.items()))
        timed_out = cfg.max_minutes and state.seconds > cfg.max_minutes * 60
        if state.step % cfg.save_every == 0 or state.step == cfg.steps or timed_out:
            _save(model, tokenizer, opt, state, cfg, ckpt)
        if timed_out:
            bar.write(f"time cap of {cfg.max_minutes} min reached at step {state.step}")
            break
    bar.close()
    return ckpt
