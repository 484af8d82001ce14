"""Native layout + a tokenizer that carries LLaDA's chat template: BOS, the visual tokens inside the user turn."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from pdlm_ros import Captioner, RegionInput
from pdlm_ros.model.checkpoint import load_pretrained
from pdlm_ros.model.tokenizer import chat_prompt

BUNDLED = Path(__file__).resolve().parents[2] / "pdlm_ros" / "assets" / "default"
# LLaDA-8B-Instruct's template (tokenizer_config.json of GSAI-ML/LLaDA-8B-Instruct)
LLADA_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SPECIALS = ["<|startoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|unk|>"]


def test_llada_template_puts_bos_first_and_the_image_in_the_user_turn(tmp_path):
    words = ["user", "assistant", "describe", "the", "region", "."]
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLADA_TEMPLATE,
                                                                "bos_token": "<|startoftext|>"}))
    before, after = chat_prompt(tmp_path, tok, "describe the region .")
    ids = lambda *names: [vocab[n] for n in names]  # noqa: E731
    assert before == ids("<|startoftext|>", "<|start_header_id|>", "user", "<|end_header_id|>")
    assert after == ids("describe", "the", "region", ".", "<|eot_id|>", "<|start_header_id|>", "assistant",
                        "<|end_header_id|>")


def test_no_template_keeps_the_plain_prompt(tmp_path):
    tok = Tokenizer.from_file(str(BUNDLED / "tokenizer.json"))
    assert chat_prompt(tmp_path, tok, "describe the region .") == ([], None)


def test_native_model_with_a_template_builds_its_prefix_from_it(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(BUNDLED, ckpt)
    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} .{% endfor %}"
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"chat_template": template,
                                                            "bos_token": "<|startoftext|>"}))
    model, tok = load_pretrained(ckpt)
    bos = tok.token_to_id("<|startoftext|>")
    assert model.prompt_prefix_ids.tolist() == [bos]
    rgb = np.full((64, 96, 3), 200, dtype=np.uint8)
    with torch.inference_mode():
        frame = model.encode_frame(rgb)
        torch.testing.assert_close(frame.prefix[0], model.decoder.wte.weight[bos])
        n_text = 1 + model.prompt_ids.numel()
        assert frame.prefix.shape[0] == frame.visual_tokens.shape[0] + n_text
        torch.testing.assert_close(frame.prefix[1:1 + frame.visual_tokens.shape[0]], frame.visual_tokens)
    res = Captioner(model, tok).caption(rgb, [RegionInput(box=(10, 10, 40, 40))])
    assert res.regions[0].ok
