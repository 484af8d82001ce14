"""A bf16 model must agree with its fp32 original: RoPE and attention scores stay in fp32 whatever the dtype."""

from __future__ import annotations

import copy

import torch

from pdlm_ros.model.config import DecoderConfig
from pdlm_ros.model.decoder import LLaDADecoder


def test_bf16_decoder_agrees_with_fp32_over_long_positions():
    """LLaDA's geometry where it matters: head_dim 128, theta 5e5, 2,048 positions. With the RoPE frequencies held
    in bf16 (a buffer that `.to(bfloat16)` casts) this agreement was 88 %; in fp32 it is 98.5 %."""
    torch.manual_seed(0)
    cfg = DecoderConfig(d_model=256, n_layers=2, n_heads=2, mlp_hidden_size=512, vocab_size=1000,
                        rope_theta=500000.0)
    fp32 = LLaDADecoder(cfg)
    with torch.no_grad():  # sharper attention than a random init gives, so positions decide what a query reads
        for block in fp32.blocks:
            block.q_proj.weight.mul_(3)
            block.k_proj.weight.mul_(3)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    t = 2048
    ids = torch.randint(0, cfg.vocab_size, (t,), generator=torch.Generator().manual_seed(1))
    pos, mask = torch.arange(t), torch.ones(t, t, dtype=torch.bool)
    with torch.inference_mode():
        ref = fp32.logits(fp32.forward_dense(fp32.wte(ids), pos, mask)).argmax(-1)
        got = bf16.logits(bf16.forward_dense(bf16.wte(ids), pos, mask)).float().argmax(-1)
    assert (got == ref).float().mean() >= 0.95


def test_decoder_holds_no_float_buffers():
    """Whatever `.to(dtype)` casts is a parameter; nothing positional hides in a float buffer."""
    dec = LLaDADecoder(DecoderConfig(d_model=64, n_layers=1, n_heads=2, mlp_hidden_size=128, vocab_size=50))
    assert [n for n, b in dec.named_buffers() if b.is_floating_point()] == []
