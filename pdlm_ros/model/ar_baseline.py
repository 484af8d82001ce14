"""Autoregressive region captioners: the cost baseline, and the trained twin the diffusion model is measured against.

This is what an AR region captioner (DAM, GAR style) pays for the same job: a causal decoder with a KV cache, greedy
decoding, one region at a time, one token per forward pass. It reuses the diffusion decoder's modules by composition
(its blocks, RoPE, RMSNorm, embedding and head) so the per-token work is identical and no second copy of the weights
is needed (an 8B model fits once on a GPU). Those weights were never trained for left-to-right prediction, so the
captions are meaningless: only the cost counts here.

Sequence, per region k: [prefix: visual + prompt tokens][R RoI tokens of k][L caption tokens], causal throughout.
The prefix K/V are computed once per frame and shared by all regions (an AR captioner gets the same prefix cache the
parallel decoder gets); each region then prefills its RoI tokens and generates L tokens, always L (no early stop at
end-of-text) so that the token count matches the diffusion modes, which always decode L positions per region.

The twin (`objective: ar` in a checkpoint's config) is a PerceptionDLM of the same preset, vision tower and RoI
replay, trained left to right with `next_token_loss` on the same scenes: causal attention throughout (prefix
included), region k sees the prefix and its own block, caption slot j holds token j and predicts token j + 1 (the last
RoI token predicts token 0). `decode_twin` captions one region at a time with the KV cache and stops at EOS, as an AR
captioner does; `Captioner` runs it as mode `ar`.

Dims: P prefix tokens, R RoI tokens, L caption tokens, T new tokens in one forward, H heads, D head dim, C d_model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pdlm_ros.errors import ConfigError
from pdlm_ros.model.attention import segment_mask
from pdlm_ros.model.decoder import LLaDADecoder
from pdlm_ros.model.pdlm import pack_regions

__all__ = ["KVCache", "ARDecodeResult", "ARRegionDecoder", "next_token_loss", "teacher_forced_logits", "decode_twin"]


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


# -- the trained twin ------------------------------------------------------------------------------------------------
def next_token_loss(model, rgb, regions, targets: torch.Tensor, eos_id: int) -> torch.Tensor:  # noqa: ANN001
    """Teacher-forced CE of all regions of one frame in one packed causal forward. targets (N, L), EOS-padded;
    tokens after a caption's first EOS are not scored (decoding stops there)."""
    frame = model.encode_frame(rgb)
    logits = teacher_forced_logits(model, frame, model.roi_tokens(frame, regions), targets)  # (N, L, V)
    scored = (targets == eos_id).long().cumsum(1) - (targets == eos_id).long() == 0  # up to the first EOS
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # (N, L)
    return (ce * scored).sum() / scored.sum()


def teacher_forced_logits(model, frame, roi: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """roi (N, R, C), targets (N, L) -> (N, L, V): logits of token j given the prefix, the RoI tokens and tokens < j,
    every region in one packed forward (region k sees the prefix and its own block, causally)."""
    n, r = roi.shape[:2]
    blocks = torch.cat([roi, model.span_embeddings(targets[:, :-1], roi)], dim=1)  # (N, R+L-1, C)
    p, b = frame.prefix.shape[0], blocks.shape[1]
    x, positions, segments = pack_regions(frame.prefix, blocks)
    causal = torch.ones(x.shape[0], x.shape[0], dtype=torch.bool, device=x.device).tril()  # the prefix comes first
    h = model.decoder.forward_dense(x, positions, segment_mask(segments) & causal)
    return model.decoder.logits(h[p:].view(n, b, -1)[:, r - 1:])  # (N, L, V): last RoI token, then slots


@torch.inference_mode()
def decode_twin(model, frame, roi: torch.Tensor, caption_len: int, eos_id: int  # noqa: ANN001
                ) -> tuple[list[list[int]], list[float], int]:
    """Greedy captions of regions roi (N, R, C), one region after another against the frame's cached prefix, each
    stopping at EOS. -> (token ids per region without EOS, mean confidence per region, NFE)."""
    dec = ARRegionDecoder(model.decoder)
    cache = dec.prefix_cache(frame.prefix, roi.shape[1] + caption_len)
    p = cache.length
    ids_out, conf_out, nfe = [], [], 0
    for k in range(roi.shape[0]):
        cache.length = p  # the previous region must not influence this one
        h = dec.forward(roi[k], cache)  # (R, C) prefill
        ids, probs = [], []
        for slot in range(caption_len):
            prob = model.decoder.logits(h[-1:]).float().softmax(-1)[0]  # (V,)
            nfe += 1
            tok = int(prob.argmax())
            probs.append(float(prob[tok]))
            if tok == eos_id:
                break
            ids.append(tok)
            if slot + 1 < caption_len:
                h = dec.forward(model.span_embeddings(torch.tensor([[tok]], device=roi.device), roi[k:k + 1],
                                                      slot)[0], cache)
        ids_out.append(ids)
        conf_out.append(sum(probs) / len(probs))
    cache.length = p
    return ids_out, conf_out, nfe
