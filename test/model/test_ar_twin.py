"""The autoregressive twin: its training forward and its KV-cache decoder agree, it learns, and it loads as mode ar."""

import random

import pytest
import torch

from pdlm_ros.captioner import Captioner
from pdlm_ros.data.scenes import generate_scene
from pdlm_ros.errors import ConfigError
from pdlm_ros.model.ar_baseline import decode_twin, next_token_loss, teacher_forced_logits
from pdlm_ros.model.checkpoint import load_pretrained, save_pretrained
from pdlm_ros.train import TrainConfig, build_model, caption_targets, scene_regions
from pdlm_ros.types import RegionInput


@pytest.fixture(scope="module")
def twin():
    model, tok = build_model(TrainConfig(out="", objective="ar", seed=3))
    return model.eval(), tok


def test_teacher_forcing_matches_cached_greedy_decoding(twin):
    """The packed causal forward used in training gives, at every slot, the logits the KV-cache decoder acts on:
    feeding the greedy captions back as targets reproduces them."""
    model, tok = twin
    scene = generate_scene(11)
    regions = scene_regions(scene, random.Random(0), 0.5)
    with torch.no_grad():
        frame = model.encode_frame(scene.image)
        roi = model.roi_tokens(frame, regions)
        L = model.cfg.decoding.caption_len
        ids, _, nfe = decode_twin(model, frame, roi, L, eos_id=-1)  # never stops: every slot is decoded
        targets = torch.tensor(ids)
        assert targets.shape == (len(regions), L) and nfe == len(regions) * L
        greedy = teacher_forced_logits(model, frame, roi, targets).argmax(-1)
    assert torch.equal(greedy, targets)


def test_region_captions_do_not_depend_on_the_other_regions(twin):
    model, _ = twin
    scene = generate_scene(12, min_objects=3)
    regions = scene_regions(scene, random.Random(1), 0.0)
    with torch.no_grad():
        frame = model.encode_frame(scene.image)
        roi = model.roi_tokens(frame, regions)
        all_ids, _, _ = decode_twin(model, frame, roi, 8, eos_id=model.cfg.eos_token_id)
        last, _, _ = decode_twin(model, frame, roi[-1:], 8, eos_id=model.cfg.eos_token_id)
    assert all_ids[-1] == last[0]


def test_twin_learns_a_scene_and_runs_as_mode_ar(tmp_path):
    model, tok = build_model(TrainConfig(out="", objective="ar", seed=0))
    scene = generate_scene(5, min_objects=2, max_objects=3)
    regions = scene_regions(scene, random.Random(0), 0.0)
    targets = caption_targets([o.caption for o in scene.objects], tok, model.cfg.decoding.caption_len,
                              model.cfg.eos_token_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    first = None
    for _ in range(80):
        opt.zero_grad()
        loss = next_token_loss(model, scene.image, regions, targets, model.cfg.eos_token_id)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.1 * first
    save_pretrained(model, tok, tmp_path)
    cap = Captioner.load(tmp_path)
    assert cap.config.objective == "ar" and cap.modes == ("ar",)
    res = cap.caption(scene.image, [RegionInput(mask=o.mask) for o in scene.objects])
    assert [r.caption for r in res.regions] == [o.caption for o in scene.objects]
    assert res.stats.tpf == 1.0 and res.stats.nfe == sum(len(o.caption.split()) + 1 for o in scene.objects)
    with pytest.raises(ConfigError, match="autoregressive twin"):
        cap.caption(scene.image, [RegionInput(mask=scene.objects[0].mask)], mode="parallel")


def test_objective_is_checked():
    with pytest.raises(ConfigError, match="objective"):
        TrainConfig(out="x", objective="causal").validate()
    from dataclasses import replace

    from pdlm_ros.model.config import preset
    with pytest.raises(ConfigError, match="objective"):
        replace(preset("tiny"), objective="gpt")
