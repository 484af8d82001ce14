"""Parity with the official PerceptionDLM code, on fixtures recorded by running it (scripts/make_official_fixtures.py).

test/fixtures/official/checkpoint is a tiny official model in the hub layout (SigLIP 32 wide, LLaDA 16 wide, LLaDA's
vocabulary, float16 weights); each case file holds a frame, its masks, and what the official code computed: token
ids after RoI expansion, decoder input embeddings, the attention rule, first-forward logits and final tokens.

Every official rule is also switched off, one at a time, and parity must then break: a rule the tests would not
miss is a rule they do not check.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pdlm_ros.model import official
from pdlm_ros.model.checkpoint import load_pretrained
from pdlm_ros.model.official import prepare_pass
from pdlm_ros.model.sampler import diffusion_decode, global_remask_decode

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official"
META = json.loads((FIXTURES / "fixtures.json").read_text())
CASES = {c["name"]: c for c in META["cases"]}
LOGIT_ATOL = 1e-4  # float32 agreement; the recorded runs differ by ~6e-6


@pytest.fixture(scope="module")
def official_model():
    model, tok = load_pretrained(FIXTURES / "checkpoint", dtype=torch.float32)
    return model, tok


def case_data(name: str) -> dict:
    f = load_file(str(FIXTURES / f"{name}.safetensors"))
    t = int(f["input_ids"].numel())
    f["allowed"] = torch.from_numpy(np.unpackbits(f["allowed"].numpy())[: t * t].reshape(t, t).astype(bool))
    f["masks_np"] = [m.numpy().astype(bool) for m in f["masks"]]
    return f


def run_pass(model, tok, name: str):
    f, c = case_data(name), CASES[name]
    return prepare_pass(model.official_runner(), model.cfg, tok, model.special_tokens, f["image"].numpy(),
                        f["masks_np"], c["gen_len"])


def all_logits(model, ps) -> torch.Tensor:
    """Logits at every position (T, K) of the pass's first forward (the fixtures record all of them)."""
    runner = model.official_runner()
    x = runner.embed(*ps.inputs()[:5])
    h = model.decoder.forward_dense(x, torch.arange(x.shape[0]), ps.seq.allowed)
    return model.decoder.logits(h)


def first_forward(model, tok, name: str) -> tuple[bool, float]:
    """(token ids equal, max |logit difference| over the recorded columns; inf when the ids differ)."""
    f = case_data(name)
    with torch.inference_mode():
        ps = run_pass(model, tok, name)
        if not torch.equal(ps.seq.ids, f["input_ids"]):
            return False, float("inf")
        logits = all_logits(model, ps)
    return True, float((logits[:, f["logit_cols"]] - f["logits_sub"]).abs().max())


def final_tokens(model, tok, name: str, decode=global_remask_decode) -> torch.Tensor:
    c = CASES[name]
    runner = model.official_runner()
    with torch.inference_mode():
        ps = run_pass(model, tok, name)
        pos = ps.caption_pos
        if decode is global_remask_decode:
            res = decode(lambda t: ps.logits(runner, t), pos.numel(), model.cfg.mask_token_id, steps=c["steps"])
            toks = res.tokens[0]
        else:  # LLaDA's per-span schedule, committed tokens never re-masked
            n, length = len(ps.seq.caption_spans), c["gen_len"]
            res = decode(lambda t, act: ps.logits(runner, t.reshape(-1)).reshape(n, length, -1), n, length,
                         model.cfg.mask_token_id, steps=c["steps"])
            toks = res.tokens.reshape(-1)
        out = ps.seq.ids.clone()
        out[pos] = toks
    return out


# -- parity ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CASES))
def test_first_forward_matches_official(official_model, name):
    model, tok = official_model
    f, c = case_data(name), CASES[name]
    with torch.inference_mode():
        ps = run_pass(model, tok, name)
        assert ps.order == c["order"]
        assert torch.equal(ps.seq.ids, f["input_ids"])
        assert torch.equal(ps.seq.allowed, f["allowed"])
        torch.testing.assert_close(ps.visual.float(), f["vision_embeds"], atol=1e-5, rtol=0)
        embeds = model.official_runner().embed(*ps.inputs()[:5])
        torch.testing.assert_close(embeds.float(), f["inputs_embeds"], atol=1e-5, rtol=0)
        logits = all_logits(model, ps)
    assert float((logits[:, f["logit_cols"]] - f["logits_sub"]).abs().max()) < LOGIT_ATOL
    torch.testing.assert_close(logits.max(-1).values, f["maxval"], atol=LOGIT_ATOL, rtol=0)
    assert torch.equal(logits.argmax(-1), f["argmax"])


@pytest.mark.parametrize("name", sorted(CASES))
def test_final_tokens_match_official(official_model, name):
    model, tok = official_model
    assert torch.equal(final_tokens(model, tok, name), case_data(name)["final_tokens"])


def test_captioner_maps_captions_back_to_request_order(official_model):
    """Captions come back per request index although the model saw the masks sorted by area."""
    from pdlm_ros import Captioner, RegionInput

    model, tok = official_model
    cap = Captioner(model, tok)
    name = "tall"  # order [2, 3, 0, 1]
    f, c = case_data(name), CASES[name]
    res = cap.caption(f["image"].numpy(), [RegionInput(mask=m) for m in f["masks_np"]], mode="official")
    final, length = f["final_tokens"], c["gen_len"]
    starts = [int((final == tok.token_to_id(f"<|Mask_Cap_{i}|>")).nonzero()[0]) + 1 for i in range(len(c["order"]))]
    for slot, request_index in enumerate(c["order"]):
        text, _ = cap._text(final[starts[slot]:starts[slot] + length], torch.ones(length), model.special_tokens.stop)
        assert res.regions[request_index].caption == text
    assert res.stats.nfe == c["steps"]
    assert res.stats.tokens == len(c["order"]) * length


def test_more_masks_than_prompt_numbers_take_further_passes(official_model):
    from pdlm_ros import Captioner, RegionInput

    model, tok = official_model
    f = case_data("tie_four_tiles")  # prompt_numbers (6) masks
    regions = [RegionInput(mask=m) for m in f["masks_np"]] + [RegionInput(box=(2, 3, 30, 40))]
    res = Captioner(model, tok).caption(f["image"].numpy(), regions, mode="official", steps=4)
    assert [r.ok for r in res.regions] == [True] * 7
    assert res.stats.nfe == 8  # two passes of 4 steps
    assert all(r.caption for r in res.regions)


# -- every rule is checked: parity breaks without it ---------------------------------------------------------------
def any_first_forward_breaks(model, tok, names=tuple(sorted(CASES))) -> bool:
    for name in names:
        same_ids, diff = first_forward(model, tok, name)
        if not same_ids or diff > LOGIT_ATOL:
            return True
    return False


def test_parity_holds_before_ablations(official_model):
    assert not any_first_forward_breaks(*official_model)


def test_area_sort_is_checked(official_model, monkeypatch):
    monkeypatch.setattr(official, "area_order", lambda masks: list(range(len(masks))))
    assert any_first_forward_breaks(*official_model, names=("six_tiles",))


def test_equal_area_tie_order_is_checked(official_model, monkeypatch):
    areas = lambda masks: [int(np.count_nonzero(m)) for m in masks]  # noqa: E731
    monkeypatch.setattr(official, "area_order",
                        lambda masks: sorted(range(len(masks)), key=lambda i: (-areas(masks)[i], i)))
    assert any_first_forward_breaks(*official_model, names=("overlap_equal_area",))


def test_mask_id_embedding_is_checked(official_model, monkeypatch):
    real = official.mask_patches
    monkeypatch.setattr(official, "mask_patches", lambda *a, **k: np.zeros_like(real(*a, **k)))
    assert any_first_forward_breaks(*official_model, names=("one_tile",))


def test_bicubic_mask_growth_is_checked(official_model, monkeypatch):
    """The visual-prompt image is resized like an image (bicubic rings past the mask edge), not with nearest."""
    def nearest(mask, prompt_id, cols, rows, tile, patch):
        from PIL import Image

        img = Image.fromarray(np.where(mask, prompt_id, 255).astype(np.uint8))
        canvas = np.asarray(img.resize((cols * tile, rows * tile), Image.NEAREST))
        views = [canvas[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] for r in range(rows) for c in range(cols)]
        if cols * rows > 1:
            views.append(np.asarray(img.resize((tile, tile), Image.NEAREST)))
        return np.stack([v[::patch, ::patch] != 255 for v in views])

    monkeypatch.setattr(official, "mask_patches", nearest)
    assert any_first_forward_breaks(*official_model)


def test_thumbnail_position_is_checked(official_model, monkeypatch):
    real = official._views

    def thumbnail_first(img, cols, rows, tile):
        v = real(img, cols, rows, tile)
        return v[-1:] + v[:-1] if len(v) > 1 else v

    monkeypatch.setattr(official, "_views", thumbnail_first)
    assert any_first_forward_breaks(*official_model, names=("six_tiles",))


def test_first_tile_dropped_from_roi_map_is_checked(official_model, monkeypatch):
    """The official RoI map is built from views[1:]; the intended views[:-1] (tiles only) must not pass."""
    def tiles_only(tokens, cols, rows):
        tiles = tokens[:-1] if tokens.shape[0] > 1 else tokens
        t = int(round(tiles.shape[1] ** 0.5))
        grid = tiles.reshape(rows, cols, t, t, -1).permute(4, 0, 2, 1, 3)
        return grid.reshape(tiles.shape[-1], rows * t, cols * t)

    monkeypatch.setattr(official, "merge_tiles", tiles_only)
    assert any_first_forward_breaks(*official_model, names=("six_tiles", "tall"))


def test_roi_double_scaling_is_checked(official_model, monkeypatch):
    """RoI boxes are scaled to feature units and again by RoI-align; scaling once must not pass."""
    real = official.roi_align
    monkeypatch.setattr(official, "roi_align", lambda f, b, hw, spatial_scale, **k: real(f, b, hw, 1.0, **k))
    assert any_first_forward_breaks(*official_model, names=("six_tiles",))


def test_inclusive_box_end_is_checked(official_model, monkeypatch):
    def exclusive(masks):
        out = []
        for m in masks:
            h, w = m.shape
            ys, xs = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
            out.append((xs[0] / w, ys[0] / h, (xs[-1] + 1) / w, (ys[-1] + 1) / h))
        return out

    monkeypatch.setattr(official, "mask_boxes", exclusive)
    assert any_first_forward_breaks(*official_model)


def test_area_tie_rule_of_tiling_is_checked(official_model, monkeypatch):
    real = official.tile_grid
    monkeypatch.setattr(official, "tile_grid", lambda w, h, lo, hi, tile: (1, 1) if w == h else
                        real(w, h, lo, hi, tile))
    assert any_first_forward_breaks(*official_model, names=("tie_four_tiles",))


def test_attention_rule_is_checked(official_model, monkeypatch):
    monkeypatch.setattr(official, "attention_rule", lambda t, spans, starts: torch.ones(t, t, dtype=torch.bool))
    assert any_first_forward_breaks(*official_model, names=("six_tiles",))


def test_global_remasking_is_checked(official_model):
    """LLaDA's per-span schedule (committed tokens never re-masked) must not reproduce the official tokens."""
    model, tok = official_model
    for name in ("six_tiles", "overlap_equal_area"):
        assert not torch.equal(final_tokens(model, tok, name, decode=diffusion_decode),
                               case_data(name)["final_tokens"])


# -- pieces against their definitions ---------------------------------------------------------------------------------
def test_roi_align_edges_and_average():
    """A ramp map: RoI-align's bilinear samples of f(y, x) = 10 y + x average to the bin centres' values inside
    the map; points past the last row read the last row; more than one pixel outside reads 0."""
    h, w = 6, 8
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    feat = (10 * yy + xx)[None]
    out = official.roi_align(feat, torch.tensor([[1.5, 1.5, 5.5, 3.5]]), (2, 2), spatial_scale=1.0)
    # aligned: box becomes [1, 1] .. [5, 3]; bins 2 wide and 1 high; bin centres x 2, 4, y 1.5, 2.5
    torch.testing.assert_close(out[0, 0], torch.tensor([[17.0, 19.0], [27.0, 29.0]]))
    edge = official.roi_align(feat, torch.tensor([[0.5, 5.5, 1.5, 6.5]]), (1, 1), spatial_scale=1.0)
    assert edge[0, 0, 0, 0] == pytest.approx(10 * 5 + 0.5, abs=1e-5)  # y in [H-1, H]: the last row
    past = official.roi_align(feat, torch.tensor([[0.5, 5.5, 1.5, 7.0]]), (1, 1), spatial_scale=1.0)
    assert past[0, 0, 0, 0] == pytest.approx((50.25 + 50.75) / 4, abs=1e-5)  # samples at y > H read 0
    outside = official.roi_align(feat, torch.tensor([[20.0, 20.0, 24.0, 24.0]]), (1, 1), spatial_scale=1.0)
    assert outside.abs().max() == 0


def test_roi_align_matches_torchvision_cases():
    """64 random maps, boxes (partly or wholly outside too) and scales, with torchvision's outputs recorded."""
    f = load_file(str(FIXTURES / "roi_align.safetensors"))
    for i in range(64):
        ours = official.roi_align(f[f"{i}.feat"], f[f"{i}.box"][None], (4, 3), float(f[f"{i}.scale"]))
        torch.testing.assert_close(ours[0], f[f"{i}.out"], atol=1e-5, rtol=0)


def test_tile_grid_follows_the_official_candidates():
    assert official.tile_grid(60, 50, 1, 6, 64) == (1, 1)
    assert official.tile_grid(96, 64, 1, 6, 64) == (3, 2)
    assert official.tile_grid(100, 100, 1, 6, 64) == (2, 2)  # tie with (1, 1): the area rule
    assert official.tile_grid(80, 80, 1, 6, 64) == (1, 1)
    assert official.tile_grid(200, 37, 1, 6, 64) == (5, 1)
    assert official.tile_grid(640, 480, 1, 6, 512) == (3, 2)  # a VGA frame: 6 tiles + thumbnail
