"""Regions: validation of box/mask inputs, RoI-aligned feature replay and the region prompt.

Dims: N regions, G RoI samples per side, m samples merged per token side, R = (G/m)^2 RoI tokens, Cv vision width,
C decoder width.

Each region's box gives a G x G grid of bilinear sample points (cell centres, the box enlarged by `roi_context`).
At every point we sample the stitched tile features, the RGB pixels of the full-resolution image and the region mask
(1 inside, 0 outside; a box-only region is its box), so the replay keeps fine detail that a 2x2-unshuffled feature map
loses. m x m neighbouring samples are concatenated into one token and projected to the decoder width; a geometry
embedding (box corners and log pixel sizes) and a learned prompt embedding per RoI-token index are added.

The prompt embedding is indexed by the token's place inside its region, not by the region's place in the request:
a per-request-slot embedding would make a region's caption depend on which slot it landed in, breaking the order
independence that the structured mask guarantees (DESIGN.md, consequence 1).

RoI sampling is hand-written (no torchvision here): `grid_sample` for the feature map, a 4-neighbour gather for the
image and masks so that a large frame is never converted to a float tensor.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pdlm_ros.model.config import RegionConfig
from pdlm_ros.region_rules import (DEFAULT_REGION_BUDGET, MIN_REGION_SIDE, PreparedRegion, apply_region_budget,
                                   budget_refusal, mask_box, prepare_regions, select_within_budget)

__all__ = ["PreparedRegion", "mask_box", "prepare_regions", "RegionEncoder", "roi_points", "MIN_REGION_SIDE",
           "DEFAULT_REGION_BUDGET", "select_within_budget", "apply_region_budget", "budget_refusal"]

# The input rules (validation, minimum size, per-frame budget) live in the torch-free `pdlm_ros.region_rules`, which
# the node also uses before any model runs; they are re-exported here where the model's code has always found them.

def roi_points(box: tuple[float, float, float, float], grid: int, context: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample-point coordinates (G,) along x and y, in pixels (pixel centres at i + 0.5)."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    x1, x2 = x1 - context * bw, x2 + context * bw
    y1, y2 = y1 - context * bh, y2 + context * bh
    t = (torch.arange(grid, dtype=torch.float32) + 0.5) / grid
    return x1 + t * (x2 - x1), y1 + t * (y2 - y1)


def _gather_bilinear(src: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """src (H, W, Ch) any dtype; xs (G,), ys (G,) pixel coords -> (G, G, Ch) float32, zero outside the image."""
    h, w = src.shape[:2]
    fx, fy = xs - 0.5, ys - 0.5
    x0, y0 = fx.floor().long(), fy.floor().long()
    ax, ay = (fx - x0).view(1, -1, 1), (fy - y0).view(-1, 1, 1)
    out = torch.zeros(ys.numel(), xs.numel(), src.shape[2])
    for dy, wy in ((0, 1 - ay), (1, ay)):
        for dx, wx in ((0, 1 - ax), (1, ax)):
            xi, yi = x0 + dx, y0 + dy
            okx, oky = (xi >= 0) & (xi < w), (yi >= 0) & (yi < h)
            vals = src[yi.clamp(0, h - 1)][:, xi.clamp(0, w - 1)].float()  # (G, G, Ch)
            out += vals * (oky.view(-1, 1, 1) & okx.view(1, -1, 1)) * wy * wx
    return out


class RegionEncoder(nn.Module):
    def __init__(self, cfg: RegionConfig, vision_dim: int, d_model: int) -> None:
        super().__init__()
        self.cfg = cfg
        m = cfg.roi_merge
        channels = vision_dim + 1 + (3 if cfg.roi_pixels else 0)
        self.roi_proj_1 = nn.Linear(m * m * channels, d_model)
        self.roi_proj_2 = nn.Linear(d_model, d_model)
        self.geometry = nn.Linear(7, d_model)
        self.prompt = nn.Parameter(torch.randn(cfg.tokens, d_model) * 0.02)  # (R, C), shared by all regions
        self.stem: nn.Sequential | None = None
        if cfg.roi_stem_channels:
            c = cfg.roi_stem_channels
            layers: list[nn.Module] = [nn.Conv2d(channels, c, 3, padding=1), nn.GELU()]
            for _ in range(cfg.roi_merge.bit_length() - 1):  # stride 2 until the grid is the token grid
                layers += [nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GELU()]
            self.stem = nn.Sequential(*layers)
            self.stem_proj = nn.Linear(c, d_model)
        self.vision_dim = vision_dim
        self.shape: nn.Sequential | None = None
        if cfg.roi_shape_hidden:  # the whole outline at once: mask (and pixel) samples of the G x G grid
            cues = (channels - vision_dim) * cfg.roi_grid ** 2
            self.shape = nn.Sequential(nn.Linear(cues, cfg.roi_shape_hidden), nn.GELU(),
                                       nn.Linear(cfg.roi_shape_hidden, d_model))

    def sample(self, feature_map: torch.Tensor, image: torch.Tensor, regions: Sequence[PreparedRegion]) -> torch.Tensor:
        """feature_map (Hf, Wf, Cv), image (H, W, 3) uint8 -> samples (N, G, G, Cv + 1 [+ 3])."""
        g, ctx = self.cfg.roi_grid, self.cfg.roi_context
        h, w = image.shape[:2]
        fmap = feature_map.permute(2, 0, 1).unsqueeze(0)  # (1, Cv, Hf, Wf)
        grids, extras = [], []
        for reg in regions:
            xs, ys = roi_points(reg.box, g, ctx)
            gx = (xs / w * 2 - 1).view(1, g).expand(g, g)
            gy = (ys / h * 2 - 1).view(g, 1).expand(g, g)
            grids.append(torch.stack([gx, gy], dim=-1))
            if reg.mask is not None:
                mask = _gather_bilinear(torch.from_numpy(reg.mask).unsqueeze(-1), xs, ys)  # (G, G, 1)
            else:
                x1, y1, x2, y2 = reg.box
                inside = ((ys >= y1) & (ys < y2)).view(g, 1) & ((xs >= x1) & (xs < x2)).view(1, g)
                mask = inside.float().unsqueeze(-1)
            parts = [mask * 2 - 1]
            if self.cfg.roi_pixels:
                parts.append(_gather_bilinear(image, xs, ys) / 127.5 - 1)
            extras.append(torch.cat(parts, dim=-1))
        grid = torch.stack(grids).to(fmap)  # (N, G, G, 2)
        feats = F.grid_sample(fmap.expand(len(regions), -1, -1, -1), grid, mode="bilinear",
                              padding_mode="zeros", align_corners=False)  # (N, Cv, G, G)
        extra = torch.stack(extras).to(feats)
        return torch.cat([feats.permute(0, 2, 3, 1), extra], dim=-1)

    def _side_code(self, side: float) -> float:
        base = self.cfg.size_log_base_px
        return math.log2(max(side, 1.0) / base) if base else math.log(max(side, 1.0)) / 5.0

    def geometry_features(self, regions: Sequence[PreparedRegion], width: int, height: int) -> torch.Tensor:
        rows = []
        for reg in regions:
            x1, y1, x2, y2 = reg.box
            bw, bh = x2 - x1, y2 - y1
            fill = 1.0
            if reg.mask is not None:  # share of the box covered by the mask (crop first: frames can be large)
                fill = float(reg.mask[int(y1):int(y2), int(x1):int(x2)].sum()) / (bw * bh)
            rows.append([x1 / width, y1 / height, x2 / width, y2 / height,
                         self._side_code(bw), self._side_code(bh), fill])
        return torch.tensor(rows, dtype=torch.float32)

    def project(self, samples: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        """samples (N, G, G, Ch), geometry (N, 7) -> RoI tokens (N, R, C) with geometry and region prompt fused in.

        The learned part of the replay; the exported regions graph is exactly this method.
        """
        n, g, _, ch = samples.shape
        m = self.cfg.roi_merge
        s = samples.reshape(n, g // m, m, g // m, m, ch).permute(0, 1, 3, 2, 4, 5).reshape(n, (g // m) ** 2, m * m * ch)
        tokens = self.roi_proj_2(F.gelu(self.roi_proj_1(s)))  # (N, R, C)
        if self.stem is not None:
            conv = self.stem(samples.permute(0, 3, 1, 2))  # (N, c, G/m, G/m)
            tokens = tokens + self.stem_proj(conv.flatten(2).transpose(1, 2))  # row-major, like the merged tokens
        if self.shape is not None:
            outline = self.shape(samples[..., self.vision_dim:].flatten(1))  # (N, G*G*(1 [+ 3])) -> (N, C)
            tokens = tokens + outline.unsqueeze(1)
        return tokens + self.geometry(geometry.to(tokens)).unsqueeze(1) + self.prompt.unsqueeze(0)

    def forward(self, feature_map: torch.Tensor, image: torch.Tensor, regions: Sequence[PreparedRegion]) -> torch.Tensor:
        """-> RoI tokens (N, R, C)."""
        geometry = self.geometry_features(regions, image.shape[1], image.shape[0])
        return self.project(self.sample(feature_map, image, regions), geometry)
