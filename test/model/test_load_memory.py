"""Loading a sharded checkpoint needs about one copy of the weights (measured in a fresh process, not timed)."""

from __future__ import annotations

import torch

from pdlm_ros.eval.load_bench import measure_load, medium_config, write_checkpoint
from pdlm_ros.model.config import DecoderConfig


def test_sharded_bf16_load_peaks_near_one_copy(tmp_path):
    cfg = medium_config().replace(decoder=DecoderConfig(d_model=512, n_layers=8, n_heads=8, mlp_hidden_size=1408,
                                                        vocab_size=32000, rope_theta=500000.0))
    weight_bytes = write_checkpoint(tmp_path / "ckpt", cfg, torch.bfloat16, shards=3)
    assert len(list((tmp_path / "ckpt").glob("model-*.safetensors"))) == 3
    m = measure_load(tmp_path / "ckpt", weight_bytes, "bfloat16")
    assert m.param_bytes == weight_bytes
    # A random fp32 init plus a dict of every tensor (the loader this replaced) peaks above 2x.
    assert m.ratio < 1.5, m.to_dict()
