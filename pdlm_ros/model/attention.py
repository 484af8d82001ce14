"""Region attention: every region's tokens see the shared prefix and their own block, nothing else.

Dims: N regions, S tokens per region block (R RoI + L caption), P prefix tokens, H heads, D head dim.

Two formulations of the same rule, and a dense reference:
- `shared_prefix` (default): queries of all regions read the prefix K/V once, as one (H, N*S, D) x (H, D, P)
  product, and their own block as a batched (N, H, S, S) product; both score sets share one softmax. No copy of the
  prefix is made per region.
- `sdpa`: the prefix K/V broadcast to every region and concatenated with its block, then one SDPA call per batch.
- `dense_reference`: one packed sequence [prefix, region 1, ..., region N] with a (T, T) boolean mask built from
  segment ids. Slow and memory-hungry; the ground truth for tests.
A Triton kernel with the same signature lives in `pdlm_ros.runtime.triton_attention` and is registered on CUDA.

Attention scores and their softmax are computed in fp32 on every path, whatever the model's dtype: bf16 scores over
a ~2,000-token prefix lose the small differences that decide which tokens a query reads.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["region_attention", "segment_mask", "dense_attention", "full_attention", "ATTENTION_IMPLS",
           "register_attention"]

# fn(q (N,H,S,D), k (N,H,S,D), v (N,H,S,D), prefix_k (H,P,D), prefix_v (H,P,D)) -> (N,H,S,D)
RegionAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _shared_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    n, h, s, d = q.shape
    scale = d ** -0.5
    qf, kf, pkf = q.float(), k.float(), pk.float()  # no-ops in fp32; scores in fp32 otherwise
    qh = qf.transpose(0, 1).reshape(h, n * s, d)  # (H, N*S, D): every region's queries against one prefix
    scores_p = torch.matmul(qh, pkf.transpose(-1, -2)).mul_(scale)  # (H, N*S, P)
    scores_p = scores_p.reshape(h, n, s, -1).transpose(0, 1)  # (N, H, S, P)
    scores_o = torch.matmul(qf, kf.transpose(-1, -2)).mul_(scale)  # (N, H, S, S)
    probs = torch.softmax(torch.cat([scores_p, scores_o], dim=-1), dim=-1).to(q.dtype)
    p_len = pk.shape[1]
    probs_p = probs[..., :p_len].transpose(0, 1).reshape(h, n * s, p_len)  # (H, N*S, P)
    out_p = torch.matmul(probs_p, pv).reshape(h, n, s, d).transpose(0, 1)  # (N, H, S, D)
    return out_p + torch.matmul(probs[..., p_len:], v)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor) -> torch.Tensor:
    n = q.shape[0]
    keys = torch.cat([pk.unsqueeze(0).expand(n, -1, -1, -1), k], dim=2)  # (N, H, P+S, D)
    values = torch.cat([pv.unsqueeze(0).expand(n, -1, -1, -1), v], dim=2)
    return full_attention(q, keys, values)


ATTENTION_IMPLS: dict[str, RegionAttentionFn] = {"shared_prefix": _shared_prefix, "sdpa": _sdpa}


def register_attention(name: str, fn: RegionAttentionFn) -> None:
    """Add a region-attention implementation (e.g. the Triton kernel) under `name`."""
    ATTENTION_IMPLS[name] = fn


def region_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                     prefix_v: torch.Tensor, impl: str = "shared_prefix") -> torch.Tensor:
    """Attention of N region blocks over the shared prefix plus their own block. Shapes in the module docstring."""
    try:
        fn = ATTENTION_IMPLS[impl]
    except KeyError:
        raise ValueError(f"unknown attention implementation {impl!r}; known: {', '.join(ATTENTION_IMPLS)}") from None
    return fn(q, k, v, prefix_k, prefix_v)


def segment_mask(segment_ids: torch.Tensor, structured: bool = True) -> torch.Tensor:
    """(T, T) boolean mask, True = may attend. Segment 0 is the prefix; segment k > 0 is region k.

    Structured: a prefix token sees the prefix only; a region-k token sees the prefix and region k.
    Unstructured (the ablation): everyone sees everyone.
    """
    t = segment_ids.shape[0]
    if not structured:
        return torch.ones(t, t, dtype=torch.bool, device=segment_ids.device)
    q = segment_ids[:, None]
    kv = segment_ids[None, :]
    return (kv == 0) | (q == kv)


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA with fp32 scores and softmax: q (..., Tq, D), k/v (..., Tk, D), mask (Tq, Tk) bool or None."""
    if q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference attention over one packed sequence. q/k/v (H, T, D), mask (T, T) bool."""
    return full_attention(q, k, v, mask)
