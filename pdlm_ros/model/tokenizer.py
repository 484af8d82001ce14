"""Tokenizers: LLaDA's `tokenizer.json` for real checkpoints, and a word-level tokenizer for the tiny model.

Both are `tokenizers.Tokenizer` objects saved as `tokenizer.json` in a checkpoint directory, so the loading code is
one path. The tiny vocabulary is fixed here (not derived from data at run time) so a preset's vocabulary size, and
therefore its weight shapes, never change.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from pdlm_ros.errors import CheckpointError

__all__ = ["TINY_SPECIAL_TOKENS", "TINY_WORDS", "tiny_vocab_size", "build_tiny_tokenizer", "load_tokenizer"]

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


def build_tiny_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS + TINY_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(TINY_SPECIAL_TOKENS)
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
