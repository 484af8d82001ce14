"""The released PerceptionDLM checkpoint (hub layout) -> this package's model in the official layout.

A directory as `MSALab/PerceptionDLM` is published: `config.json` (`model_type: pdmllm`, with nested
`language_model_config` (LLaDA, Llama naming), `vision_model_config` (a whole SiglipModel config) and
`vision_abstractor_config`), sharded safetensors with `model.safetensors.index.json`, the tokenizer files with the
added special tokens, `processor_config.json` (tiling) and `preprocessor_config.json` (normalisation). No code is
run from the directory (no trust_remote_code) and no pickle is read.

Weight names: `vision_model.vision_model.*` (SigLIP; the text tower `vision_model.text_model.*`, `logit_scale`,
`logit_bias` and the pooling head are not used), `vision_abstractor.projection.{0,2}` (Linear, GELU, Linear),
`language_model.model.*` / `language_model.lm_head` (LLaDA in Llama naming), `mask_id_embedding.weight`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from pdlm_ros.errors import CheckpointError, ConfigError
from pdlm_ros.model.checkpoint import _vision_key, decoder_key, load_streaming, shard_files
from pdlm_ros.model.config import DecoderConfig, DecodingConfig, OfficialConfig, PDLMConfig, VisionConfig
from pdlm_ros.model.official import SpecialTokens
from pdlm_ros.model.pdlm import PerceptionDLM
from pdlm_ros.model.tokenizer import load_tokenizer

__all__ = ["read_json", "is_official", "official_config", "official_key", "load_official"]


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def is_official(config: dict[str, Any]) -> bool:
    """The released checkpoint's config.json, as opposed to this package's own."""
    return config.get("model_type") == "pdmllm" or "language_model_config" in config


def _get(d: dict[str, Any], key: str, where: str, default: Any = ...) -> Any:
    if key in d:
        return d[key]
    if default is ...:
        raise CheckpointError(f"{where} has no {key!r}; is this the released PerceptionDLM config?")
    return default


def official_config(config: dict[str, Any], processor: dict[str, Any], preprocessor: dict[str, Any],
                    where: str) -> PDLMConfig:
    """The hub config.json, processor_config.json and preprocessor_config.json -> PDLMConfig(layout="official")."""
    lm = _get(config, "language_model_config", where)
    vis = _get(config, "vision_model_config", where)
    vis = vis.get("vision_config", vis) if isinstance(vis, dict) else vis  # a whole SiglipModel config, or its tower
    abstractor = _get(config, "vision_abstractor_config", where)
    for name, part in (("language_model_config", lm), ("vision_model_config", vis),
                       ("vision_abstractor_config", abstractor)):
        if not isinstance(part, dict):
            raise CheckpointError(f"{where}: {name} must be an object")
    if abstractor.get("projection_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise CheckpointError(f"{where}: vision abstractor {abstractor.get('projection_type')!r} is not supported "
                              "(the released model uses mlp2x_gelu)")
    ratio = config.get("downsample_ratio", 0.5)
    if ratio != 0.5:
        raise CheckpointError(f"{where}: downsample_ratio {ratio} is not supported (the released model uses 0.5)")
    heads, kv = _get(lm, "num_attention_heads", where), lm.get("num_key_value_heads")
    if kv not in (None, heads):
        raise CheckpointError(f"{where}: grouped-query attention ({kv} key/value heads for {heads}) is not supported")
    if lm.get("rope_scaling") not in (None, {}):
        raise CheckpointError(f"{where}: rope_scaling {lm.get('rope_scaling')} is not supported")
    image_size = int(config.get("image_size", 512))
    patch_size = int(config.get("patch_size", 16))
    if int(vis.get("patch_size", patch_size)) != patch_size or int(vis.get("image_size", image_size)) != image_size:
        raise CheckpointError(f"{where}: the vision tower's geometry ({vis.get('image_size')} px, patch "
                              f"{vis.get('patch_size')}) differs from the model's ({image_size} px, patch {patch_size})")
    select = int(config.get("vision_select_layer", -2))
    roi = config.get("roi_output_size")
    roi_hw = None if roi is None else ((int(roi), int(roi)) if isinstance(roi, int) else tuple(int(v) for v in roi))
    size = processor.get("image_size", image_size)
    if (size[0] if isinstance(size, list) else size) != image_size:
        raise CheckpointError(f"{where}: processor image_size {size} differs from the model's {image_size}")
    try:
        vision = VisionConfig(
            kind="siglip", image_size=image_size, patch_size=patch_size,
            hidden_size=int(_get(vis, "hidden_size", where)),
            intermediate_size=int(_get(vis, "intermediate_size", where)),
            num_hidden_layers=int(_get(vis, "num_hidden_layers", where)),
            num_attention_heads=int(_get(vis, "num_attention_heads", where)),
            layer_norm_eps=float(vis.get("layer_norm_eps", 1e-6)), feature_layer=select,
            feature_post_norm=select == -1, max_tiles=int(processor.get("max_sub_img", 6)), unshuffle=2,
            image_mean=tuple(preprocessor.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(preprocessor.get("image_std", (0.5, 0.5, 0.5))))
        decoder = DecoderConfig(
            d_model=int(_get(lm, "hidden_size", where)), n_layers=int(_get(lm, "num_hidden_layers", where)),
            n_heads=int(heads), mlp_hidden_size=int(_get(lm, "intermediate_size", where)),
            vocab_size=int(_get(lm, "vocab_size", where)), rope_theta=float(lm.get("rope_theta", 500000.0)),
            rms_norm_eps=float(lm.get("rms_norm_eps", 1e-5)),
            max_sequence_length=int(lm.get("max_position_embeddings", 4096)))
        official = OfficialConfig(prompt_numbers=int(config.get("prompt_numbers", 5)), roi_output_size=roi_hw,
                                  min_tiles=int(processor.get("min_sub_img", 1)),
                                  max_tiles=int(processor.get("max_sub_img", 6)))
        return PDLMConfig(name=str(config.get("_name_or_path") or "PerceptionDLM"), vision=vision, decoder=decoder,
                          decoding=DecodingConfig(caption_len=32, steps=32), layout="official", official=official,
                          mask_token_id=126336, eos_token_id=int(lm.get("eos_token_id") or 126081))
    except (ConfigError, TypeError, ValueError) as err:
        raise CheckpointError(f"invalid official config in {where}: {err}") from err


def official_key(name: str) -> str | None:
    """A hub weight name -> this model's, or None for weights the model does not use."""
    if name.startswith("vision_model."):
        rest = name[len("vision_model."):]
        if rest.startswith(("text_model.", "logit_scale", "logit_bias")):
            return None
        key = _vision_key(rest, "")
        return None if key is None else "vision.encoder." + key
    if name.startswith("vision_abstractor.projection."):
        rest = name[len("vision_abstractor.projection."):]
        layer, _, param = rest.partition(".")
        return {"0": f"connector.linear_1.{param}", "2": f"connector.linear_2.{param}"}.get(layer, name)
    if name.startswith("language_model."):
        return "decoder." + decoder_key(name[len("language_model."):])
    return name  # mask_id_embedding.weight, or an unknown key that the key check will name


def load_official(directory: Path, config: dict[str, Any], *, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> tuple[PerceptionDLM, Tokenizer]:
    where = str(directory / "config.json")
    processor = read_json(directory / "processor_config.json") if (directory / "processor_config.json").is_file() else {}
    pre = directory / "preprocessor_config.json"
    preprocessor = read_json(pre) if pre.is_file() else {}
    cfg = official_config(config, processor, preprocessor, where)
    tokenizer = load_tokenizer(directory)
    special = SpecialTokens.from_tokenizer(tokenizer, cfg, str(directory))
    image_id = config.get("image_token_id")
    if image_id is not None and image_id != special.image:
        raise CheckpointError(f"{where}: image_token_id {image_id} is not the tokenizer's <IMG_CONTEXT> "
                              f"({special.image})")
    with torch.device("meta"):
        model = PerceptionDLM(cfg)
    # The vision tower is built in this model's own naming; the hub's is the same module tree one level down.
    inner = "vision.encoder.vision_model." if any(k.startswith("vision.encoder.vision_model.")
                                                   for k in model.state_dict()) else "vision.encoder."

    def key(name: str) -> str | None:
        k = official_key(name)
        if k is not None and k.startswith("vision.encoder.") and inner != "vision.encoder.":
            k = inner + k[len("vision.encoder."):]
        return k

    tied = {"decoder.ff_out.weight": "decoder.wte.weight"} if config["language_model_config"].get(
        "tie_word_embeddings") else None
    load_streaming(model, shard_files(directory), key, f"official checkpoint {directory}", dtype=dtype,
                   device=device, tied=tied)
    model.special_tokens = special  # the official layout's ids, checked above
    return model.eval(), tokenizer
