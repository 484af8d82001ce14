"""LLaDA masked-diffusion decoding over N caption spans at once.

The sampler knows nothing about images or tokenizers: it calls `logits_fn(tokens, active)` where tokens (n, L) are
the spans still being decoded and `active` their span indices, and expects logits (n, L, V). Every backend (PyTorch,
ONNX Runtime, TensorRT) shares this loop.

Per step: predict every masked position (x0 = argmax of the, optionally Gumbel-perturbed, logits), score it by the
softmax probability of x0 (low-confidence remasking), then commit per span:
- schedule mode: the `num_transfer_tokens` most confident masked positions of every span, where the per-step counts
  come from `num_transfer_schedule` (S = L commits exactly one token per span per step);
- threshold mode: every masked position whose confidence is >= threshold, and at least the most confident one, so a
  span always progresses.
Committed tokens are never remasked. A span that has no masked position left is dropped from later forwards (its
tokens can no longer change, and regions are independent), which is what lets threshold mode save work.

`global_remask_decode` is the official PerceptionDLM sampler (`generate_with_embeds_nonblock`), a different rule:
every step fills every masked position, then re-masks the globally least confident caption positions, filled
earlier or not, on a linear schedule; a full forward every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["num_transfer_schedule", "add_gumbel_noise", "DecodeResult", "diffusion_decode", "global_remask_decode"]

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def num_transfer_schedule(span_len: int, steps: int) -> list[int]:
    """Tokens to commit per span at each step: a linear schedule, the remainder spread over the first steps."""
    if not 1 <= steps <= span_len:
        raise ValueError(f"steps must be in 1..span_len={span_len} (got {steps})")
    base, rem = divmod(span_len, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel-max sampling as LLaDA does it: exp(logits) / (-log U)^temperature, in float64.

    float64 because low-precision Gumbel noise measurably hurts quality (arXiv:2409.02908). Temperature 0 returns the
    logits unchanged, so argmax is greedy and deterministic.
    """
    if temperature == 0:
        return logits
    logits = logits.double()
    u = torch.rand(logits.shape, dtype=torch.float64, generator=generator, device="cpu").to(logits.device)
    gumbel = (-torch.log(u.clamp_min(1e-20))) ** temperature
    return logits.exp() / gumbel


@dataclass
class DecodeResult:
    tokens: torch.Tensor  # (N, L) committed token ids
    confidence: torch.Tensor  # (N, L) probability each token had when it was committed
    nfe: int  # forward passes
    commits: list[list[int]] = field(default_factory=list)  # per step: tokens committed in each span (0 if inactive)

    @property
    def tokens_committed(self) -> int:
        return int(sum(sum(step) for step in self.commits))

    @property
    def tpf(self) -> float:
        return self.tokens_committed / self.nfe if self.nfe else 0.0


def diffusion_decode(logits_fn: LogitsFn, num_spans: int, span_len: int, mask_id: int, *, steps: int,
                     temperature: float = 0.0, threshold: float | None = None,
                     generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                     keep_finished: bool = False) -> DecodeResult:
    """Decode `num_spans` spans of `span_len` masked tokens. See the module docstring for the rules.

    keep_finished: every span stays in every forward until all are done (for models whose spans see each other,
    as in the official layout, where a finished span is still part of the sequence)."""
    if num_spans < 1 or span_len < 1:
        raise ValueError(f"need at least one span of at least one token (got {num_spans} x {span_len})")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (got {temperature})")
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1] (got {threshold})")
    schedule = num_transfer_schedule(span_len, steps)
    x = torch.full((num_spans, span_len), mask_id, dtype=torch.long, device=device)
    conf_out = torch.zeros(num_spans, span_len, device=device)
    active = torch.arange(num_spans, device=device)
    nfe, step, commits = 0, 0, []
    while active.numel():
        xa = x[active]
        masked = xa == mask_id  # (n, L)
        logits = logits_fn(xa, active).float()  # (n, L, V)
        nfe += 1
        logits[..., mask_id] = -torch.inf  # the mask token is never a prediction
        x0 = add_gumbel_noise(logits, temperature, generator).argmax(-1)  # (n, L)
        p = torch.softmax(logits, dim=-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
        conf = torch.where(masked, p, torch.full_like(p, -torch.inf))
        if threshold is None:
            k = schedule[step] if step < len(schedule) else span_len  # past the schedule: finish (cannot happen)
            k_row = torch.minimum(masked.sum(1), torch.tensor(k, device=device))
            order = conf.argsort(dim=1, descending=True)
            rank = torch.empty_like(order)
            rank.scatter_(1, order, torch.arange(span_len, device=device).expand_as(order))
            commit = (rank < k_row.unsqueeze(1)) & masked
        else:
            commit = (conf >= threshold) & masked
            best = conf.argmax(dim=1, keepdim=True)
            commit.scatter_(1, best, True)
            commit &= masked
        x[active] = torch.where(commit, x0, xa)
        conf_out[active] = torch.where(commit, p, conf_out[active])
        per_span = [0] * num_spans
        for j, n_c in zip(active.tolist(), commit.sum(1).tolist()):
            per_span[j] = n_c
        commits.append(per_span)
        step += 1
        if not keep_finished:
            active = active[(x[active] == mask_id).any(1)]
        elif not (x == mask_id).any():
            break
    return DecodeResult(x, conf_out, nfe, commits)


def global_remask_decode(logits_fn: Callable[[torch.Tensor], torch.Tensor], num_positions: int, mask_id: int, *,
                         steps: int, temperature: float = 0.0, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> DecodeResult:
    """The official sampler over M caption positions (all masks' spans, flattened). logits_fn(tokens (M,)) -> (M, V).

    Step s: x0 = argmax of the (optionally Gumbel-perturbed) logits; every masked position takes its x0; unless s is
    the last step, the int(M * (steps - 1 - s) / steps) positions with the lowest softmax probability of their x0
    (in float64; filled positions compete too, scored by this step's prediction, not by their token) are masked
    again. The mask token is not excluded from x0, as in the official code. Returns one span of M tokens.
    """
    if num_positions < 1 or steps < 1:
        raise ValueError(f"need at least one position and one step (got {num_positions}, {steps})")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (got {temperature})")
    x = torch.full((num_positions,), mask_id, dtype=torch.long, device=device)
    conf = torch.zeros(num_positions, dtype=torch.float64, device=device)
    masked = torch.ones(num_positions, dtype=torch.bool, device=device)
    nfe, commits = 0, []
    for step in range(steps):
        if not masked.any():
            break
        logits = logits_fn(x).float()  # (M, V)
        nfe += 1
        x0 = add_gumbel_noise(logits, temperature, generator).argmax(-1)
        p = torch.softmax(logits.double(), dim=-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)  # (M,)
        x = torch.where(masked, x0, x)
        conf = torch.where(masked, p, conf)
        commits.append([int(masked.sum())])
        if step == steps - 1:
            break
        k = int(num_positions * ((steps - 1 - step) / steps))
        if k == 0:
            break
        masked = torch.zeros_like(masked)
        masked[torch.topk(p, k=k, largest=False).indices] = True
        x = torch.where(masked, torch.full_like(x, mask_id), x)
        commits[-1] = [commits[-1][0] - k]  # net tokens that stay committed after this step
    return DecodeResult(x.unsqueeze(0), conf.float().unsqueeze(0), nfe, commits)
