"""Checkpoints: safetensors only, every key and shape checked, errors that list what is wrong.

Formats read:
- a PerceptionDLM directory: `config.json` + `model.safetensors` (or shards with `model.safetensors.index.json`) +
  `tokenizer.json`; keys `vision.*`, `connector.*`, `decoder.*`, `region.*`;
- an LLaDA decoder in LLaDA-8B-Instruct naming (`model.transformer.blocks.N.q_proj.weight`, ...) or in the Llama-renamed
  naming used by LLaDA-V (`model.layers.N.self_attn.q_proj.weight`, `lm_head.weight`, ...);
- SigLIP / SigLIP-2 vision weights in transformers' naming (`vision_model.*`, as saved by SiglipVisionModel or
  SiglipModel, with or without the `vision_model.` level; a LLaVA-style `model.vision_tower.vision_tower.` prefix is
  accepted). Text-tower and pooling-head keys
  of a full SiglipModel are ignored: the model uses patch features, not the pooled embedding.
Pickle files (.bin, .pt, .pth, .ckpt) are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from pdlm_ros.errors import CheckpointError, ConfigError
from pdlm_ros.model.config import PDLMConfig
from pdlm_ros.model.decoder import LLaDADecoder
from pdlm_ros.model.pdlm import PerceptionDLM
from pdlm_ros.model.tokenizer import load_tokenizer
from pdlm_ros.model.vision import VisionTower

__all__ = [
    "read_safetensors",
    "check_keys",
    "decoder_key",
    "load_decoder_weights",
    "load_vision_weights",
    "save_pretrained",
    "load_pretrained",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Llama-style names (LLaDA-V's conversion) -> LLaDA names, per block.
_LLAMA_BLOCK = {
    "self_attn.q_proj": "q_proj",
    "self_attn.k_proj": "k_proj",
    "self_attn.v_proj": "v_proj",
    "self_attn.o_proj": "attn_out",
    "mlp.gate_proj": "ff_proj",
    "mlp.up_proj": "up_proj",
    "mlp.down_proj": "ff_out",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ff_norm",
}
_LLAMA_TOP = {"model.embed_tokens.weight": "wte.weight", "model.norm.weight": "ln_f.weight",
              "lm_head.weight": "ff_out.weight"}
_LLAMA_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight)$")


def _refuse_pickle(path: Path) -> None:
    raise CheckpointError(
        f"{path} is a pickle checkpoint; pickle files are refused because loading them can run arbitrary code. "
        "Convert it to safetensors (safetensors.torch.save_file) and load that instead.")


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or of a directory's shards (index file or every *.safetensors)."""
    path = Path(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        files = [path]
    elif path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"malformed shard index {index}: {err}") from err
            files = [path / name for name in sorted(set(weight_map.values()))]
        elif (path / "model.safetensors").is_file():
            files = [path / "model.safetensors"]
        else:  # unindexed shards; a training run's optimizer state is not model weights
            files = [p for p in sorted(path.glob("*.safetensors")) if not p.name.startswith("optimizer")]
        if not files:
            pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                _refuse_pickle(path / pickles[0])
            raise CheckpointError(f"no .safetensors file in {path}")
    else:
        raise CheckpointError(f"checkpoint not found: {path}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"cannot read {f} (corrupt or not safetensors): {err}") from err
    return tensors


def check_keys(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise CheckpointError listing missing keys, unexpected keys and shape mismatches, if any."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(expected) & set(got)) if tuple(got[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or mismatched):
        return

    def listing(items: list[str]) -> str:
        shown = ", ".join(items[:12])
        return shown + (f", ... ({len(items)} in all)" if len(items) > 12 else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {listing(unexpected)}")
    if mismatched:
        parts.append(f"shape mismatches: {listing(mismatched)}")
    raise CheckpointError(f"{what} does not match the model; " + "; ".join(parts))


def decoder_key(name: str) -> str:
    """Map an LLaDA-8B-Instruct or Llama-renamed key to this decoder's name (unchanged if neither)."""
    if name.startswith("model.transformer."):
        return name[len("model.transformer."):]
    if name in _LLAMA_TOP:
        return _LLAMA_TOP[name]
    m = _LLAMA_LAYER.match(name)
    if m and m.group(2) in _LLAMA_BLOCK:
        return f"blocks.{m.group(1)}.{_LLAMA_BLOCK[m.group(2)]}.{m.group(3)}"
    return name


def load_decoder_weights(decoder: LLaDADecoder, path: str | Path) -> None:
    tensors = {decoder_key(k): v for k, v in read_safetensors(path).items()}
    expected = decoder.state_dict()
    check_keys(expected, tensors, f"decoder checkpoint {path}")
    decoder.load_state_dict(tensors)


def _vision_key(name: str, inner: str) -> str | None:
    """Map a transformers SigLIP key to the tower's name; None for keys the tower does not use.

    `inner` is the tower's own prefix ("encoder." or "encoder.vision_model.", which depends on the transformers
    version), so checkpoints saved with or without the `vision_model.` level load either way.
    """
    for prefix in ("model.vision_tower.vision_tower.vision_model.", "vision_tower.vision_model.", "vision_model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    if name.startswith(("text_model.", "logit_scale", "logit_bias", "head.")):
        return None  # the text tower of a full SiglipModel, and the pooling head the model does not use
    return inner + name


def load_vision_weights(tower: VisionTower, path: str | Path) -> None:
    expected = tower.state_dict()
    inner = "encoder.vision_model." if any(k.startswith("encoder.vision_model.") for k in expected) else "encoder."
    tensors = {}
    for k, v in read_safetensors(path).items():
        key = _vision_key(k, inner)
        if key is not None:
            tensors[key] = v
    check_keys(expected, tensors, f"vision checkpoint {path}")
    tower.load_state_dict(tensors)


def save_pretrained(model: PerceptionDLM, tokenizer: Tokenizer, directory: str | Path,
                    metadata: Mapping[str, str] | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.cfg.to_json(directory / "config.json")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata=dict(metadata or {"format": "pt"}))
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def load_pretrained(directory: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[PerceptionDLM, Tokenizer]:
    """A PerceptionDLM directory -> (model in eval mode, tokenizer)."""
    directory = Path(directory)
    if not directory.is_dir():
        if directory.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(directory)
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json; a PerceptionDLM checkpoint holds config.json, "
                              "model.safetensors and tokenizer.json")
    try:
        cfg = PDLMConfig.from_json(directory / "config.json")
    except ConfigError as err:
        raise CheckpointError(f"invalid config in {directory}: {err}") from err
    tokenizer = load_tokenizer(directory)
    prompt_ids = tokenizer.encode(cfg.prompt, add_special_tokens=False).ids
    model = PerceptionDLM(cfg, prompt_ids)
    tensors = read_safetensors(directory)
    check_keys(model.state_dict(), tensors, f"checkpoint {directory}")
    model.load_state_dict(tensors)
    model.to(device=device, dtype=dtype).eval()
    return model, tokenizer
