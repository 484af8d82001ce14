"""Training under the official layout: from the tiny-official preset, and fine-tuning an official checkpoint under
the isolated rule (the route to an exact prefix cache for released weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pdlm_ros import Captioner, RegionInput
from pdlm_ros.errors import ConfigError
from pdlm_ros.model.checkpoint import load_pretrained
from pdlm_ros.train import TrainConfig, train

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "official" / "checkpoint"


def test_official_layout_from_the_preset_trains_and_loads(tmp_path):
    ckpt = train(TrainConfig(out=str(tmp_path / "run"), layout="official", steps=2, scenes_per_step=1,
                             eval_every=0, save_every=2, warmup=1), progress=False)
    model, tok = load_pretrained(ckpt)
    assert model.cfg.layout == "official" and model.cfg.name == "pdlm-tiny-official"
    res = Captioner(model, tok).caption(np.full((64, 96, 3), 90, dtype=np.uint8),
                                        [RegionInput(box=(4, 4, 40, 40))], steps=2)
    assert res.regions[0].ok and res.stats.nfe == 2


def test_fine_tune_an_official_checkpoint_under_the_isolated_rule(tmp_path):
    before, _ = load_pretrained(FIXTURE, dtype=torch.float32)
    ckpt = train(TrainConfig(out=str(tmp_path / "ft"), init=str(FIXTURE), rule="isolated", steps=1,
                             scenes_per_step=1, eval_every=0, save_every=1, warmup=1, lr=1e-3), progress=False)
    after, tok = load_pretrained(ckpt)
    assert after.cfg.layout == "official"
    moved = [n for n, p in after.state_dict().items() if not torch.equal(p, before.state_dict()[n].to(p.dtype))]
    assert "mask_id_embedding.weight" in moved and any(n.startswith("decoder.blocks.0.") for n in moved)
    res = Captioner(after, tok).caption(np.full((64, 96, 3), 90, dtype=np.uint8),
                                        [RegionInput(box=(4, 4, 40, 40))], mode="isolated", steps=2)
    assert res.regions[0].ok


def test_rule_needs_the_official_layout(tmp_path):
    with pytest.raises(ConfigError, match="official layout only"):
        train(TrainConfig(out=str(tmp_path / "x"), rule="isolated", steps=1), progress=False)
