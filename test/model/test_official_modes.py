"""Fast decoding modes for official-layout checkpoints: exact where they claim to be, and wired everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pdlm_ros import Captioner, RegionInput
from pdlm_ros.errors import ConfigError
from pdlm_ros.model import official as O
from pdlm_ros.model.checkpoint import load_pretrained

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "official"
META = {c["name"]: c for c in json.loads((FIXTURES / "fixtures.json").read_text())["cases"]}


@pytest.fixture(scope="module")
def fixture_model():
    return load_pretrained(FIXTURES / "checkpoint", dtype=torch.float32)


def pass_of(model, tok, name):
    f = load_file(str(FIXTURES / f"{name}.safetensors"))
    masks = [m.numpy().astype(bool) for m in f["masks"]]
    ps = O.prepare_pass(model.official_runner(), model.cfg, tok, model.special_tokens, f["image"].numpy(), masks,
                        META[name]["gen_len"])
    return ps, f


def test_cached_with_refresh_1_is_the_official_mode(fixture_model):
    model, tok = fixture_model
    name = "overlap_equal_area"
    with torch.inference_mode():
        ps, f = pass_of(model, tok, name)
        fw = O.make_forward("cached", model.official_runner(), ps, refresh=1)
        res = O.decode_pass(fw, 3, META[name]["gen_len"], model.cfg.mask_token_id, sampler="global",
                            steps=META[name]["steps"])
    assert torch.equal(ps.seq.ids.index_put((ps.caption_pos,), res.tokens.reshape(-1)), f["final_tokens"])


def test_isolated_equals_its_dense_reference_and_caches_the_prefix(fixture_model):
    model, tok = fixture_model
    runner = model.official_runner()
    with torch.inference_mode():
        ps, _ = pass_of(model, tok, "six_tiles")
        fw = O.make_forward("isolated", runner, ps)
        prefix_tokens = fw.tokens_computed
        toks = torch.randint(0, 2000, ps.caption_pos.shape, generator=torch.Generator().manual_seed(0))
        got = fw(toks)
        args = list(ps.inputs(toks))
        args[5] = ps.seq.rule("isolated")
        ref = runner.sequence_logits(*args)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert prefix_tokens + fw.index.numel() == ps.seq.ids.numel()  # the prefix once, then only region tokens
    assert fw.index.numel() == 3 * (16 + 1 + META["six_tiles"]["gen_len"] + 1)


def test_isolated_regions_do_not_see_each_others_captions(fixture_model):
    model, tok = fixture_model
    with torch.inference_mode():
        ps, _ = pass_of(model, tok, "six_tiles")
        fw = O.make_forward("isolated", model.official_runner(), ps)
        length = META["six_tiles"]["gen_len"]
        toks = torch.randint(0, 2000, ps.caption_pos.shape, generator=torch.Generator().manual_seed(1))
        other = toks.clone()
        other[length:] = torch.randint(0, 2000, (other.numel() - length,), generator=torch.Generator().manual_seed(2))
        a, b = fw(toks), fw(other)
        official = O.make_forward("official", model.official_runner(), ps)
        c, d = official(toks), official(other)
    torch.testing.assert_close(a[:length], b[:length], atol=1e-5, rtol=0)  # region 0 unchanged
    assert (c[:length] - d[:length]).abs().max() > 1e-3  # under the official rule it changes


def test_cached_refresh_recomputes_only_the_caption_blocks_between_refreshes(fixture_model):
    model, tok = fixture_model
    with torch.inference_mode():
        ps, _ = pass_of(model, tok, "six_tiles")
        fw = O.make_forward("cached", model.official_runner(), ps, refresh=4)
        toks = torch.full(ps.caption_pos.shape, model.cfg.mask_token_id)
        full = O.make_forward("official", model.official_runner(), ps)(toks)
        first = fw(toks)
        after_refresh = fw.tokens_computed
        second = fw(toks)
    torch.testing.assert_close(first, full)  # a refresh step is a full official forward
    torch.testing.assert_close(second, full, atol=1e-5, rtol=0)  # same inputs: the cache is exact for them
    assert after_refresh == ps.seq.ids.numel() and fw.tokens_computed - after_refresh == fw.index.numel()


@pytest.mark.parametrize("mode,sampler", [("official", "span"), ("isolated", "global"), ("cached", "threshold")])
def test_modes_and_samplers_through_the_captioner(fixture_model, mode, sampler):
    model, tok = fixture_model
    cap = Captioner(model, tok)
    rgb = np.full((64, 96, 3), 140, dtype=np.uint8)
    regions = [RegionInput(box=(5, 5, 40, 40)), RegionInput(box=(50, 10, 90, 60))]
    kwargs = {"threshold": 0.01} if sampler == "threshold" else {}
    res = cap.caption(rgb, regions, mode=mode, sampler=sampler, steps=3, **kwargs)
    assert [r.ok for r in res.regions] == [True, True] and res.stats.nfe >= 1


def test_mode_options_are_checked(fixture_model):
    model, tok = fixture_model
    cap = Captioner(model, tok)
    rgb = np.zeros((32, 32, 3), dtype=np.uint8)
    reg = [RegionInput(box=(1, 1, 20, 20))]
    with pytest.raises(ConfigError, match="unknown sampler"):
        cap.caption(rgb, reg, sampler="greedy")
    with pytest.raises(ConfigError, match="for mode cached only"):
        cap.caption(rgb, reg, mode="isolated", refresh=2)
    native = Captioner.load(preset="tiny")
    with pytest.raises(ConfigError, match="official-layout checkpoints only"):
        native.caption(rgb, reg, sampler="span")


def test_8b_official_preset_has_a_tokenizer_with_the_real_ids():
    """The GPU benchmark of the released shapes needs LLaDA's special ids in its prompt and sampler."""
    from pdlm_ros.model.config import preset
    from pdlm_ros.model.official import SpecialTokens, prompt_text
    from pdlm_ros.model.tokenizer import build_llada_layout_tokenizer

    cfg = preset("8b-official")
    tok = build_llada_layout_tokenizer(cfg.decoder.vocab_size)
    special = SpecialTokens.from_tokenizer(tok, cfg, "8b-official")
    assert special.mask == 126336 and 126348 in special.stop and special.image == 126464
    ids = tok.encode(prompt_text(cfg.official, 256, 7, 2, 32)).ids
    assert ids.count(special.image) == 256 * 7 and ids.count(special.mask) == 64
    assert max(ids) < cfg.decoder.vocab_size
