"""Training on generated multi-region scenes: the visual instruction tuning loss of LLaDA-V, all regions of a frame in
one sequence with the structured mask.

Per scene: encode the frame and run the prefix ONCE (the structured mask makes the prefix independent of every caption
token, so one prefix pass serves all regions exactly, with gradients flowing through its K/V); then for every region
(and `noise_draws` independent noise draws of it) draw t ~ U(0, 1), mask each caption token with probability
p = (1 - eps) t + eps, and add CE(masked tokens) / p, averaged over the span length (answers are padded with EOS
to the fixed span, as in LLaDA's SFT). Only response tokens are ever masked or scored.

Official layout (`--layout official`, or `--init` with an official checkpoint): the same loss under the released
PerceptionDLM's rules (`official.masked_diffusion_loss`): masks sorted by area, at most prompt_numbers per pass,
one full forward per pass (no prefix pass to share, so one noise draw), captions padded with <|eot_id|>.
`--rule isolated` trains under this package's structured rule instead, e.g. to fine-tune released weights
towards an exact prefix cache.

Checkpoints are safetensors: `model.safetensors` + `config.json` + `tokenizer.json` (a loadable PerceptionDLM
directory) plus `optimizer.safetensors` and `trainer_state.json` for exact resume (same data order, same schedule).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from safetensors.torch import save_file
from tqdm import tqdm

from pdlm_ros.errors import CheckpointError, ConfigError, DatasetError
from pdlm_ros.model.checkpoint import check_keys, load_pretrained, read_safetensors, save_pretrained
from pdlm_ros.model import official
from pdlm_ros.model.ar_baseline import next_token_loss
from pdlm_ros.model.config import preset as get_preset
from pdlm_ros.model.pdlm import PerceptionDLM
from pdlm_ros.model.regions import PreparedRegion
from pdlm_ros.model.tokenizer import build_tiny_official_tokenizer, build_tiny_tokenizer

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
    antithetic: bool = False  # pair the draws: the second masks what the first left visible (`noise_masks`)
    box_fraction: float = 0.5  # share of regions given as boxes (the rest as instance masks)
    augment: float = 0.0  # share of scenes given camera-like changes (`photometric_jitter`) before encoding
    objective: str = "diffusion"  # diffusion, or ar: the autoregressive twin (same modules, causal, next token)
    seed: int = 0
    save_every: int = 100
    eval_every: int = 250
    eval_scenes: int = 24
    max_minutes: float = 0.0  # 0 = no time cap
    threads: int = 0  # 0 = torch default
    layout: str = "native"  # native, or official (the preset's official-layout twin, e.g. tiny-official)
    init: str = ""  # start from this checkpoint (native or official) instead of a random preset
    rule: str = ""  # official layout only: the attention rule of the loss, official (default) or isolated

    def validate(self, as_flags: bool = False) -> None:
        """Raise ConfigError naming the first value out of range (as `--flag` when `as_flags`, for the CLI)."""
        def name(f: str) -> str:
            return "--" + f.replace("_", "-") if as_flags else f

        # (field, ok, requirement)
        checks = [
            ("steps", self.steps >= 1, "an integer >= 1"),
            ("scenes_per_step", self.scenes_per_step >= 1, "an integer >= 1"),
            ("lr", math.isfinite(self.lr) and self.lr > 0, "a finite number > 0"),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "between 0 and 1"),
            ("warmup", self.warmup >= 0, "an integer >= 0"),
            ("weight_decay", math.isfinite(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0"),
            ("grad_clip", self.grad_clip > 0, "a number > 0"),
            ("noise_draws", self.noise_draws >= 1, "an integer >= 1"),
            ("box_fraction", 0 <= self.box_fraction <= 1, "between 0 and 1"),
            ("augment", 0 <= self.augment <= 1, "between 0 and 1"),
            ("objective", self.objective in ("diffusion", "ar") and (self.objective == "diffusion"
                                                                   or (self.layout == "native" and not self.init)),
             "diffusion, or ar (a new native-layout model only)"),
            ("seed", self.seed >= 0, "an integer >= 0"),
            ("save_every", self.save_every >= 1, "an integer >= 1"),
            ("eval_every", self.eval_every >= 0, "an integer >= 0 (0 = no evaluation)"),
            ("eval_scenes", self.eval_scenes >= 1 or not self.eval_every,
             "an integer >= 1 when evaluating (set eval_every 0 to skip evaluation)"),
            ("max_minutes", self.max_minutes >= 0 and not math.isnan(self.max_minutes),
             "a number >= 0 (0 = no time cap)"),
            ("threads", self.threads >= 0, "an integer >= 0 (0 = torch default)"),
            ("layout", self.layout in ("native", "official"), "native or official"),
            ("rule", self.rule in ("", "official", "isolated"), "official or isolated (official layout only)"),
            ("init", not self.init or Path(self.init).is_dir(), "an existing checkpoint directory"),
        ]
        for f, ok, requirement in checks:
            if not ok:
                raise ConfigError(f"{name(f)} must be {requirement} (got {getattr(self, f)!r})")


@dataclass
class TrainState:
    step: int = 0
    seconds: float = 0.0
    curve: list[dict] = field(default_factory=list)  # {"step", "loss", "lr", "seconds"} every few steps
    evals: list[dict] = field(default_factory=list)  # {"step", attribute accuracies}
    smooth: float | None = None  # running (EMA) loss, so a resumed curve continues the same smoothing


_STATE_TYPES = {"step": (int,), "seconds": (int, float), "curve": (list,), "evals": (list,)}
_OPT_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq"})  # AdamW's per-parameter state
# fields whose change makes a resumed run differ from an uninterrupted one (data order, schedule, loss)
_EXACT_FIELDS = ("preset", "steps", "scenes_per_step", "lr", "min_lr_ratio", "warmup", "weight_decay", "grad_clip",
                 "noise_draws", "antithetic", "box_fraction", "augment", "objective", "seed", "layout", "init", "rule")


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


def photometric_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Camera-like changes the scene renderer never makes: contrast and brightness, defocus blur, sensor noise.

    Small enough to keep every colour word true (a shift of 15 levels never turns red into pink). Masks and boxes
    are unchanged: only the pixels move.
    """
    img = image.astype(np.float32)
    if rng.random() < 0.6:
        img = (img - 128.0) * rng.uniform(0.8, 1.2) + 128.0 + rng.uniform(-15, 15)
    if rng.random() < 0.4:
        pil = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8))
        img = np.asarray(pil.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2))), dtype=np.float32)
    if rng.random() < 0.4:
        img = img + rng.standard_normal(img.shape[:2], dtype=np.float32)[..., None] * rng.uniform(3, 14)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def caption_targets(captions: list[str], tokenizer, span_len: int, eos_id: int) -> torch.Tensor:  # noqa: ANN001
    """(N, L) token ids: each caption then EOS padding to the span length."""
    rows = []
    for text in captions:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) >= span_len:
            raise DatasetError(f"caption {text!r} has {len(ids)} tokens; the span holds {span_len - 1} plus EOS")
        rows.append(ids + [eos_id] * (span_len - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


def noise_masks(shape: tuple[int, int], draws: int, antithetic: bool,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Masking probabilities (K*N, 1) and masks (K*N, L) for K draws of N spans of L tokens.

    Antithetic: draws come in pairs, the second masking exactly the tokens the first left visible, at
    p' = 1 - p. Each draw alone is still the LLaDA forward process (t ~ U(0, 1), tokens masked iid given t), so the
    loss stays an unbiased ELBO estimate, but every token is scored in every pair: on a 5-word caption an
    independent pair leaves a given word unscored a quarter of the time, which slows the rarer-learnt words
    (shape, size) most. An odd last draw is independent.
    """
    n, length = shape
    pairs = draws // 2 if antithetic else 0
    t = torch.rand((draws - pairs) * n, 1, generator=generator)
    p = (1 - EPS) * t + EPS
    m = torch.rand((draws - pairs) * n, length, generator=generator) < p
    if pairs:
        first_p, first_m = p[:pairs * n], m[:pairs * n]
        p = torch.cat([first_p, 1 - first_p, p[pairs * n:]])
        m = torch.cat([first_m, ~first_m, m[pairs * n:]])
        # keep the 1/p weight finite where 1 - p is ~0 (then nothing is masked in that draw anyway)
        p = p.clamp_min(EPS)
    return p, m


def masked_diffusion_loss(model: PerceptionDLM, rgb: np.ndarray, regions: list[PreparedRegion], targets: torch.Tensor,
                          noise_draws: int, generator: torch.Generator, antithetic: bool = False) -> torch.Tensor:
    """LLaDA SFT loss for all regions of one frame. targets (N, L)."""
    frame = model.encode_frame(rgb)
    cache = model.prefix_cache(frame)
    roi = model.roi_tokens(frame, regions)  # (N, R, C)
    x0 = targets.repeat(noise_draws, 1)  # (K*N, L)
    roi = roi.repeat(noise_draws, 1, 1)
    p_mask, masked = noise_masks(targets.shape, noise_draws, antithetic, generator)
    noisy = torch.where(masked, torch.full_like(x0, model.cfg.mask_token_id), x0)
    logits = model.region_logits(roi, noisy, cache)  # (K*N, L, V)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x0, reduction="none")  # (K*N, L)
    per_span = (ce * masked / p_mask).sum(1) / x0.shape[1]
    return per_span.mean()


def official_scene_loss(model: PerceptionDLM, tokenizer, rgb: np.ndarray, regions: list[PreparedRegion],  # noqa: ANN001
                        targets: torch.Tensor, generator: torch.Generator, rule: str = "official") -> torch.Tensor:
    """The official layout's loss over a scene: passes of at most prompt_numbers regions, averaged over regions."""
    h, w = rgb.shape[:2]
    per_pass = model.cfg.official.prompt_numbers
    runner = model.official_runner()
    total = torch.zeros(())
    for start in range(0, len(regions), per_pass):
        part = regions[start:start + per_pass]
        masks = [r.mask if r.mask is not None else official.box_mask(r.box, w, h) for r in part]
        loss = official.masked_diffusion_loss(runner, model.cfg, tokenizer, model.special_tokens, rgb, masks,
                                              targets[start:start + per_pass], generator, rule=rule)
        total = total + loss * len(part)
    return total / len(regions)


def build_model(cfg: TrainConfig):  # noqa: ANN201
    """(model, tokenizer) to train: the checkpoint of --init, or the preset (its official twin for layout official)."""
    if cfg.init:
        model, tokenizer = load_pretrained(cfg.init, dtype=torch.float32)
        if cfg.layout == "official" and model.cfg.official is None:
            raise ConfigError(f"--layout official, but {cfg.init} is a native-layout checkpoint")
        if cfg.rule and model.cfg.official is None:
            raise ConfigError("--rule applies to the official layout only")
        return model, tokenizer
    if cfg.rule and cfg.layout != "official":
        raise ConfigError("--rule applies to the official layout only (add --layout official)")
    name = cfg.preset if cfg.layout == "native" else f"{cfg.preset}-official"
    model_cfg = get_preset(name)
    if cfg.objective == "ar":
        model_cfg = dataclasses.replace(model_cfg, name=f"{model_cfg.name}-ar", objective="ar")
    tokenizer = build_tiny_official_tokenizer() if model_cfg.official is not None else build_tiny_tokenizer()
    torch.manual_seed(cfg.seed)
    model = PerceptionDLM(model_cfg, tokenizer.encode(model_cfg.prompt, add_special_tokens=False).ids)
    if model_cfg.official is not None:
        official.attach_special_tokens(model, tokenizer, f"preset {name}")
    return model, tokenizer


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


def _read_trainer_state(path: Path) -> tuple[TrainState, dict]:
    """trainer_state.json -> (state, saved TrainConfig dict); CheckpointError naming what is wrong."""
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} is missing")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot resume: {path} is not readable JSON ({err})") from err
    if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
        raise CheckpointError(f"cannot resume: {path} has no \"state\" object")
    raw = meta["state"]
    missing = [k for k in _STATE_TYPES if k not in raw]
    if missing:
        raise CheckpointError(f"cannot resume: {path} state lacks {', '.join(missing)}")
    unexpected = sorted(set(raw) - set(_STATE_TYPES) - {"smooth"})
    if unexpected:
        raise CheckpointError(f"cannot resume: {path} state has unexpected keys {', '.join(unexpected)}")
    for k, types in _STATE_TYPES.items():
        v = raw[k]
        if isinstance(v, bool) or not isinstance(v, types):
            want = " or ".join(t.__name__ for t in types)
            raise CheckpointError(f"cannot resume: {path} state.{k} must be {want}, got {type(v).__name__} {v!r}")
    if raw["step"] < 1:
        raise CheckpointError(f"cannot resume: {path} state.step must be >= 1 (got {raw['step']})")
    if not math.isfinite(raw["seconds"]) or raw["seconds"] < 0:
        raise CheckpointError(f"cannot resume: {path} state.seconds must be a finite number >= 0 "
                              f"(got {raw['seconds']!r})")
    smooth = raw.get("smooth")
    if smooth is not None and (isinstance(smooth, bool) or not isinstance(smooth, (int, float))):
        raise CheckpointError(f"cannot resume: {path} state.smooth must be a number or null, got {smooth!r}")
    saved_cfg = meta.get("config", {})
    if not isinstance(saved_cfg, dict):
        raise CheckpointError(f"cannot resume: {path} \"config\" must be an object, got {type(saved_cfg).__name__}")
    return TrainState(**raw), saved_cfg


def _check_optimizer_state(path: Path, tensors: dict[str, torch.Tensor], opt: torch.optim.Optimizer,
                           trained_steps: int) -> dict[torch.nn.Parameter, dict[str, torch.Tensor]]:
    """Group the flat `group.param.key` tensors of optimizer.safetensors per parameter, checking every key,
    index, dtype, shape and step count against `opt` and the trainer state's step."""
    if not tensors:
        raise CheckpointError(f"cannot resume: {path} holds no optimizer state")
    per_param: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        parts = key.split(".", 2)
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() or parts[2] not in _OPT_KEYS:
            raise CheckpointError(f"cannot resume: {path} has unexpected key {key!r} "
                                  f"(expected GROUP.PARAM.{{{','.join(sorted(_OPT_KEYS))}}})")
        i, j = int(parts[0]), int(parts[1])
        if i >= len(opt.param_groups) or j >= len(opt.param_groups[i]["params"]):
            raise CheckpointError(f"cannot resume: {path} key {key!r} names a parameter the model does not have "
                                  f"(different preset?)")
        if not v.is_floating_point():
            raise CheckpointError(f"cannot resume: {path} {key} has dtype {v.dtype}; expected a floating type")
        per_param.setdefault((i, j), {})[parts[2]] = v
    out = {}
    for (i, j), st in sorted(per_param.items()):
        lacking = sorted(_OPT_KEYS - set(st))
        if lacking:
            raise CheckpointError(f"cannot resume: {path} lacks {', '.join(f'{i}.{j}.{k}' for k in lacking)}")
        p = opt.param_groups[i]["params"][j]
        for k in ("exp_avg", "exp_avg_sq"):
            if tuple(st[k].shape) != tuple(p.shape):
                raise CheckpointError(f"cannot resume: {path} {i}.{j}.{k} has shape {tuple(st[k].shape)}, "
                                      f"the parameter has {tuple(p.shape)}")
        if st["step"].numel() != 1:
            raise CheckpointError(f"cannot resume: {path} {i}.{j}.step has shape {tuple(st['step'].shape)}; "
                                  "expected a scalar")
        n = float(st["step"])
        if not (1 <= n <= trained_steps and n == int(n)):
            raise CheckpointError(f"cannot resume: {path} {i}.{j}.step is {n:g}; expected a whole number from 1 "
                                  f"to the trainer state's step {trained_steps}")
        out[p] = {"step": st["step"].reshape(()).clone(),
                  "exp_avg": st["exp_avg"].to(p.dtype), "exp_avg_sq": st["exp_avg_sq"].to(p.dtype)}
    return out


def _resume(out: Path, model: PerceptionDLM, opt: torch.optim.Optimizer, cfg: TrainConfig | None = None) -> TrainState:
    """Load weights, optimizer moments and the step counter saved by `_save`, validating each before changing
    anything; CheckpointError names the file and the problem."""
    if not out.is_dir():
        tmp = out.with_name(out.name + ".tmp")
        hint = f" ({tmp} exists: a save was interrupted; rename it to {out.name} to resume from it)" \
            if tmp.is_dir() else " (run without --resume to start a new run)"
        raise CheckpointError(f"nothing to resume: no checkpoint directory at {out}{hint}")
    state, saved_cfg = _read_trainer_state(out / "trainer_state.json")
    opt_path = out / "optimizer.safetensors"
    try:
        loaded, _ = load_pretrained(out)  # a missing/corrupt model.safetensors, config.json or tokenizer.json
        weights = loaded.state_dict()
        check_keys(model.state_dict(), weights, f"{out / 'model.safetensors'}")
        if not opt_path.is_file():
            raise CheckpointError(f"{opt_path} is missing")
        tensors = read_safetensors(opt_path)  # a truncated or foreign file
    except CheckpointError as err:
        raise CheckpointError(f"cannot resume: {err}") from err
    opt_state = _check_optimizer_state(opt_path, tensors, opt, state.step)
    if cfg is not None:
        changed = [f"{k} {saved_cfg[k]!r} -> {getattr(cfg, k)!r}" for k in _EXACT_FIELDS
                   if k in saved_cfg and saved_cfg[k] != getattr(cfg, k)]
        if changed:
            log.warning("resuming with changed settings (%s): the run will differ from an uninterrupted one",
                        ", ".join(changed))
    model.load_state_dict(weights)
    opt.state.clear()
    for p, st in opt_state.items():
        opt.state[p] = st
    return state


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

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    ckpt = out / "checkpoint"
    model, tokenizer = build_model(cfg)
    model_cfg = model.cfg
    state = TrainState()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    if resume:
        state = _resume(ckpt, model, opt, cfg)
        log.info("resumed from %s at step %d", ckpt, state.step)
        if state.step >= cfg.steps:
            log.warning("the checkpoint is already at step %d of %d: nothing left to train", state.step, cfg.steps)
    out.mkdir(parents=True, exist_ok=True)
    model.train()
    span, eos = model_cfg.decoding.caption_len, model_cfg.eos_token_id
    if model_cfg.official is not None:
        eos = model.special_tokens.stop[0]  # the official captions are padded with <|eot_id|>
    all_seeds = scene_seeds("train", cfg.steps * cfg.scenes_per_step)
    eval_seeds = scene_seeds("heldout", cfg.eval_scenes, offset=999_000_000)  # apart from `pdlm-ros eval` seeds
    bar = tqdm(total=cfg.steps, initial=state.step, desc="train", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter() - state.seconds
    running = state.smooth
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
            image = scene.image
            if cfg.augment and rng.random() < cfg.augment:
                image = photometric_jitter(image, np.random.default_rng(seed))
            targets = caption_targets([o.caption for o in scene.objects], tokenizer, span, eos)
            gen = torch.Generator().manual_seed(seed)
            if model_cfg.official is not None:
                loss = official_scene_loss(model, tokenizer, image, regions, targets, gen, cfg.rule or "official")
            elif model_cfg.objective == "ar":
                loss = next_token_loss(model, image, regions, targets, eos)
            else:
                loss = masked_diffusion_loss(model, image, regions, targets, cfg.noise_draws, gen, cfg.antithetic)
            (loss / cfg.scenes_per_step).backward()
            total += loss.item() / cfg.scenes_per_step
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        state.step += 1
        state.seconds = time.perf_counter() - t0
        running = total if running is None else 0.95 * running + 0.05 * total
        state.smooth = running
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
