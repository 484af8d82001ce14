"""The structured mask's promises, checked on a real (tiny, randomly initialised) PerceptionDLM."""

import numpy as np
import pytest
import torch

from pdlm_ros.model.regions import prepare_regions
from pdlm_ros.types import RegionInput
from test.conftest import assert_close


@pytest.fixture(scope="module")
def frame_and_regions(tiny_captioner):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (90, 150, 3), dtype=np.uint8)
    mask = np.zeros((90, 150), bool)
    mask[40:70, 100:140] = True
    regs = [RegionInput(box=(5, 5, 40, 50)), RegionInput(box=(50, 10, 95, 80)), RegionInput(mask=mask),
            RegionInput(box=(0, 60, 30, 90))]
    prepared, errors = prepare_regions(regs, 150, 90)
    assert not errors
    model = tiny_captioner.model
    with torch.no_grad():
        frame = model.encode_frame(img)
        roi = model.roi_tokens(frame, prepared)
        cache = model.prefix_cache(frame)
    return model, img, regs, frame, roi, cache


def noisy_tokens(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    toks = torch.randint(0, cfg.decoder.vocab_size, (n, cfg.decoding.caption_len), generator=g)
    toks[torch.rand(toks.shape, generator=g) < 0.5] = cfg.mask_token_id
    return toks


def test_prefix_cache_matches_full_recompute(frame_and_regions):
    model, _, _, frame, roi, cache = frame_and_regions
    toks = noisy_tokens(model, roi.shape[0])
    with torch.no_grad():
        fast = model.region_logits(roi, toks, cache)
        dense = model.dense_logits(frame.prefix, roi, toks, structured=True)
    assert_close(fast, dense, atol=1e-4, what="cached vs recomputed logits")


@pytest.mark.parametrize("impl", ["shared_prefix", "sdpa"])
def test_attention_impls_match_the_dense_reference(frame_and_regions, impl):
    model, _, _, frame, roi, cache = frame_and_regions
    toks = noisy_tokens(model, roi.shape[0], seed=1)
    with torch.no_grad():
        assert_close(model.region_logits(roi, toks, cache, impl), model.dense_logits(frame.prefix, roi, toks),
                     atol=1e-4, what=impl)


def test_zero_interference_alone_together_and_reordered(frame_and_regions):
    model, _, _, frame, roi, cache = frame_and_regions
    toks = noisy_tokens(model, roi.shape[0], seed=2)
    with torch.no_grad():
        together = model.dense_logits(frame.prefix, roi, toks)
        for k in range(roi.shape[0]):
            alone = model.dense_logits(frame.prefix, roi[k:k + 1], toks[k:k + 1])
            assert_close(alone[0], together[k], atol=1e-4, what=f"region {k} alone vs together")
        perm = torch.tensor([3, 1, 0, 2])
        reordered = model.dense_logits(frame.prefix, roi[perm], toks[perm])
        assert_close(reordered, together[perm], atol=1e-4, what="reordered")


def test_without_the_mask_regions_do_interfere(frame_and_regions):
    """The ablation must actually differ, or the tests above prove nothing."""
    model, _, _, frame, roi, _ = frame_and_regions
    toks = noisy_tokens(model, roi.shape[0], seed=3)
    with torch.no_grad():
        alone = model.dense_logits(frame.prefix, roi[:1], toks[:1], structured=False)
        together = model.dense_logits(frame.prefix, roi, toks, structured=False)
    assert (alone[0] - together[0]).abs().max() > 1e-3


def test_captions_are_the_same_alone_with_others_and_in_another_order(tiny_captioner, frame_and_regions):
    _, img, regs, *_ = frame_and_regions
    together = tiny_captioner.caption(img, regs)
    reordered = tiny_captioner.caption(img, regs[::-1])
    for k, reg in enumerate(regs):
        alone = tiny_captioner.caption(img, [reg])
        assert alone.regions[0].caption == together.regions[k].caption
        assert reordered.regions[len(regs) - 1 - k].caption == together.regions[k].caption
        assert abs(alone.regions[0].confidence - together.regions[k].confidence) < 1e-4


def test_all_exact_modes_give_the_same_captions(tiny_captioner, frame_and_regions):
    _, img, regs, *_ = frame_and_regions
    ref = [r.caption for r in tiny_captioner.caption(img, regs).regions]
    for mode in ("sequential", "parallel_nocache", "sequential_nocache"):
        res = tiny_captioner.caption(img, regs, mode=mode)
        assert [r.caption for r in res.regions] == ref, mode


def test_stats_account_for_the_decoding(tiny_captioner, frame_and_regions):
    _, img, regs, *_ = frame_and_regions
    L = tiny_captioner.config.decoding.caption_len
    par = tiny_captioner.caption(img, regs)
    assert (par.stats.nfe, par.stats.tokens, par.stats.tpf) == (L, L * len(regs), float(len(regs)))
    seq = tiny_captioner.caption(img, regs, mode="sequential")
    assert (seq.stats.nfe, seq.stats.tpf) == (L * len(regs), 1.0)
    half = tiny_captioner.caption(img, regs, steps=L // 2)
    assert half.stats.nfe == L // 2 and half.stats.tpf == 2.0 * len(regs)
    for key in ("vision", "roi", "prefix", "decode", "total"):
        assert key in par.stats.latency_ms


def test_box_sides_are_coded_by_the_configured_rule():
    """size_log_base_px 0 keeps the first checkpoints' ln(side) / 5; B > 0 codes log2(side / B), which spreads the
    training sizes (16 to 42 px) over 1.4 instead of 0.19."""
    import math

    from pdlm_ros.model.config import RegionConfig
    from pdlm_ros.model.regions import PreparedRegion, RegionEncoder

    region = [PreparedRegion(0, (10.0, 20.0, 26.0, 62.0), None)]  # 16 x 42 px
    legacy = RegionEncoder(RegionConfig(), 8, 16).geometry_features(region, 100, 100)[0]
    assert legacy[4].item() == pytest.approx(math.log(16) / 5) and legacy[5].item() == pytest.approx(math.log(42) / 5)
    coded = RegionEncoder(RegionConfig(size_log_base_px=32.0), 8, 16).geometry_features(region, 100, 100)[0]
    assert coded[4].item() == pytest.approx(-1.0) and coded[5].item() == pytest.approx(math.log2(42 / 32))
    assert torch.equal(coded[:4], legacy[:4]) and coded[6].item() == legacy[6].item() == 1.0
