"""Autoregressive region captioner of the same width and depth: the cost baseline for the parallel decoder.

This is what an AR region captioner (DAM, GAR style) pays for the same job: a causal decoder with a KV cache, greedy
decoding, one region at a time, one token per forward pass. It reuses the diffusion decoder's modules by composition
(its blocks, RoPE, RMSNorm, embedding and head) so the per-token work is identical and no second copy of the weights
is needed (an 8B model fits once on a GPU). Those weights were never trained for left-to-right prediction, so the
captions are meaningless: only the cost counts here.

Sequence, per region k: [prefix: visual + prompt tokens][R RoI tokens of k][L caption tokens], causal throughout.
The prefix K/V are computed once per frame and shared by all regions (an AR captioner gets the same prefix cache the
parallel decoder gets); each region then prefills its RoI tokens and generates L tokens, always L (no early stop at
end-of-text) so that the token count matches the diffusion modes, which always decode L positions per region.

Dims: P prefix tokens, R RoI tokens, L caption tokens, T new tokens in one forward, H heads, D head dim, C d_model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdlm_ros.errors import ConfigError
from pdlm_ros.model.decoder import LLaDADecoder

__all__ = ["KVCache", "ARDecodeResult", "ARRegionDecoder"]


@dataclass
class KVCache:
    """Preallocated per-layer keys/values (H, capacity, D) and the number of valid positions.

    Preallocated (written in place) rather than grown with `torch.cat`, so a decode step allocates nothing and the
    same code path is fast on a GPU.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[1]


@dataclass(frozen=True)
class ARDecodeResult:
    tokens: torch.Tensor  # (N, L) generated ids, one row per region
    nfe: int  # decoder forward passes over region tokens (RoI prefill + one per further caption token)

    @property
    def tokens_generated(self) -> int:
        return int(self.tokens.numel())

    @property
    def tpf(self) -> float:
        return self.tokens_generated / self.nfe if self.nfe else 0.0


class ARRegionDecoder:
    """Greedy causal decoding with a KV cache over a `LLaDADecoder`'s weights. Holds no state between calls."""

    def __init__(self, decoder: LLaDADecoder) -> None:
        self.decoder = decoder

    def new_cache(self, capacity: int) -> KVCache:
        cfg = self.decoder.cfg
        w = self.decoder.wte.weight
        shape = (cfg.n_heads, capacity, cfg.head_dim)
        keys = [torch.empty(shape, dtype=w.dtype, device=w.device) for _ in range(cfg.n_layers)]
        values = [torch.empty(shape, dtype=w.dtype, device=w.device) for _ in range(cfg.n_layers)]
        return KVCache(keys, values)

    def forward(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """x (T, C) new tokens at positions cache.length.. -> hidden (T, C); their K/V are appended to the cache.

        New tokens see every cached position and, causally, each other.
        """
        t, start = x.shape[0], cache.length
        end = start + t
        if end > cache.capacity:
            raise ConfigError(f"KV cache of {cache.capacity} positions cannot take {t} more after {start}")
        pos = torch.arange(start, end, device=x.device)
        cos, sin = self.decoder.rope.cos_sin(pos)
        # A single new token sees everything cached: no mask needed (the common decode step).
        mask = None if t == 1 else torch.arange(end, device=x.device)[None, :] <= pos[:, None]  # (T, end)
        h = x.unsqueeze(0)
        for block, kc, vc in zip(self.decoder.blocks, cache.keys, cache.values):
            q, k, v = block.qkv(h, cos, sin)  # (1, H, T, D)
            kc[:, start:end] = k[0]
            vc[:, start:end] = v[0]
            attn = F.scaled_dot_product_attention(q, kc[None, :, :end], vc[None, :, :end], attn_mask=mask)
            h = block.finish(h, attn)
        cache.length = end
        return h[0]

    def next_token(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """Greedy choice from the last position's hidden state (C,) -> () token id."""
        return self.decoder.logits(hidden_last.unsqueeze(0))[0].argmax(-1)

    def prefix_cache(self, prefix: torch.Tensor, region_len: int) -> KVCache:
        """Run the prefix (P, C) once; the cache has room for one region block of `region_len` tokens after it."""
        cache = self.new_cache(prefix.shape[0] + region_len)
        self.forward(prefix, cache)
        return cache

    def decode_regions(self, cache: KVCache, roi: torch.Tensor, caption_len: int) -> ARDecodeResult:
        """roi (N, R, C) -> (N, L) greedy tokens, one region after another, each against the cached prefix only."""
        if caption_len < 1:
            raise ConfigError(f"caption_len must be >= 1 (got {caption_len})")
        n, r = roi.shape[:2]
        p = cache.length
        if p + r + caption_len - 1 > cache.capacity:
            raise ConfigError(f"KV cache of {cache.capacity} positions is too small for a prefix of {p}, {r} RoI and "
                              f"{caption_len} caption tokens")
        out = torch.empty(n, caption_len, dtype=torch.long, device=roi.device)
        nfe = 0
        for k in range(n):
            cache.length = p  # drop the previous region: it must not influence this one
            h = self.forward(roi[k], cache)  # (R, C) prefill
            nfe += 1
            tok = self.next_token(h[-1])
            out[k, 0] = tok
            for i in range(1, caption_len):
                h = self.forward(self.decoder.wte(tok.view(1)), cache)  # (1, C)
                nfe += 1
                tok = self.next_token(h[-1])
                out[k, i] = tok
        cache.length = p
        return ARDecodeResult(out, nfe)

    @torch.inference_mode()
    def caption_regions(self, prefix: torch.Tensor, roi: torch.Tensor, caption_len: int) -> ARDecodeResult:
        """prefix (P, C) embeddings, roi (N, R, C) RoI tokens -> (N, L) greedy tokens (prefix run once)."""
        cache = self.prefix_cache(prefix, roi.shape[1] + caption_len)
        return self.decode_regions(cache, roi, caption_len)
