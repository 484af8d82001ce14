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
- the released PerceptionDLM hub directory (official layout): see `pdlm_ros.model.hub`.
Pickle files (.bin, .pt, .pth, .ckpt) are refused: loading them can run arbitrary code.

Whole models load without being materialised twice (`load_streaming`): the model is built on the meta device and
every tensor is read from its shard straight into place, in the checkpoint's dtype unless another is asked for, so
the peak is about one copy of the weights (an 8B bf16 checkpoint: ~16 GB, not a random fp32 init plus a dict).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from pdlm_ros.errors import CheckpointError, ConfigError
from pdlm_ros.model.config import PDLMConfig
from pdlm_ros.model.decoder import LLaDADecoder
from pdlm_ros.model.pdlm import PerceptionDLM
from pdlm_ros.model.tokenizer import chat_prompt, load_tokenizer
from pdlm_ros.model.vision import VisionTower

__all__ = [
    "read_safetensors",
    "shard_files",
    "load_streaming",
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


def shard_files(path: str | Path) -> list[Path]:
    """The .safetensors files of a file or directory: the index's shards (each must exist), model.safetensors, or
    every *.safetensors there. Pickle checkpoints are refused."""
    path = Path(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(path)
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"malformed shard index {index}: {err}") from err
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"{path}: shard(s) listed in model.safetensors.index.json are missing: "
                                  f"{', '.join(missing)} (an interrupted download?)")
        return [path / n for n in names]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    # unindexed shards; a training run's optimizer state is not model weights
    files = [p for p in sorted(path.glob("*.safetensors")) if not p.name.startswith("optimizer")]
    if not files:
        pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            _refuse_pickle(path / pickles[0])
        raise CheckpointError(f"no .safetensors file in {path}")
    return files


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or of a directory's shards, in memory (small files; whole models go
    through `load_streaming`)."""
    tensors: dict[str, torch.Tensor] = {}
    for f in shard_files(path):
        try:
            tensors.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"cannot read {f} (corrupt or not safetensors): {err}") from err
    return tensors


def _open(f: Path):  # noqa: ANN202
    try:
        return safe_open(str(f), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"cannot read {f} (corrupt or not safetensors): {err}") from err


def load_streaming(model: nn.Module, files: list[Path], key_fn: Callable[[str], str | None], what: str, *,
                   dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                   tied: Mapping[str, str] | None = None) -> torch.dtype:
    """Fill a model built on the meta device from safetensors shards, one tensor at a time.

    key_fn maps a checkpoint key to the model's name (None: not the model's, skipped). Keys and shapes are checked
    before anything is read. dtype None: the floating dtype that holds most of the checkpoint's elements (float32 in
    place of float16 on a CPU, which emulates float16 arithmetic slowly and lacks some of its kernels). `tied`
    maps a model key missing from the checkpoint to the key whose tensor it shares (an untied head's fallback).
    Returns the floating dtype used.
    """
    expected = model.state_dict()  # meta tensors: names and shapes only
    index: dict[str, tuple[Path, str]] = {}
    shapes: dict[str, torch.Tensor] = {}
    counts: Counter = Counter()
    for f in files:
        with _open(f) as h:
            for k in h.keys():
                name = key_fn(k)
                if name is None:
                    continue
                sl = h.get_slice(k)
                shape, dt = sl.get_shape(), _ST_DTYPES.get(sl.get_dtype())
                if name in index:
                    raise CheckpointError(f"{what}: {k} and {index[name][1]} both map to {name}")
                index[name] = (f, k)
                shapes[name] = torch.empty(shape, device="meta")
                if dt is not None and dt.is_floating_point:
                    counts[dt] += int(torch.Size(shape).numel())
    for dst, src in (tied or {}).items():
        if dst not in shapes and src in shapes:
            shapes[dst] = shapes[src]
    check_keys(expected, shapes, what)
    if dtype is None:
        dtype = counts.most_common(1)[0][0] if counts else torch.float32
        if dtype == torch.float16 and torch.device(device).type == "cpu":
            dtype = torch.float32
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (f, k) in index.items():
        by_file.setdefault(f, []).append((name, k))
    loaded: dict[str, torch.Tensor] = {}
    for f, items in by_file.items():
        with _open(f) as h:
            part = {}
            for name, k in items:
                try:
                    t = h.get_tensor(k)
                except (SafetensorError, OSError, ValueError, RuntimeError) as err:
                    raise CheckpointError(f"cannot read {k} from {f} (truncated or corrupt): {err}") from err
                part[name] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            model.load_state_dict(part, strict=False, assign=True)
            loaded.update(part)
    for dst, src in (tied or {}).items():
        if dst not in index:
            model.load_state_dict({dst: loaded[src]}, strict=False, assign=True)
    _materialise_buffers(model, device)
    return dtype


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _materialise_buffers(model: nn.Module, device: str | torch.device) -> None:
    """Non-persistent buffers left on the meta device get their values: position ids (transformers' SigLIP) are
    ranges; anything else is a buffer this loader does not know, and is an error rather than garbage."""
    for mod_name, module in model.named_modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is None or not buf.is_meta:
                continue
            if name == "position_ids":
                value = torch.arange(buf.shape[-1], device=device).expand(buf.shape).clone()
            else:
                raise CheckpointError(f"buffer {mod_name}.{name} is not in the checkpoint and cannot be rebuilt")
            module.register_buffer(name, value, persistent=False)
    model.to(device)


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
    """A checkpoint directory, native or official (the released hub layout) -> (model in eval mode, tokenizer).

    dtype None keeps the checkpoint's dtype.
    """
    directory = Path(directory)
    if not directory.is_dir():
        if directory.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(directory)
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    if not (directory / "config.json").is_file():
        raise CheckpointError(f"{directory} has no config.json; a PerceptionDLM checkpoint holds config.json, "
                              "model.safetensors and tokenizer.json")
    from pdlm_ros.model import hub

    data = hub.read_json(directory / "config.json")
    if hub.is_official(data):
        return hub.load_official(directory, data, device=device, dtype=dtype)
    try:
        cfg = PDLMConfig.from_dict(data)
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"invalid config in {directory}: {err}") from err
    tokenizer = load_tokenizer(directory)
    with torch.device("meta"):
        model = PerceptionDLM(cfg)
    before, after = chat_prompt(directory, tokenizer, cfg.question)
    if after is None:
        after = tokenizer.encode(cfg.prompt, add_special_tokens=False).ids
    model.set_prompt(after, before)
    load_streaming(model, shard_files(directory), lambda k: k, f"checkpoint {directory}", dtype=dtype, device=device)
    if cfg.official is not None:  # an official-layout model trained or saved by this package
        from pdlm_ros.model.official import attach_special_tokens

        attach_special_tokens(model, tokenizer, str(directory))
    return model.eval(), tokenizer
