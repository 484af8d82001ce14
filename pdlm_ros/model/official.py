"""The official layout: the released PerceptionDLM's rules, reproduced exactly.

The released weights (MSALab/PerceptionDLM; code MSALab-PKU/PerceptionDLM@e1215de) were trained under rules of their
own, and they only describe regions well under those rules. Every rule below was read from that code and is held by
parity fixtures recorded by running it (scripts/make_official_fixtures.py, test/model/test_official.py).

Dims: V views, g patches per tile side, Cv vision width, C decoder width, N masks in the pass, T sequence length,
L caption tokens per mask, M = N * L caption positions.

- Views (InternVL `dynamic_preprocess`): the (cols, rows) grid of 1..max_tiles tiles whose aspect ratio is closest to
  the frame's; on a tie a later (larger) grid wins when the frame's area exceeds half of that grid's pixel area. The
  frame is resized (bicubic) onto the grid and cut row-major; a thumbnail (bicubic) is appended LAST when there is
  more than one tile.
- Masks are sorted by area, largest first; equal areas put the later mask first (numpy's argsort, reversed). Mask i
  (in that order) is the i-th prompt: its id embedding, its `<|reserved_token_i|>` and its `<|Mask_Cap_i|>` block.
- Mask prompts enter the vision encoder: per mask, an image that is 255 outside the mask and i inside is tiled like
  the frame (bicubic, so a mask grows by about a pixel where the filter rings), and a patch is active when its
  top-left pixel is not 255; every active patch gets `mask_id_embedding[i]` added to its patch embedding, before the
  position embedding. Overlapping masks add up.
- Features come from hidden_states[-2], are 2x2 pixel-shuffled (InternVL's order, which equals
  `vision.pixel_unshuffle`'s for even grids) and projected by the abstractor (Linear, GELU, Linear).
- Prompt text: a system turn, a user turn `<img>` + `<IMG_CONTEXT>` x (tokens per view x V) + `</img>`, the
  `<|reserved_token_i|>` joined by newlines, a newline and the question, then the assistant turn of
  `<|Mask_Cap_i|>` + `<|mdm_mask|>` x L blocks joined by newlines, and a final `<|eot_id|>`. Tokenized with the
  checkpoint's tokenizer, post-processor included (no BOS is written by the code itself).
- RoI replay: each `<|reserved_token_i|>` is replaced by a 4x4 RoI-align (aligned, sampling ratio 2) of the
  abstractor outputs stitched into one map. Two quirks of the official code are reproduced, not fixed:
  * the map is built from views[1:] whenever there is more than one view, so the FIRST TILE is dropped (not the
    thumbnail, which comes last) and the thumbnail fills the last grid slot;
  * the box (mask min/max pixel over width/height, the max pixel inclusive) is scaled to feature units and then
    scaled again by RoI-align's spatial_scale (1/32 in the generation path; training used 1/28), so RoI tokens sample
    a small area near the top-left corner of the map.
- Positions are plain 0..T-1.
- Attention (`attention_rule`): only caption-block queries are restricted, to their own block (from its
  `<|Mask_Cap_i|>` up to the next block's, so the newline between blocks belongs to the earlier one, and the final
  `<|eot_id|>` to the last), the fixed prompt before the first RoI span, the text between the last RoI span and the
  first block, and their own RoI span. The newlines between RoI spans are hidden from captions. Image, prompt and RoI
  queries see everything, captions of every region included: there is no exact prefix cache, and regions influence
  each other.
- Sampler: `sampler.global_remask_decode`.

Faster modes for these weights (approximations of the official semantics, measured in the README):
- `isolated`: this package's structured rule on the official sequence (`isolated_rule`): the prefix (everything but
  the RoI spans and caption blocks) sees only itself, so its K/V are computed once per pass, exactly; each step
  recomputes only the region tokens. Regions still meet through the mask-id embeddings in the visual tokens.
- `cached`: the official rule, with every token but the caption blocks taken from the K/V of a full forward that is
  refreshed every `refresh` steps (Fast-dLLM's approximate cache); refresh 1 is the official mode exactly.
Any mode decodes with the official global re-masking (`global`), LLaDA's per-span schedule (`span`, committed tokens
never re-masked) or confidence-threshold commits (`threshold`).

Where this package needs a rule the official code does not state, it says so: a box-only region becomes its box
as a mask; more masks than prompt_numbers go in further passes of at most prompt_numbers (request order), each
sorted by area as above; a caption ends at its first `<|eot_id|>` or `<|endoftext|>` (the official ParaDLC script
cuts the whole assistant text at the first `<|eot_id|>`, which empties every later caption once one caption ends
early; that is a parsing step, not a model rule, and is not copied).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer

from pdlm_ros.errors import CheckpointError
from pdlm_ros.model.attention import segment_mask
from pdlm_ros.model.config import OfficialConfig, PDLMConfig
from pdlm_ros.model.regions import mask_box
from pdlm_ros.model.vision import pixel_unshuffle
from pdlm_ros.types import OFFICIAL_SAMPLERS

__all__ = ["tile_grid", "make_official_views", "area_order", "mask_patches", "mask_boxes", "prompt_text",
           "SpecialTokens", "roi_align", "merge_tiles", "roi_boxes", "attention_rule", "OfficialSequence",
           "build_sequence", "TorchRunner", "OfficialPass", "prepare_pass", "isolated_rule", "box_mask",
           "attach_special_tokens", "masked_diffusion_loss", "OFFICIAL_SAMPLERS", "FullForward", "IsolatedForward",
           "CachedForward", "make_forward", "decode_pass"]

# The generation path scales boxes with `feat * 16 * 2` (modeling_pdmllm.py, _prepare_inputs_for_generation).
ROI_SCALE = 32


# -- views ---------------------------------------------------------------------------------------------------------
def tile_grid(width: int, height: int, min_tiles: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """(cols, rows) of the official dynamic tiling. Candidates in the official order: by tile count, and within one
    count in the iteration order of the same Python set (the tie rule below can depend on it)."""
    candidates = sorted({(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1)
                         for j in range(1, n + 1) if min_tiles <= i * j <= max_tiles}, key=lambda r: r[0] * r[1])
    aspect = width / height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidates:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def _views(img: Image.Image, cols: int, rows: int, tile: int) -> list[np.ndarray]:
    """Tiles row-major, then the thumbnail when there are several tiles; each (tile, tile[, 3]) uint8."""
    canvas = np.asarray(img.resize((cols * tile, rows * tile), Image.BICUBIC))
    views = [canvas[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
    if cols * rows > 1:
        views.append(np.asarray(img.resize((tile, tile), Image.BICUBIC)))
    return views


def make_official_views(rgb: np.ndarray, cfg: PDLMConfig) -> tuple[torch.Tensor, int, int]:
    """rgb (H, W, 3) uint8 -> normalised views (V, 3, S, S), cols, rows."""
    o, v = _official(cfg), cfg.vision
    h, w = rgb.shape[:2]
    cols, rows = tile_grid(w, h, o.min_tiles, o.max_tiles, v.image_size)
    x = torch.from_numpy(np.stack(_views(Image.fromarray(rgb), cols, rows, v.image_size)))
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(v.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(v.image_std).view(1, 3, 1, 1)
    return (x - mean) / std, cols, rows


# -- masks ---------------------------------------------------------------------------------------------------------
def area_order(masks: Sequence[np.ndarray]) -> list[int]:
    """Indices of masks by area, largest first; equal areas: the later mask first."""
    areas = [int(np.count_nonzero(m)) for m in masks]
    return sorted(range(len(masks)), key=lambda i: (-areas[i], -i))


def mask_patches(mask: np.ndarray, prompt_id: int, cols: int, rows: int, tile: int, patch: int) -> np.ndarray:
    """Active patches (V, g, g) bool of one mask: the visual-prompt image (255 outside, prompt_id inside) tiled like
    the frame; a patch is active when its top-left pixel is not 255 after the bicubic resize."""
    prompt = np.full(mask.shape, 255, dtype=np.uint8)
    prompt[mask] = prompt_id
    # The official code resizes the prompt as an RGB image; PIL resamples each band alike, so one band is enough.
    views = _views(Image.fromarray(prompt, mode="L"), cols, rows, tile)
    return np.stack([v[::patch, ::patch][: tile // patch, : tile // patch] != 255 for v in views])


def mask_boxes(masks: Sequence[np.ndarray]) -> list[tuple[float, float, float, float]]:
    """(x1, y1, x2, y2) of each mask as fractions of the frame: min pixel / size, max pixel (inclusive) / size."""
    out = []
    for m in masks:
        h, w = m.shape
        box = mask_box(m)  # exclusive ends
        if box is None:
            raise ValueError("an empty mask has no box")
        x1, y1, x2, y2 = box
        out.append((x1 / w, y1 / h, (x2 - 1) / w, (y2 - 1) / h))
    return out


# -- prompt --------------------------------------------------------------------------------------------------------
def prompt_text(o: OfficialConfig, tokens_per_view: int, views: int, num_masks: int, caption_len: int) -> str:
    img = "<IMG_CONTEXT>" * (tokens_per_view * views)
    reserved = "\n".join(f"<|reserved_token_{i}|>" for i in range(num_masks))
    blocks = "\n".join(f"<|Mask_Cap_{i}|>" + "<|mdm_mask|>" * caption_len for i in range(num_masks))
    return ("<|start_header_id|>system<|end_header_id|>\n" + o.system_prompt + "<|eot_id|>\n"
            "<|start_header_id|>user<|end_header_id|>\n" + f"<img>{img}</img>" + reserved + "\n" + o.question
            + "<|eot_id|>\n" + "<|start_header_id|>assistant<|end_header_id|>\n" + blocks + "<|eot_id|>")


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens the official layout relies on, checked once when a checkpoint loads."""

    image: int
    mask: int
    reserved: tuple[int, ...]  # <|reserved_token_i|>, i < prompt_numbers
    caption: tuple[int, ...]  # <|Mask_Cap_i|>
    stop: tuple[int, ...]

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer, cfg: PDLMConfig, where: str) -> "SpecialTokens":
        o = _official(cfg)

        def need(name: str) -> int:
            i = tok.token_to_id(name)
            if i is None:
                raise CheckpointError(f"the tokenizer in {where} lacks the special token {name!r} that the official "
                                      "layout needs (is this the released PerceptionDLM tokenizer?)")
            return i

        fixed = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<img>", "</img>"]
        for name in fixed:
            need(name)
        image = need(o.image_token)
        mask = need("<|mdm_mask|>")
        if mask != cfg.mask_token_id:
            raise CheckpointError(f"the tokenizer in {where} maps <|mdm_mask|> to {mask}, the model's mask id is "
                                  f"{cfg.mask_token_id}")
        stop = tuple(i for i in (tok.token_to_id(s) for s in o.stop_tokens) if i is not None)
        return cls(image, mask, tuple(need(f"<|reserved_token_{i}|>") for i in range(o.prompt_numbers)),
                   tuple(need(f"<|Mask_Cap_{i}|>") for i in range(o.prompt_numbers)), stop)


# -- RoI replay ----------------------------------------------------------------------------------------------------
def merge_tiles(tokens: torch.Tensor, cols: int, rows: int) -> torch.Tensor:
    """Abstractor outputs (V, t*t, C) -> the map RoI-align reads, (C, rows*t, cols*t), from views[1:] when V > 1
    (the official quirk: that drops the first tile and puts the thumbnail in the last slot)."""
    tiles = tokens[1:] if tokens.shape[0] > 1 else tokens
    n, tt, c = tiles.shape
    t = int(round(tt ** 0.5))
    grid = tiles.reshape(rows, cols, t, t, c).permute(4, 0, 2, 1, 3)  # (C, rows, t, cols, t)
    return grid.reshape(c, rows * t, cols * t)


def roi_boxes(boxes: Sequence[tuple[float, float, float, float]], feat_h: int, feat_w: int) -> torch.Tensor:
    """Fractional boxes -> the boxes RoI-align receives, (N, 4) fp32, computed as the official code does in float64
    (to feature units: x * feat_w * ROI_SCALE * (1 / ROI_SCALE)), before RoI-align scales them once more."""
    orig_h, orig_w = feat_h * ROI_SCALE, feat_w * ROI_SCALE
    scale = feat_w / orig_w
    rows = [[x1 * orig_w * scale, y1 * orig_h * scale, x2 * orig_w * scale, y2 * orig_h * scale]
            for x1, y1, x2, y2 in boxes]
    return torch.tensor(rows, dtype=torch.float32)


def roi_align(feat: torch.Tensor, boxes: torch.Tensor, out_hw: tuple[int, int], spatial_scale: float,
              sampling_ratio: int = 2) -> torch.Tensor:
    """RoI-align with aligned=True, as torchvision.ops.roi_align computes it (written here so that torchvision is
    not needed at run time). feat (C, H, W), boxes (N, 4) in input units -> (N, C, oh, ow), in fp32.

    Per output bin, sampling_ratio^2 points at the bin's sub-cell centres are read bilinearly and averaged; a point
    more than one pixel outside the map reads 0, a point in [-1, 0) reads the edge, and a point in the last row or
    column reads that row or column.
    """
    if sampling_ratio < 1:
        raise ValueError("sampling_ratio must be >= 1 (the adaptive count is not reproduced)")
    feat = feat.float()
    c, h, w = feat.shape
    oh, ow = out_hw
    s = torch.tensor(spatial_scale, dtype=torch.float32)
    b = boxes.float() * s - 0.5  # (N, 4)
    bin_h = (b[:, 3] - b[:, 1]) / oh  # (N,)
    bin_w = (b[:, 2] - b[:, 0]) / ow
    sub = (torch.arange(sampling_ratio, dtype=torch.float32) + 0.5)  # (r,)
    ph = torch.arange(oh, dtype=torch.float32)
    pw = torch.arange(ow, dtype=torch.float32)
    # sample coordinates (N, oh, r) and (N, ow, r), the kernel's own expression order
    ys = b[:, 1, None, None] + ph[None, :, None] * bin_h[:, None, None] + sub[None, None, :] * bin_h[:, None, None] / sampling_ratio
    xs = b[:, 0, None, None] + pw[None, :, None] * bin_w[:, None, None] + sub[None, None, :] * bin_w[:, None, None] / sampling_ratio

    def axis(v: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        valid = (v >= -1.0) & (v <= size)
        v = v.clamp(min=0.0)
        low = v.floor().long()
        at_end = low >= size - 1
        low = torch.where(at_end, torch.full_like(low, size - 1), low)
        high = torch.where(at_end, low, low + 1)
        v = torch.where(at_end, low.float(), v)
        frac = v - low.float()
        return low, high, frac, valid

    y0, y1, ly, vy = axis(ys, h)  # (N, oh, r)
    x0, x1, lx, vx = axis(xs, w)  # (N, ow, r)
    n = boxes.shape[0]

    def gather(yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:  # -> (N, C, oh, r, ow, r)
        flat = yi[:, :, :, None, None] * w + xi[:, None, None, :, :]  # (N, oh, r, ow, r)
        return feat.reshape(c, h * w)[:, flat.reshape(-1)].reshape(c, n, oh, sampling_ratio, ow,
                                                                     sampling_ratio).transpose(0, 1)

    hy, hx = (1 - ly)[:, None, :, :, None, None], (1 - lx)[:, None, None, None, :, :]
    ly_, lx_ = ly[:, None, :, :, None, None], lx[:, None, None, None, :, :]
    val = (hy * hx * gather(y0, x0) + hy * lx_ * gather(y0, x1) + ly_ * hx * gather(y1, x0)
           + ly_ * lx_ * gather(y1, x1))
    valid = (vy[:, :, :, None, None] & vx[:, None, None, :, :]).unsqueeze(1)  # (N, 1, oh, r, ow, r)
    val = torch.where(valid, val, torch.zeros(()))
    return val.sum(dim=(3, 5)) / float(sampling_ratio * sampling_ratio)


# -- sequence ------------------------------------------------------------------------------------------------------
@dataclass
class OfficialSequence:
    """One pass: token ids after RoI expansion, where everything sits, and the attention rule."""

    ids: torch.Tensor  # (T,) long; RoI positions hold their reserved token id, caption positions the mask id
    roi_spans: list[tuple[int, int]]  # per mask (start, end) in the expanded sequence
    caption_spans: list[tuple[int, int]]  # per mask: (start, end) of its L mask positions
    allowed: torch.Tensor  # (T, T) bool, True = the query (row) may attend the key (column)
    block_spans: list[tuple[int, int]]  # per mask: its caption block, from <|Mask_Cap_i|> to the next block

    def rule(self, name: str) -> torch.Tensor:
        """The attention rule by name: `official` (the released model's) or `isolated` (this package's)."""
        if name == "official":
            return self.allowed
        if name == "isolated":
            return isolated_rule(int(self.ids.numel()), self.roi_spans, self.block_spans).to(self.allowed.device)
        raise ValueError(f"unknown attention rule {name!r} (official or isolated)")

    @property
    def caption_positions(self) -> torch.Tensor:
        """(M,) positions of every caption token, mask by mask."""
        return torch.cat([torch.arange(s, e) for s, e in self.caption_spans])


def build_sequence(text_ids: Sequence[int], special: SpecialTokens, num_masks: int, roi_tokens: int,
                   caption_len: int) -> OfficialSequence:
    """Expand each `<|reserved_token_i|>` of the tokenized prompt to roi_tokens copies; locate the spans."""
    ids: list[int] = []
    roi_spans = []
    for t in text_ids:
        if t in special.reserved[:num_masks]:
            roi_spans.append((len(ids), len(ids) + roi_tokens))
            ids.extend([t] * roi_tokens)
        else:
            ids.append(t)
    if len(roi_spans) != num_masks:
        raise CheckpointError(f"the tokenizer splits the official prompt unexpectedly: {len(roi_spans)} RoI "
                              f"placeholders for {num_masks} masks")
    starts = [ids.index(special.caption[i]) for i in range(num_masks)]
    caption_spans = [(s + 1, s + 1 + caption_len) for s in starts]
    ids_t = torch.tensor(ids, dtype=torch.long)
    blocks = list(zip(starts, starts[1:] + [len(ids)]))
    return OfficialSequence(ids_t, roi_spans, caption_spans, attention_rule(len(ids), roi_spans, starts), blocks)


def attention_rule(t: int, roi_spans: Sequence[tuple[int, int]], block_starts: Sequence[int]) -> torch.Tensor:
    """(T, T) bool. Caption block k (from its <|Mask_Cap_k|> to the next block's, the last to the end) sees itself,
    the fixed prompt before the first RoI span, the text from the last RoI span's end to the first block, and RoI
    span k. Every other query sees everything."""
    allowed = torch.ones(t, t, dtype=torch.bool)
    fixed = torch.zeros(t, dtype=torch.bool)
    fixed[: roi_spans[0][0]] = True
    fixed[roi_spans[-1][1]: block_starts[0]] = True
    ends = list(block_starts[1:]) + [t]
    for k, (start, end) in enumerate(zip(block_starts, ends)):
        row = fixed.clone()
        row[start:end] = True
        row[roi_spans[k][0]: roi_spans[k][1]] = True
        allowed[start:end] = row
    return allowed


# -- one pass of the model -----------------------------------------------------------------------------------------
class TorchRunner:
    """The two computations of an official pass, on the model's own modules. The ONNX graphs wrap these methods
    (`runtime.onnx_export`), and a graph backend offers the same two methods, so the host code is one."""

    def __init__(self, model) -> None:  # noqa: ANN001 (PerceptionDLM; import cycle)
        self.model = model
        self.device, self.dtype = model.device, model.decoder.wte.weight.dtype

    def visual_tokens(self, pixels: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """pixels (V, 3, S, S), active (prompt_numbers, V, g*g) 0/1 -> abstractor outputs (V, t*t, C).

        Prompt slot i adds mask_id_embedding[i] where it is active; overlapping masks add up."""
        model = self.model
        ids = model.mask_id_embedding.weight  # (prompt_numbers, Cv)
        bias = torch.einsum("nvp,nc->vpc", active.to(ids.dtype), ids)  # (V, g*g, Cv)
        feats = model.vision(pixels, patch_bias=bias)  # (V, g, g, Cv)
        return model.connector(pixel_unshuffle(feats, model.cfg.vision.unshuffle))

    def embed(self, ids: torch.Tensor, visual: torch.Tensor, image_pos: torch.Tensor, roi: torch.Tensor,
              roi_pos: torch.Tensor) -> torch.Tensor:
        """Decoder inputs (T, C): token embeddings, visual tokens (Vt, C) and RoI tokens (NR, C) put in place."""
        x = self.model.decoder.wte(ids)
        x = x.index_put((image_pos,), visual.to(x.dtype))
        return x.index_put((roi_pos,), roi.to(x.dtype))

    def sequence_logits(self, ids: torch.Tensor, visual: torch.Tensor, image_pos: torch.Tensor, roi: torch.Tensor,
                        roi_pos: torch.Tensor, allowed: torch.Tensor, caption_pos: torch.Tensor) -> torch.Tensor:
        """One full forward under the official attention rule -> logits at the caption positions (M, K)."""
        x = self.embed(ids, visual, image_pos, roi, roi_pos)
        positions = torch.arange(x.shape[0], device=x.device)
        h = self.model.decoder.forward_dense(x, positions, allowed)
        return self.model.decoder.logits(h[caption_pos])


@dataclass
class OfficialPass:
    """Everything one pass decodes against."""

    seq: OfficialSequence
    order: list[int]  # order[i] = index (in the masks given) of the i-th prompt
    visual: torch.Tensor  # (V, t*t, C) abstractor outputs
    roi: torch.Tensor  # (N * R, C) RoI tokens, mask by mask
    image_pos: torch.Tensor  # (V * t*t,) where the visual tokens go
    roi_pos: torch.Tensor  # (N * R,)
    caption_pos: torch.Tensor  # (M,)

    def inputs(self, tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The arguments of `sequence_logits` with caption tokens (M,) in place (default: all masked)."""
        ids = self.seq.ids if tokens is None else self.seq.ids.index_put((self.caption_pos,), tokens)
        return (ids, self.visual.reshape(-1, self.visual.shape[-1]), self.image_pos, self.roi, self.roi_pos,
                self.seq.allowed, self.caption_pos)

    def logits(self, runner, tokens: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        """Caption tokens (M,) -> logits at the caption positions (M, K): one full forward."""
        return runner.sequence_logits(*self.inputs(tokens))


def prepare_pass(runner, cfg: PDLMConfig, tokenizer: Tokenizer, special: SpecialTokens,  # noqa: ANN001
                 rgb: np.ndarray, masks: Sequence[np.ndarray], caption_len: int,
                 question: str | None = None) -> OfficialPass:
    """Frame (H, W, 3) uint8 and 1..prompt_numbers boolean masks (H, W) -> the pass's sequence and inputs.
    `question` replaces the configured question (a per-request instruction)."""
    o, v = _official(cfg), cfg.vision
    if question:
        o = dataclasses.replace(o, question=question)
    if not 1 <= len(masks) <= o.prompt_numbers:
        raise ValueError(f"a pass takes 1..{o.prompt_numbers} masks (got {len(masks)})")
    dev = runner.device
    pixels, cols, rows = make_official_views(rgb, cfg)
    order = area_order(masks)
    masks = [np.asarray(masks[i], dtype=bool) for i in order]
    views, g = pixels.shape[0], v.grid
    active = np.zeros((o.prompt_numbers, views, g * g), dtype=np.float32)  # unused slots stay 0
    for i, m in enumerate(masks):
        active[i] = mask_patches(m, i, cols, rows, v.image_size, v.patch_size).reshape(views, g * g)
    visual = runner.visual_tokens(pixels.to(dev, runner.dtype), torch.from_numpy(active).to(dev))  # (V, t*t, C)

    fmap = merge_tiles(visual, cols, rows)  # (C, Hf, Wf)
    out_hw = o.roi_output_size or (fmap.shape[1], fmap.shape[2])
    boxes = roi_boxes(mask_boxes(masks), fmap.shape[1], fmap.shape[2]).to(dev)
    roi = roi_align(fmap, boxes, out_hw, spatial_scale=1.0 / ROI_SCALE)  # (N, C, oh, ow)
    roi = roi.permute(0, 2, 3, 1).reshape(len(masks) * out_hw[0] * out_hw[1], -1).to(runner.dtype)  # row-major

    text = prompt_text(o, visual.shape[1], views, len(masks), caption_len)
    seq = build_sequence(tokenizer.encode(text).ids, special, len(masks), out_hw[0] * out_hw[1], caption_len)
    image_pos = (seq.ids == special.image).nonzero().flatten()
    if image_pos.numel() != visual.shape[0] * visual.shape[1]:
        raise CheckpointError(f"the prompt has {image_pos.numel()} image tokens for {visual.shape[0]} views of "
                              f"{visual.shape[1]} tokens: the tokenizer does not keep {o.image_token} whole")
    roi_pos = torch.cat([torch.arange(a, b) for a, b in seq.roi_spans])
    seq.ids, seq.allowed = seq.ids.to(dev), seq.allowed.to(dev)
    return OfficialPass(seq, order, visual, roi, image_pos.to(dev), roi_pos.to(dev), seq.caption_positions.to(dev))


def isolated_rule(t: int, roi_spans: Sequence[tuple[int, int]], block_spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(T, T) bool: this package's structured rule on the official sequence. Region k = its RoI span and its caption
    block; everything else is the prefix. The prefix sees the prefix; region k sees the prefix and region k. The
    prefix is then independent of every region token (an exact prefix cache), but the visual tokens still carry
    every mask's id embedding, so regions of one pass still meet there."""
    segment = torch.zeros(t, dtype=torch.long)
    for k, ((r0, r1), (b0, b1)) in enumerate(zip(roi_spans, block_spans), start=1):
        segment[r0:r1] = k
        segment[b0:b1] = k
    return segment_mask(segment)  # the native rule, on these segments


def box_mask(box: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
    """A box region as the mask the official layout needs: every pixel the box touches."""
    x1, y1, x2, y2 = box
    mask = np.zeros((height, width), dtype=bool)
    mask[int(np.floor(y1)):int(np.ceil(y2)), int(np.floor(x1)):int(np.ceil(x2))] = True
    return mask


def attach_special_tokens(model, tokenizer: Tokenizer, where: str) -> None:  # noqa: ANN001
    """Check the tokenizer against an official-layout model once, and keep the ids on the model."""
    model.special_tokens = SpecialTokens.from_tokenizer(tokenizer, model.cfg, where)


EPS = 1e-3  # LLaDA's minimum masking probability


def masked_diffusion_loss(runner, cfg: PDLMConfig, tokenizer: Tokenizer, special: SpecialTokens,  # noqa: ANN001
                          rgb: np.ndarray, masks: Sequence[np.ndarray], targets: torch.Tensor,
                          generator: torch.Generator, rule: str = "official") -> torch.Tensor:
    """LLaDA's SFT loss for one pass of the official layout. targets (N, L): each mask's caption, padded.

    Per mask: t ~ U(0, 1), p = (1 - eps) t + eps, each caption token masked with probability p; the loss is
    CE(masked tokens) / p averaged over the span, then over masks. One full forward under `rule` (official, or
    isolated for fine-tuning released weights towards an exact prefix cache)."""
    n, length = targets.shape
    ps = prepare_pass(runner, cfg, tokenizer, special, rgb, masks, length)
    x0 = targets[ps.order].to(runner.device)  # prompt order
    t = torch.rand(n, 1, generator=generator).to(runner.device)
    p_mask = (1 - EPS) * t + EPS
    masked = torch.rand(x0.shape, generator=generator).to(runner.device) < p_mask
    noisy = torch.where(masked, torch.full_like(x0, cfg.mask_token_id), x0)
    args = list(ps.inputs(noisy.reshape(-1)))
    args[5] = ps.seq.rule(rule)
    logits = runner.sequence_logits(*args).float().reshape(n, length, -1)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x0, reduction="none")  # (N, L)
    return ((ce * masked / p_mask).sum(1) / length).mean()


# -- decoding modes ------------------------------------------------------------------------------------------------


class _Forward:
    """Caption tokens (M,) -> logits (M, K) for one pass; `tokens_computed` counts the tokens the decoder ran."""

    def __init__(self, runner, ps: OfficialPass) -> None:  # noqa: ANN001
        self.runner, self.ps = runner, ps
        self.tokens_computed = 0  # tokens run through the decoder, all calls together


class FullForward(_Forward):
    """The official mode: one full forward per step (works on any runner, graph backends included)."""

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens_computed += int(self.ps.seq.ids.numel())
        return self.ps.logits(self.runner, tokens)


class IsolatedForward(_Forward):
    """Exact under `isolated_rule`: the prefix's K/V once, then only the region tokens at every step."""

    def __init__(self, runner, ps: OfficialPass) -> None:  # noqa: ANN001
        super().__init__(runner, ps)
        dec = runner.model.decoder
        allowed = ps.seq.rule("isolated")
        t = allowed.shape[0]
        region = torch.zeros(t, dtype=torch.bool, device=allowed.device)
        for (r0, r1), (b0, b1) in zip(ps.seq.roi_spans, ps.seq.block_spans):
            region[r0:r1] = True
            region[b0:b1] = True
        self.index = region.nonzero().flatten()  # (Q,)
        prefix = (~region).nonzero().flatten()  # (P,)
        self.rows = allowed[self.index]  # (Q, T)
        x = runner.embed(*ps.inputs()[:5])
        _, pk, pv = dec.forward_dense(x[prefix], prefix, allowed[prefix][:, prefix], return_kv=True)
        self.keys = [k.new_zeros(k.shape[0], t, k.shape[2]).index_copy(1, prefix, k) for k in pk]  # (H, T, D)
        self.values = [v.new_zeros(v.shape[0], t, v.shape[2]).index_copy(1, prefix, v) for v in pv]
        self.tokens_computed += int(prefix.numel())
        where = torch.full((t,), -1, dtype=torch.long, device=allowed.device)
        where[self.index] = torch.arange(self.index.numel(), device=allowed.device)
        self.caption_rows = where[ps.caption_pos]  # caption positions within the region tokens

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        dec = self.runner.model.decoder
        x = self.runner.embed(*self.ps.inputs(tokens)[:5])[self.index]
        h = dec.forward_partial(x, self.index, self.index, self.keys, self.values, self.rows)
        self.tokens_computed += int(self.index.numel())
        return dec.logits(h[self.caption_rows])


class CachedForward(_Forward):
    """The official rule with the K/V of everything but the caption blocks reused, refreshed every `refresh` calls
    by a full forward (whose own logits serve that step)."""

    def __init__(self, runner, ps: OfficialPass, refresh: int) -> None:  # noqa: ANN001
        super().__init__(runner, ps)
        if refresh < 1:
            raise ValueError(f"refresh must be >= 1 (got {refresh})")
        self.refresh, self.calls = refresh, 0
        t = ps.seq.ids.numel()
        blocks = torch.zeros(t, dtype=torch.bool, device=ps.caption_pos.device)
        for b0, b1 in ps.seq.block_spans:
            blocks[b0:b1] = True
        self.index = blocks.nonzero().flatten()
        self.rows = ps.seq.allowed[self.index]
        where = torch.full((t,), -1, dtype=torch.long, device=self.index.device)
        where[self.index] = torch.arange(self.index.numel(), device=self.index.device)
        self.caption_rows = where[ps.caption_pos]
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        dec = self.runner.model.decoder
        x = self.runner.embed(*self.ps.inputs(tokens)[:5])
        refresh = self.calls % self.refresh == 0
        self.calls += 1
        if refresh:
            positions = torch.arange(x.shape[0], device=x.device)
            h, self.keys, self.values = dec.forward_dense(x, positions, self.ps.seq.allowed, return_kv=True)
            self.tokens_computed += int(x.shape[0])
            return dec.logits(h[self.ps.caption_pos])
        h = dec.forward_partial(x[self.index], self.index, self.index, self.keys, self.values, self.rows)
        self.tokens_computed += int(self.index.numel())
        return dec.logits(h[self.caption_rows])


def make_forward(mode: str, runner, ps: OfficialPass, refresh: int = 4) -> _Forward:  # noqa: ANN001
    if mode == "official":
        return FullForward(runner, ps)
    if not hasattr(runner, "model"):
        raise ValueError(f"mode {mode!r} needs the PyTorch model (this backend runs the official mode only)")
    if mode == "isolated":
        return IsolatedForward(runner, ps)
    if mode == "cached":
        return CachedForward(runner, ps, refresh)
    raise ValueError(f"unknown official-layout mode {mode!r} (official, isolated or cached)")


def decode_pass(forward: _Forward, num_masks: int, caption_len: int, mask_id: int, *, sampler: str, steps: int,
                temperature: float = 0.0, threshold: float = 0.9, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu"):  # noqa: ANN201 (DecodeResult)
    """Decode one pass with `sampler`; tokens come back as (N, L) in prompt order."""
    from pdlm_ros.model.sampler import diffusion_decode, global_remask_decode

    if sampler == "global":
        res = global_remask_decode(forward, num_masks * caption_len, mask_id, steps=steps, temperature=temperature,
                                   generator=generator, device=device)
        res.tokens, res.confidence = res.tokens.reshape(num_masks, caption_len), res.confidence.reshape(
            num_masks, caption_len)
        return res
    if sampler not in ("span", "threshold"):
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(OFFICIAL_SAMPLERS)}")
    return diffusion_decode(lambda toks, _act: forward(toks.reshape(-1)).reshape(num_masks, caption_len, -1),
                            num_masks, caption_len, mask_id, steps=min(steps, caption_len), temperature=temperature,
                            threshold=threshold if sampler == "threshold" else None, generator=generator,
                            device=device, keep_finished=True)


def _official(cfg: PDLMConfig) -> OfficialConfig:
    if cfg.official is None:
        raise ValueError(f"model {cfg.name!r} has the {cfg.layout} layout, not the official one")
    return cfg.official
