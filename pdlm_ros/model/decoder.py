"""LLaDA decoder: RMSNorm, RoPE, SwiGLU, no biases, bidirectional attention.

Parameter names follow LLaDA-8B-Instruct's checkpoint (`wte`, `blocks.N.{q_proj,k_proj,v_proj,attn_out,ff_proj,
up_proj,ff_out,attn_norm,ff_norm}`, `ln_f`, untied `ff_out` head) so loading is a prefix strip, not a rename table.

Three ways to run it, one set of weights:
- `forward_prefix`: the prefix alone (it never sees region tokens), returning per-layer K/V for the cache;
- `forward_regions`: N region blocks against a cached prefix (the fast path, exact by construction), or against
  several frames' prefixes stacked (`PrefixCache.stack`), each block reading its own frame's (`prefix_index`);
- `forward_dense`: one packed sequence with an explicit (T, T) mask (the reference, and the no-cache/no-mask modes;
  the official layout's full forward, which can also return every layer's K/V);
- `forward_partial`: Q positions of a sequence recomputed against cached K/V of all T positions (the official
  layout's isolated and cached modes).
Dims: N regions, S tokens per region block, P prefix tokens, T packed tokens, H heads, D head dim, C = d_model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from pdlm_ros.model.attention import dense_attention, full_attention, region_attention
from pdlm_ros.model.config import DecoderConfig

__all__ = ["RMSNorm", "RotaryEmbedding", "LLaDABlock", "LLaDADecoder", "PrefixCache"]


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32 as LLaDA does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE with split-halves rotate_half (LLaDA and Llama agree, so no q/k permutation on import).

    The inverse frequencies are not a buffer: `model.to(torch.bfloat16)` casts buffers, and bf16 frequencies put
    the rotation of late positions off by whole radians. They are rebuilt in fp32 at every call (D/2 numbers), and
    cos/sin and the rotation itself are computed in fp32 whatever the model's dtype (`rope_full_precision`).
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) -> cos, sin (T, D) in fp32."""
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=positions.device) / self.head_dim
        inv_freq = 1.0 / (self.theta ** exponent)  # (D/2,)
        freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (T, D)
        return emb.cos(), emb.sin()

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (..., T, D); rotation in fp32."""
        xf = x.float()
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)


@dataclass
class PrefixCache:
    """Per-layer keys/values of the prefix, after RoPE. keys[i], values[i]: (H, P, D).

    A stacked cache (several frames, `stack`) holds their prefixes one after the other along P; `offsets` are the
    F+1 starts (the last is the total), empty for one frame."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    offsets: tuple[int, ...] = ()

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]

    @property
    def lengths(self) -> tuple[int, ...]:
        """Prefix length of every frame (one value for an unstacked cache)."""
        if not self.offsets:
            return (self.length,)
        return tuple(b - a for a, b in zip(self.offsets, self.offsets[1:]))

    @staticmethod
    def stack(caches: "list[PrefixCache]") -> "PrefixCache":
        """Several frames' caches as one (copied once per pass, not per step)."""
        if not caches or any(c.offsets for c in caches):
            raise ValueError("stack takes one or more one-frame prefix caches")
        offsets = [0]
        for c in caches:
            offsets.append(offsets[-1] + c.length)
        if len(caches) == 1:
            return PrefixCache(caches[0].keys, caches[0].values, tuple(offsets))
        layers = range(len(caches[0].keys))
        return PrefixCache([torch.cat([c.keys[i] for c in caches], dim=1) for i in layers],
                           [torch.cat([c.values[i] for c in caches], dim=1) for i in layers], tuple(offsets))


class LLaDABlock(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        c, f = cfg.d_model, cfg.mlp_hidden_size
        self.n_heads = cfg.n_heads
        self.attn_norm = RMSNorm(c, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(c, c, bias=False)
        self.k_proj = nn.Linear(c, c, bias=False)
        self.v_proj = nn.Linear(c, c, bias=False)
        self.attn_out = nn.Linear(c, c, bias=False)
        self.ff_norm = RMSNorm(c, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(c, f, bias=False)  # SwiGLU gate
        self.up_proj = nn.Linear(c, f, bias=False)
        self.ff_out = nn.Linear(f, c, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x (B, T, C) -> q, k, v (B, H, T, D) with RoPE applied to q and k."""
        b, t, c = x.shape
        h = self.attn_norm(x)
        q, k, v = (proj(h).view(b, t, self.n_heads, -1).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return RotaryEmbedding.apply(q, cos, sin), RotaryEmbedding.apply(k, cos, sin), v

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residuals around attention (attn (B, H, T, D)) and the SwiGLU MLP."""
        b, _, t, _ = attn.shape
        x = x + self.attn_out(attn.transpose(1, 2).reshape(b, t, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDADecoder(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_out = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)  # untied LM head
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        # PyTorch's default inits (N(0, 1) embeddings, uniform fan-in Linear) are kept on purpose: they put word,
        # RoI and visual tokens on one scale. A GPT-2 style 0.02 init left the RoI tokens ~100x larger than the
        # caption tokens, and a model trained from scratch then learned its captions several times slower.

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.ff_out(self.ln_f(hidden))

    def forward_prefix(self, x: torch.Tensor) -> PrefixCache:
        """x (P, C) prefix embeddings at positions 0..P-1 -> per-layer K/V. The prefix sees itself only."""
        pos = torch.arange(x.shape[0], device=x.device)
        cos, sin = self.rope.cos_sin(pos)
        h = x.unsqueeze(0)
        keys, values = [], []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            q, k, v = block.qkv(h, cos, sin)  # (1, H, P, D)
            keys.append(k[0])
            values.append(v[0])
            if i < last:  # the last layer's output is never read: only its K/V are
                h = block.finish(h, full_attention(q, k, v))
        return PrefixCache(keys, values)

    def forward_regions(self, x: torch.Tensor, cache: PrefixCache, attn_impl: str = "shared_prefix",
                        prefix_index: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, S, C) region blocks; every block takes positions P..P+S-1 (order-free). -> hidden (N, S, C).

        A stacked cache needs `prefix_index` (N,): the frame of every block, whose prefix it reads and whose prefix
        length P its positions start at (so each block computes what it computes against its frame alone)."""
        if prefix_index is None and cache.offsets:
            raise ValueError("a stacked prefix cache needs prefix_index: the frame of every region")
        if prefix_index is None:
            p = cache.length
            pos = torch.arange(p, p + x.shape[1], device=x.device)
            cos, sin = self.rope.cos_sin(pos)
            offsets = None
        else:
            cos, sin, offsets = self._frame_rope(x, cache, prefix_index)
        h = x
        for block, pk, pv in zip(self.blocks, cache.keys, cache.values):
            q, k, v = block.qkv(h, cos, sin)  # (N, H, S, D)
            h = block.finish(h, region_attention(q, k, v, pk, pv, impl=attn_impl, prefix_index=prefix_index,
                                                 prefix_offsets=offsets))
        return h

    def _frame_rope(self, x: torch.Tensor, cache: PrefixCache, prefix_index: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """cos/sin (N, 1, S, D) at each block's own positions P_f..P_f+S-1, and the offsets as a tensor."""
        lengths = cache.lengths
        index = prefix_index.tolist()  # checked once per forward, not in every layer
        if prefix_index.shape != (x.shape[0],) or any(not 0 <= f < len(lengths) for f in index):
            raise ValueError(f"prefix_index must name one of the {len(lengths)} stacked frames for each of the "
                             f"{x.shape[0]} regions; got {index}")
        s = x.shape[1]
        pos = torch.cat([torch.arange(p, p + s, device=x.device) for p in lengths])  # (F*S,)
        cos, sin = self.rope.cos_sin(pos)
        cos, sin = (t.view(len(lengths), s, -1)[prefix_index.to(x.device)].unsqueeze(1) for t in (cos, sin))
        offsets = torch.tensor(cache.offsets or (0, cache.length), dtype=torch.long, device=x.device)
        return cos, sin, offsets

    def forward_dense(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                      return_kv: bool = False):  # noqa: ANN201
        """x (T, C) packed sequence, positions (T,), mask (T, T) bool -> hidden (T, C) [, keys, values: per layer
        (H, T, D)]."""
        cos, sin = self.rope.cos_sin(positions)
        h = x.unsqueeze(0)
        keys, values = [], []
        for block in self.blocks:
            q, k, v = block.qkv(h, cos, sin)  # (1, H, T, D)
            if return_kv:
                keys.append(k[0])
                values.append(v[0])
            h = block.finish(h, dense_attention(q[0], k[0], v[0], mask).unsqueeze(0))
        return (h[0], keys, values) if return_kv else h[0]

    def forward_partial(self, x: torch.Tensor, positions: torch.Tensor, index: torch.Tensor,
                        keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """Recompute Q tokens of a T-token sequence: x (Q, C) at `positions` (Q,), sitting at `index` (Q,) of the
        sequence; keys/values per layer (H, T, D) hold the other tokens' cached K/V (whatever sits at `index` is
        replaced by the fresh K/V, per layer); mask (Q, T) bool. -> hidden (Q, C)."""
        cos, sin = self.rope.cos_sin(positions)
        h = x.unsqueeze(0)
        for block, kc, vc in zip(self.blocks, keys, values):
            q, k, v = block.qkv(h, cos, sin)  # (1, H, Q, D)
            k_all = kc.index_copy(1, index, k[0].to(kc.dtype))  # (H, T, D)
            v_all = vc.index_copy(1, index, v[0].to(vc.dtype))
            h = block.finish(h, dense_attention(q[0], k_all, v_all, mask).unsqueeze(0))
        return h[0]
