"""Checkpoint round trips in every supported naming, written as real safetensors files, and the errors."""

import json

import pytest
import torch
from safetensors.torch import save_file

from pdlm_ros.captioner import Captioner
from pdlm_ros.errors import CheckpointError
from pdlm_ros.model.checkpoint import (
    decoder_key,
    load_decoder_weights,
    load_pretrained,
    load_vision_weights,
    save_pretrained,
)
from pdlm_ros.model.config import preset
from pdlm_ros.model.decoder import LLaDADecoder
from pdlm_ros.model.vision import VisionTower

LLAMA_NAMES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
               "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
               "ff_out": "mlp.down_proj", "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm"}


def fresh_decoder(seed):
    torch.manual_seed(seed)
    return LLaDADecoder(preset("tiny").decoder)


def llada_state(dec):
    """The decoder's weights under LLaDA-8B-Instruct's names."""
    return {f"model.transformer.{k}": v.clone() for k, v in dec.state_dict().items()}


def llama_state(dec):
    """The same weights under the Llama names LLaDA-V uses (written independently of decoder_key)."""
    out = {}
    for k, v in dec.state_dict().items():
        parts = k.split(".")
        if parts[0] == "blocks":
            out[f"model.layers.{parts[1]}.{LLAMA_NAMES[parts[2]]}.weight"] = v.clone()
        else:
            out[{"wte.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight",
                 "ff_out.weight": "lm_head.weight"}[k]] = v.clone()
    return out


@pytest.mark.parametrize("naming", [llada_state, llama_state])
def test_decoder_round_trip(tmp_path, naming):
    src, dst = fresh_decoder(1), fresh_decoder(2)
    save_file(naming(src), str(tmp_path / "model.safetensors"))
    load_decoder_weights(dst, tmp_path / "model.safetensors")
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k


def test_decoder_from_shards_with_index(tmp_path):
    src, dst = fresh_decoder(3), fresh_decoder(4)
    state = llada_state(src)
    keys = sorted(state)
    half = len(keys) // 2
    shards = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(tmp_path / name))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    load_decoder_weights(dst, tmp_path)
    assert torch.equal(src.wte.weight, dst.wte.weight)


def test_decoder_key_names():
    assert decoder_key("model.transformer.blocks.3.attn_out.weight") == "blocks.3.attn_out.weight"
    assert decoder_key("model.layers.7.mlp.down_proj.weight") == "blocks.7.ff_out.weight"
    assert decoder_key("lm_head.weight") == "ff_out.weight"


def test_wrong_keys_and_shapes_are_listed(tmp_path):
    state = llada_state(fresh_decoder(5))
    del state["model.transformer.ln_f.weight"]
    state["model.transformer.blocks.0.extra.weight"] = torch.zeros(2)
    state["model.transformer.wte.weight"] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as err:
        load_decoder_weights(fresh_decoder(6), tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "missing keys: ln_f.weight" in msg
    assert "unexpected keys: blocks.0.extra.weight" in msg
    assert "wte.weight: checkpoint (3, 3) vs model (28, 160)" in msg


@pytest.mark.parametrize("kind", ["siglip", "siglip2"])
def test_vision_round_trip_in_transformers_naming(tmp_path, kind):
    """Weights saved by transformers' own model classes load into the tower."""
    cfg = preset("tiny").vision
    import dataclasses

    cfg = dataclasses.replace(cfg, kind=kind, num_patches=64)
    torch.manual_seed(0)
    src = VisionTower(cfg)
    src.encoder.save_pretrained(tmp_path / "hf")  # transformers writes model.safetensors with vision_model.* keys
    torch.manual_seed(1)
    dst = VisionTower(cfg)
    load_vision_weights(dst, tmp_path / "hf")
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        assert torch.allclose(src(x), dst(x))


def test_full_siglip_model_text_tower_is_ignored(tmp_path):
    cfg = preset("tiny").vision
    src = VisionTower(cfg)
    state = {"vision_model." + k.removeprefix("encoder.").removeprefix("vision_model."): v
             for k, v in src.state_dict().items()}  # SiglipModel naming
    state["text_model.embeddings.token_embedding.weight"] = torch.zeros(4, 4)
    state["logit_scale"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    dst = VisionTower(cfg)
    load_vision_weights(dst, tmp_path / "model.safetensors")
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())


def test_perception_dlm_directory_round_trip(tmp_path, tiny_captioner):
    import numpy as np

    from pdlm_ros.types import RegionInput

    save_pretrained(tiny_captioner.model, tiny_captioner.tokenizer, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded = Captioner.load(tmp_path / "ckpt")
    img = np.random.default_rng(1).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    regs = [RegionInput(box=(3, 4, 40, 50)), RegionInput(box=(30, 10, 79, 60))]
    a, b = tiny_captioner.caption(img, regs), loaded.caption(img, regs)
    assert [r.caption for r in a.regions] == [r.caption for r in b.regions]


def test_pickle_files_are_refused(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_decoder_weights(fresh_decoder(0), tmp_path)
    with pytest.raises(CheckpointError, match="pickle"):
        load_decoder_weights(fresh_decoder(0), tmp_path / "pytorch_model.bin")


def test_corrupt_and_incomplete_directories(tmp_path, tiny_captioner):
    ckpt = save_pretrained(tiny_captioner.model, tiny_captioner.tokenizer, tmp_path / "c")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or not safetensors"):
        load_pretrained(ckpt)
    (ckpt / "config.json").write_text('{"decoder": {"d_modle": 3}}')
    with pytest.raises(CheckpointError, match="did you mean 'd_model'"):
        load_pretrained(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pretrained(ckpt)
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(tmp_path / "nope")
