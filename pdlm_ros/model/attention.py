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

Several frames in one pass (cross-frame batching): the prefixes of F frames are concatenated along P into one
(H, P1 + ... + PF, D) tensor, `prefix_offsets` (F+1,) holds where each starts (and the total), and `prefix_index`
(N,) names the frame of every region; region n reads keys prefix_offsets[i]..prefix_offsets[i+1]-1 with
i = prefix_index[n], and its own block, nothing else. An implementation registered with a `multi` function does this
in one launch (the Triton kernel); the others are run once per run of consecutive regions of one frame, on that
frame's slice of the prefix, which is exactly the one-frame computation.

Attention scores and their softmax are computed in fp32 on every path, whatever the model's dtype: bf16 scores over
a ~2,000-token prefix lose the small differences that decide which tokens a query reads.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["region_attention", "segment_mask", "dense_attention", "full_attention", "ATTENTION_IMPLS",
           "MULTI_PREFIX_IMPLS", "register_attention", "prefix_runs"]

# fn(q (N,H,S,D), k (N,H,S,D), v (N,H,S,D), prefix_k (H,P,D), prefix_v (H,P,D)) -> (N,H,S,D)
RegionAttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# fn(q, k, v, prefix_k (H,P1+..+PF,D), prefix_v, prefix_index (N,) long, prefix_offsets (F+1,) long) -> (N,H,S,D)
MultiPrefixFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                          torch.Tensor], torch.Tensor]


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
MULTI_PREFIX_IMPLS: dict[str, MultiPrefixFn] = {}  # implementations that take several prefixes in one launch


def register_attention(name: str, fn: RegionAttentionFn, multi: MultiPrefixFn | None = None) -> None:
    """Add a region-attention implementation (e.g. the Triton kernel) under `name`; `multi`, when given, is its
    several-prefix form (otherwise several prefixes are served one frame's run of regions at a time)."""
    ATTENTION_IMPLS[name] = fn
    if multi is not None:
        MULTI_PREFIX_IMPLS[name] = multi


def prefix_runs(prefix_index: torch.Tensor, prefix_offsets: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """Runs of consecutive regions of one frame: (first region, end region, prefix start, prefix end) each.
    Checks the values (a bad index would read another frame's keys or none)."""
    index, offsets = prefix_index.tolist(), prefix_offsets.tolist()
    frames = len(offsets) - 1
    if frames < 1 or offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"prefix_offsets must rise from 0 to the stacked prefix length; got {offsets}")
    if any(not 0 <= f < frames for f in index):
        raise ValueError(f"prefix_index names frames {index}, but there are {frames} prefixes")
    runs, first = [], 0
    for n in range(1, len(index) + 1):
        if n == len(index) or index[n] != index[first]:
            f = index[first]
            runs.append((first, n, offsets[f], offsets[f + 1]))
            first = n
    return runs


def _by_prefix(fn: RegionAttentionFn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor,
               pv: torch.Tensor, prefix_index: torch.Tensor, prefix_offsets: torch.Tensor) -> torch.Tensor:
    """Several prefixes through a one-prefix implementation: one call per run of regions of one frame."""
    outs = [fn(q[a:b], k[a:b], v[a:b], pk[:, s:e], pv[:, s:e])
            for a, b, s, e in prefix_runs(prefix_index, prefix_offsets)]
    if not outs:
        return torch.empty_like(q)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _check_prefix_shapes(n: int, p: int, prefix_index: torch.Tensor, prefix_offsets: torch.Tensor) -> None:
    """Shapes only: the values are checked once per pass by the caller (reading them here would wait on the GPU in
    every layer)."""
    if prefix_index.shape != (n,):
        raise ValueError(f"prefix_index must hold one frame index per region ({n}); got shape "
                         f"{tuple(prefix_index.shape)}")
    if prefix_offsets.dim() != 1 or prefix_offsets.shape[0] < 2:
        raise ValueError(f"prefix_offsets must be (frames + 1,), from 0 to the stacked prefix length {p}; got shape "
                         f"{tuple(prefix_offsets.shape)}")


def region_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor,
                     prefix_v: torch.Tensor, impl: str = "shared_prefix", prefix_index: torch.Tensor | None = None,
                     prefix_offsets: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of N region blocks over the shared prefix plus their own block. Shapes in the module docstring.

    With `prefix_index` (N,) and `prefix_offsets` (F+1,): prefix_k/prefix_v stack F frames' prefixes and each region
    reads its own frame's only."""
    try:
        fn = ATTENTION_IMPLS[impl]
    except KeyError:
        raise ValueError(f"unknown attention implementation {impl!r}; known: {', '.join(ATTENTION_IMPLS)}") from None
    if prefix_index is None and prefix_offsets is None:
        return fn(q, k, v, prefix_k, prefix_v)
    if prefix_index is None or prefix_offsets is None:
        raise ValueError("prefix_index and prefix_offsets go together (several frames' prefixes in one pass)")
    _check_prefix_shapes(q.shape[0], prefix_k.shape[1], prefix_index, prefix_offsets)
    multi = MULTI_PREFIX_IMPLS.get(impl)
    if multi is not None:
        return multi(q, k, v, prefix_k, prefix_v, prefix_index, prefix_offsets)
    return _by_prefix(fn, q, k, v, prefix_k, prefix_v, prefix_index, prefix_offsets)


def segment_mask(segment_ids: torch.Tensor, structured: bool = True,
                 frame_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(T, T) boolean mask, True = may attend. Segment 0 is the prefix; segment k > 0 is region k.

    Structured: a prefix token sees the prefix only; a region-k token sees the prefix and region k.
    Unstructured (the ablation): everyone sees everyone.
    frame_ids (T,), several frames packed into one sequence: every token also sees only tokens of its own frame (so
    a region reads its own frame's prefix); region segment ids are then unique over all frames.
    """
    t = segment_ids.shape[0]
    if not structured:
        return torch.ones(t, t, dtype=torch.bool, device=segment_ids.device)
    q = segment_ids[:, None]
    kv = segment_ids[None, :]
    mask = (kv == 0) | (q == kv)
    if frame_ids is not None:
        mask &= frame_ids[:, None] == frame_ids[None, :]
    return mask


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA with fp32 scores and softmax: q (..., Tq, D), k/v (..., Tk, D), mask (Tq, Tk) bool or None."""
    if q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reference attention over one packed sequence. q/k/v (H, T, D), mask (T, T) bool."""
    return full_attention(q, k, v, mask)
