"""PerceptionDLM: the whole model, composed from its parts.

Sequence layout (DESIGN.md): prefix = [visual tokens of every view][shared prompt tokens] at positions 0..P-1; then per
region k a block [R RoI tokens][L caption tokens] at positions P..P+R+L-1, the same for every region.
Attention: the prefix sees the prefix; region k sees the prefix and region k. So the prefix K/V are computed once
per frame and every denoising step runs only the N x (R + L) region tokens. Regions of several frames can share a
step: their prefixes' K/V stacked, each region reading its own frame's (`region_logits(..., prefix_index=...)`).

Dims: N regions, R RoI tokens, L caption tokens, P prefix tokens, C decoder width, V vocabulary.

That is the native layout. The official layout (the released PerceptionDLM, `cfg.layout == "official"`) shares the
vision tower, connector and decoder, has a mask-id embedding in place of the region encoder, and runs by the rules in
`pdlm_ros.model.official`; the methods below that speak of a prefix cache are the native layout's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

from pdlm_ros.model.attention import segment_mask
from pdlm_ros.model.config import PDLMConfig
from pdlm_ros.model.decoder import LLaDADecoder, PrefixCache
from pdlm_ros.model.regions import PreparedRegion, RegionEncoder
from pdlm_ros.model.vision import Connector, VisionTower, make_views, pixel_unshuffle, stitch_tiles

__all__ = ["PerceptionDLM", "EncodedFrame", "pack_regions"]


def pack_regions(prefix: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """prefix (P, C), region blocks (N, B, C) -> one packed sequence (P + N*B, C), its positions (every block at
    P..P+B-1) and segment ids (0 = prefix, k = region k), for `segment_mask`."""
    p, (n, b) = prefix.shape[0], blocks.shape[:2]
    dev = prefix.device
    positions = torch.cat([torch.arange(p, device=dev), torch.arange(p, p + b, device=dev).repeat(n)])
    segments = torch.cat([torch.zeros(p, dtype=torch.long, device=dev),
                          torch.arange(1, n + 1, device=dev).repeat_interleave(b)])
    return torch.cat([prefix, blocks.flatten(0, 1)]), positions, segments


@dataclass
class EncodedFrame:
    visual_tokens: torch.Tensor  # (Pv, C) connector output of every view
    feature_map: torch.Tensor  # (Hf, Wf, Cv) stitched tile features for RoI replay
    image: torch.Tensor  # (H, W, 3) uint8, on the CPU, the source frame for pixel replay
    prefix: torch.Tensor  # (P, C) visual tokens + prompt embeddings

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


class PerceptionDLM(nn.Module):
    def __init__(self, cfg: PDLMConfig, prompt_ids: Sequence[int] = ()) -> None:
        super().__init__()
        self.cfg = cfg
        v, d = cfg.vision, cfg.decoder
        self.vision = VisionTower(v)
        self.connector = Connector(v.unshuffle ** 2 * v.hidden_size, d.d_model)
        self.decoder = LLaDADecoder(d)
        self.region: RegionEncoder | None = None
        self.span_position: nn.Parameter | None = None
        self.span_query: nn.Linear | None = None
        self.mask_id_embedding: nn.Embedding | None = None
        if cfg.official is not None:  # one learned embedding per mask slot, added inside the vision encoder
            self.mask_id_embedding = nn.Embedding(cfg.official.prompt_numbers, v.hidden_size)
        else:
            self.region = RegionEncoder(cfg.region, v.hidden_size, d.d_model)
            if cfg.region.span_position_embedding:
                self.span_position = nn.Parameter(torch.randn(cfg.decoding.caption_len, d.d_model))  # (L, C)
            self.span_query = nn.Linear(d.d_model, d.d_model) if cfg.region.span_region_query else None
        self.set_prompt(prompt_ids)

    def set_prompt(self, prompt_ids: Sequence[int], before_visual: Sequence[int] = ()) -> None:
        """Token ids of the native prefix's text: `before_visual` (a chat template's opening, BOS first) and
        `prompt_ids` after the visual tokens."""
        dev = self.decoder.wte.weight.device
        dev = torch.device("cpu") if dev.type == "meta" else dev
        self.register_buffer("prompt_ids", torch.tensor(list(prompt_ids), dtype=torch.long, device=dev),
                             persistent=False)
        self.register_buffer("prompt_prefix_ids", torch.tensor(list(before_visual), dtype=torch.long, device=dev),
                             persistent=False)

    @property
    def device(self) -> torch.device:
        return self.decoder.wte.weight.device

    def official_runner(self):  # noqa: ANN201
        """The official layout's two computations on these modules (`official.TorchRunner`)."""
        from pdlm_ros.model.official import TorchRunner

        return TorchRunner(self)

    # -- frame ------------------------------------------------------------------------------------------------------
    def encode_frame(self, rgb: np.ndarray, prompt_ids: torch.Tensor | None = None) -> EncodedFrame:
        """rgb (H, W, 3) uint8 -> visual tokens, RoI feature map and prefix embeddings. prompt_ids (Pt,) replace
        the text after the visual tokens (a per-request instruction)."""
        views = make_views(rgb, self.cfg.vision)
        dtype = self.decoder.wte.weight.dtype
        feats = self.vision(views.pixels.to(self.device, dtype))  # (V, g, g, Cv)
        visual = self.connector(pixel_unshuffle(feats, self.cfg.vision.unshuffle)).flatten(0, 1)  # (Pv, C)
        before = self.decoder.wte(self.prompt_prefix_ids)  # (Pb, C), empty without a chat template
        prompt = self.decoder.wte(self.prompt_ids if prompt_ids is None else prompt_ids.to(self.device))  # (Pt, C)
        return EncodedFrame(visual, stitch_tiles(feats, views), torch.from_numpy(rgb),
                            torch.cat([before, visual, prompt]))

    def prefix_cache(self, frame: EncodedFrame) -> PrefixCache:
        return self.decoder.forward_prefix(frame.prefix)

    def roi_tokens(self, frame: EncodedFrame, regions: Sequence[PreparedRegion]) -> torch.Tensor:
        """-> (N, R, C)."""
        return self.region(frame.feature_map, frame.image, regions)

    def span_embeddings(self, tokens: torch.Tensor, roi: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Caption tokens (N, T) at caption slots start..start+T-1 of regions with RoI tokens roi (N, R, C) ->
        (N, T, C) decoder inputs."""
        x = self.decoder.wte(tokens)
        if self.span_position is not None:
            x = x + self.span_position[start:start + tokens.shape[1]]
        if self.span_query is not None:
            x = x + self.span_query(roi.mean(dim=1)).unsqueeze(1)
        return x

    # -- one denoising forward -----------------------------------------------------------------------------------------
    def region_logits(self, roi: torch.Tensor, tokens: torch.Tensor, cache: PrefixCache,
                      attn_impl: str = "shared_prefix", prefix_index: torch.Tensor | None = None) -> torch.Tensor:
        """Fast path. roi (N, R, C), tokens (N, L) -> caption logits (N, L, V), against the cached prefix.

        Several frames in one pass: `cache` stacks their prefixes (`PrefixCache.stack`) and prefix_index (N,) names
        each region's frame; every region's logits are those it has against its own frame alone."""
        x = torch.cat([roi, self.span_embeddings(tokens, roi)], dim=1)  # (N, R+L, C)
        h = self.decoder.forward_regions(x, cache, attn_impl, prefix_index)
        return self.decoder.logits(h[:, roi.shape[1]:])

    def dense_logits(self, prefix: torch.Tensor, roi: torch.Tensor, tokens: torch.Tensor,
                     structured: bool = True) -> torch.Tensor:
        """Reference path: one packed sequence, everything recomputed. structured=False is the no-mask ablation."""
        n, r = roi.shape[:2]
        p, l_ = prefix.shape[0], tokens.shape[1]
        blocks = torch.cat([roi, self.span_embeddings(tokens, roi)], dim=1)  # (N, R+L, C)
        x, positions, segments = pack_regions(prefix, blocks)
        h = self.decoder.forward_dense(x, positions, segment_mask(segments, structured))
        h = h[p:].view(n, r + l_, -1)[:, r:]
        return self.decoder.logits(h)
