"""Vision: dynamic-resolution tiles -> SigLIP / SigLIP-2 encoder -> 2x2 pixel unshuffle -> 2-layer GELU connector.

Dims: V views (tiles, plus a thumbnail first when there is more than one tile), S tile side in pixels, g patches per
tile side, Cv encoder width, C decoder width.

The encoder comes from `transformers` (SiglipVisionModel for fixed-resolution checkpoints, Siglip2VisionModel for
NaFlex ones); its weights keep transformers' names under `encoder.`. The tile features are also stitched into one
(rows*g, cols*g, Cv) map that RoI replay samples from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from pdlm_ros.model.config import VisionConfig

__all__ = ["select_grid", "make_views", "Views", "VisionTower", "pixel_unshuffle", "Connector"]


def select_grid(width: int, height: int, max_tiles: int) -> tuple[int, int]:
    """(rows, cols) whose aspect ratio is closest to the image's, in log space; ties go to fewer tiles.

    An image much smaller than one tile gets one tile: more tiles would only upsample it further.
    """
    target = math.log(width / height)
    best: tuple[float, int, int, int] | None = None
    for rows in range(1, max_tiles + 1):
        for cols in range(1, max_tiles // rows + 1):
            err = abs(math.log(cols / rows) - target)
            key = (round(err, 6), rows * cols, rows, cols)
            if best is None or key < best:
                best = key
    assert best is not None
    return best[2], best[3]


@dataclass
class Views:
    pixels: torch.Tensor  # (V, 3, S, S) normalised
    rows: int
    cols: int

    @property
    def has_thumbnail(self) -> bool:
        return self.rows * self.cols > 1


def make_views(rgb: np.ndarray, cfg: VisionConfig) -> Views:
    """Resize the image onto a rows x cols grid of S x S tiles (plus a thumbnail when there are several tiles).

    Memory is bounded by max_tiles * S^2 whatever the input size: PIL resizes straight from the source.
    """
    h, w = rgb.shape[:2]
    s = cfg.image_size
    rows, cols = select_grid(w, h, cfg.max_tiles)
    img = Image.fromarray(rgb)
    canvas = np.asarray(img.resize((cols * s, rows * s), Image.BICUBIC))
    tiles = [canvas[r * s:(r + 1) * s, c * s:(c + 1) * s] for r in range(rows) for c in range(cols)]
    if rows * cols > 1:
        tiles.insert(0, np.asarray(img.resize((s, s), Image.BICUBIC)))
    x = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float().div_(255.0)  # (V, 3, S, S)
    mean = torch.tensor(cfg.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.image_std).view(1, 3, 1, 1)
    return Views((x - mean) / std, rows, cols)


def pixel_unshuffle(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(V, g, g, Cv) -> (V, ceil(g/f)^2, f*f*Cv). Odd grids (27x27) are padded by repeating the last row/column."""
    v, gh, gw, c = x.shape
    ph, pw = (-gh) % factor, (-gw) % factor
    if ph or pw:
        x = F.pad(x.permute(0, 3, 1, 2), (0, pw, 0, ph), mode="replicate").permute(0, 2, 3, 1)
        gh, gw = gh + ph, gw + pw
    x = x.reshape(v, gh // factor, factor, gw // factor, factor, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(v, (gh // factor) * (gw // factor), factor * factor * c)


class Connector(nn.Module):
    """2-layer GELU MLP from unshuffled vision features to the decoder width (LLaVA's mlp2x_gelu)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        common = dict(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                      num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                      patch_size=cfg.patch_size, layer_norm_eps=cfg.layer_norm_eps, vision_use_head=False)
        if cfg.kind == "siglip":
            from transformers import SiglipVisionConfig, SiglipVisionModel

            hf_cfg = SiglipVisionConfig(image_size=cfg.image_size, **common)
            hf_cfg._attn_implementation = "sdpa"
            self.encoder = SiglipVisionModel(hf_cfg)
        else:
            from transformers import Siglip2VisionConfig, Siglip2VisionModel

            hf_cfg = Siglip2VisionConfig(num_patches=cfg.num_patches, **common)
            hf_cfg._attn_implementation = "sdpa"
            self.encoder = Siglip2VisionModel(hf_cfg)

    def forward(self, pixels: torch.Tensor, patch_bias: torch.Tensor | None = None) -> torch.Tensor:
        """pixels (V, 3, S, S) -> features (V, g, g, Cv) from hidden_states[feature_layer].

        patch_bias (V, g*g, Cv), optional: added to the patch embeddings before the position embeddings (the
        official layout's mask-id embeddings). Fixed-resolution SigLIP only.
        """
        v, _, s, _ = pixels.shape
        p = self.cfg.patch_size
        g = s // p
        if self.cfg.kind == "siglip":
            feats = self._siglip_features(pixels, patch_bias)
        else:
            if patch_bias is not None:
                raise ValueError("patch_bias needs the fixed-resolution SigLIP encoder (vision.kind 'siglip')")
            # NaFlex input: patches flattened as (p_row, p_col, channel), all real (no padding slots). Pixels past
            # the last whole patch are dropped, as the fixed-resolution patch conv does.
            pixels = pixels[:, :, : g * p, : g * p]
            patches = pixels.reshape(v, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(v, g * g, p * p * 3)
            mask = torch.ones(v, g * g, dtype=torch.long, device=pixels.device)
            shapes = torch.tensor([[g, g]] * v, dtype=torch.long, device=pixels.device)
            out = self.encoder(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes,
                               output_hidden_states=True)
            feats = out.hidden_states[self.cfg.feature_layer]  # (V, g*g, Cv)
        return feats.reshape(v, g, g, -1)

    def _siglip_features(self, pixels: torch.Tensor, patch_bias: torch.Tensor | None) -> torch.Tensor:
        """The encoder run by hand up to the layer the features come from: a bias can enter between the patch and
        the position embeddings, and the layers after `feature_layer` (one, for -2) are not computed."""
        vm = getattr(self.encoder, "vision_model", self.encoder)  # transformers 5 dropped that level
        emb = vm.embeddings
        x = emb.patch_embedding(pixels.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        if patch_bias is not None:
            x = x + patch_bias.to(x.dtype)
        x = x + emb.position_embedding(emb.position_ids)  # (V, g*g, Cv) = hidden_states[0]
        layers = vm.encoder.layers
        k = self.cfg.feature_layer
        stop = k % (len(layers) + 1)  # index into [embeddings, layer 1, ..., layer n]
        for layer in layers[:stop]:
            out = layer(x, None)
            x = out[0] if isinstance(out, tuple) else out  # transformers < 4.54 returns a tuple
        if self.cfg.feature_post_norm:
            x = vm.post_layernorm(x)
        return x


def stitch_tiles(feats: torch.Tensor, views: Views) -> torch.Tensor:
    """(V, g, g, Cv) -> (rows*g, cols*g, Cv): the tile features as one map (the thumbnail is left out)."""
    tiles = feats[1:] if views.has_thumbnail else feats
    _, g, _, c = tiles.shape
    grid = tiles.reshape(views.rows, views.cols, g, g, c).permute(0, 2, 1, 3, 4)
    return grid.reshape(views.rows * g, views.cols * g, c)
