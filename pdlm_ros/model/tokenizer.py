"""Tokenizers: LLaDA's `tokenizer.json` for real checkpoints, and a word-level tokenizer for the tiny model.

Both are `tokenizers.Tokenizer` objects saved as `tokenizer.json` in a checkpoint directory, so the loading code is
one path. The tiny vocabulary is fixed here (not derived from data at run time) so a preset's vocabulary size, and
therefore its weight shapes, never change.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from pdlm_ros.errors import CheckpointError

__all__ = ["TINY_SPECIAL_TOKENS", "TINY_WORDS", "tiny_vocab_size", "build_tiny_tokenizer", "load_tokenizer",
           "TINY_OFFICIAL_SPECIAL_TOKENS", "TINY_OFFICIAL_WORDS", "tiny_official_vocab_size",
           "build_tiny_official_tokenizer", "build_llada_layout_tokenizer", "LLADA_IDS",
           "read_chat_template", "chat_prompt"]

# Names follow LLaDA's special tokens so code paths read the same for both tokenizers.
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|mdm_mask|>", "<|unk|>", "<|startoftext|>"]
TINY_WORDS = [
    ".", "a", "describe", "region", "the",
    # sizes, patterns, colours, shapes of the synthetic scenes (pdlm_ros.data.scenes)
    "small", "large",
    "solid", "striped", "dotted",
    "red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink",
    "circle", "square", "triangle", "star", "hexagon", "cross",
]


def tiny_vocab_size() -> int:
    return len(TINY_SPECIAL_TOKENS) + len(TINY_WORDS)


# The tiny vocabulary plus what the official layout's prompt needs (its special tokens and role words), for small
# official-layout models trained here; ids of the tiny tokens are unchanged.
TINY_OFFICIAL_SPECIAL_TOKENS = TINY_SPECIAL_TOKENS + [
    "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<img>", "</img>", "<IMG_CONTEXT>",
    *(f"<|reserved_token_{i}|>" for i in range(6)), *(f"<|Mask_Cap_{i}|>" for i in range(6))]
TINY_OFFICIAL_WORDS = TINY_WORDS + ["system", "user", "assistant"]


def tiny_official_vocab_size() -> int:
    return len(TINY_OFFICIAL_SPECIAL_TOKENS) + len(TINY_OFFICIAL_WORDS)


def build_tiny_official_tokenizer() -> Tokenizer:
    return _word_level(TINY_OFFICIAL_SPECIAL_TOKENS, TINY_OFFICIAL_WORDS)


LLADA_IDS = {"<|startoftext|>": 126080, "<|endoftext|>": 126081, "<|mdm_mask|>": 126336,
             "<|start_header_id|>": 126346, "<|end_header_id|>": 126347, "<|eot_id|>": 126348}


def build_llada_layout_tokenizer(vocab_size: int = 126490) -> Tokenizer:
    """A word-level tokenizer with LLaDA's special ids (mask 126336, eot 126348, ...) and the released
    PerceptionDLM's added tokens after 126464, for random-weight models of the real shapes (the 8b-official preset's
    benchmark): the sampler and the prompt then see the real ids. The tiny words keep low ids; other ids are
    placeholders that no text produces."""
    specials = dict(LLADA_IDS)
    specials.update({f"<|reserved_token_{i}|>": 126082 + i for i in range(16)})
    added = ["<IMG_CONTEXT>", "<img>", "</img>", *(f"<|Mask_Cap_{i}|>" for i in range(16))]
    specials.update({t: 126464 + i for i, t in enumerate(added)})
    if vocab_size <= max(specials.values()):
        raise ValueError(f"vocab_size {vocab_size} cannot hold the released model's added tokens")
    names = ["<|unk|>", *TINY_OFFICIAL_WORDS]
    vocab = {n: i for i, n in enumerate(names)}
    for i in range(len(names), vocab_size):
        vocab.setdefault(f"<unused{i}>", i)
    vocab = {k: v for k, v in vocab.items() if v not in specials.values()}
    vocab.update(specials)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(list(specials))
    return tok


def build_tiny_tokenizer() -> Tokenizer:
    return _word_level(TINY_SPECIAL_TOKENS, TINY_WORDS)


def _word_level(specials: list[str], words: list[str]) -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(specials)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise CheckpointError(f"cannot read tokenizer {path}: {err}") from err


_IMAGE_SLOT = "\x00pdlm-image\x00"  # where the visual tokens go in a rendered chat template


def read_chat_template(directory: str | Path) -> tuple[str | None, dict]:
    """The chat template a checkpoint's tokenizer carries (tokenizer_config.json, chat_template.jinja or
    chat_template.json, as transformers saves them), and tokenizer_config.json's contents."""
    directory = Path(directory)
    config: dict = {}
    path = directory / "tokenizer_config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"cannot read {path}: {err}") from err
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    if template is None and (directory / "chat_template.json").is_file():
        try:
            template = json.loads((directory / "chat_template.json").read_text()).get("chat_template")
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"cannot read {directory / 'chat_template.json'}: {err}") from err
    return template, config


def chat_prompt(directory: str | Path, tokenizer: Tokenizer, question: str) -> tuple[list[int], list[int] | None]:
    """Token ids before and after the visual tokens when the tokenizer carries a chat template (LLaDA's: BOS, the
    user turn holding the image and the question, the assistant header); ([], None) when it carries none.

    The template is rendered with jinja2's sandbox, as transformers does, so its own BOS handling applies; both
    halves are then tokenized without adding special tokens again.
    """
    template, config = read_chat_template(directory)
    if template is None:
        return [], None
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def token(name: str) -> str:
        value = config.get(name) or ""
        return value.get("content", "") if isinstance(value, dict) else str(value)

    try:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        text = env.from_string(template).render(
            messages=[{"role": "user", "content": _IMAGE_SLOT + "\n" + question}], add_generation_prompt=True,
            bos_token=token("bos_token"), eos_token=token("eos_token"))
    except TemplateError as err:
        raise CheckpointError(f"the chat template in {directory} does not render: {err}") from err
    if text.count(_IMAGE_SLOT) != 1:
        raise CheckpointError(f"the chat template in {directory} does not place the user's message exactly once")
    before, after = text.split(_IMAGE_SLOT)
    enc = tokenizer.encode_batch([before, after], add_special_tokens=False)
    return enc[0].ids, enc[1].ids
