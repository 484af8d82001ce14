"""PerceptionDLM configuration: one frozen dataclass per part, composed into `PDLMConfig`, plus named presets.

Presets:
- `tiny`: a few-MB model that runs a frame in well under a second on a CPU; the bundled default is trained at this
  shape, and the tests use it.
- `small`: between tiny and 8b; used by the CPU benchmark. It keeps the 8b vision geometry (384 px tiles, 14 px
  patches, up to 4 tiles), so its prefix has the real model's length at any frame size (about 600 tokens for a
  1280x720 frame against 48 per region), with narrow layers so the whole benchmark runs in minutes on a CPU.
- `8b`: the real shape: SigLIP-2 so400m/14 at 384 px (a 27x27 patch grid) + LLaDA-8B (d 4096, 32 layers).

`layout` says whose rules the model follows: `native` (this package's: the prefix never sees regions) or `official`
(the released PerceptionDLM's, `pdlm_ros.model.official`; such a config is read from the hub checkpoint's own
config.json by `pdlm_ros.model.hub`, and carries an `OfficialConfig`).

JSON loading rejects unknown keys with a "did you mean" hint instead of silently keeping a misspelt field, and a
missing `vision` or `decoder` section (or one of their sizes): those defaults are the 8b shape, and a config that
forgot them would build a model of tens of GB. Every value is checked for its type and range when a config is made
(from JSON or in code), each failure a one-line `ConfigError` quoting the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pdlm_ros.errors import ConfigError

__all__ = [
    "VisionConfig",
    "DecoderConfig",
    "RegionConfig",
    "DecodingConfig",
    "OfficialConfig",
    "LAYOUTS",
    "PDLMConfig",
    "PRESETS",
    "preset",
]


@dataclass(frozen=True)
class VisionConfig:
    kind: str = "siglip"  # "siglip": fixed-resolution SiglipVisionModel; "siglip2": NaFlex Siglip2VisionModel
    image_size: int = 384  # tile side in pixels
    patch_size: int = 14
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    layer_norm_eps: float = 1e-6
    feature_layer: int = -2  # index into hidden_states; -2 = penultimate layer, as LLaVA-OneVision / LLaDA-V
    feature_post_norm: bool = False  # apply the encoder's post-layernorm to the features (official layout at -1)
    max_tiles: int = 4  # dynamic-resolution tiles (plus one thumbnail when there is more than one tile)
    unshuffle: int = 2  # pixel unshuffle factor: 2x2 patches -> one token of 4x the channels
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    num_patches: int = 256  # siglip2 only: size of the learned position-embedding grid (16x16), resized per tile

    @property
    def grid(self) -> int:
        """Patches per tile side (27 for so400m/14 at 384 px: the patch conv drops the last 6 pixels)."""
        return self.image_size // self.patch_size

    @property
    def tokens_per_view(self) -> int:
        """Visual tokens per view after the unshuffle (odd grids are padded up to a multiple of the factor)."""
        g = -(-self.grid // self.unshuffle)
        return g * g


@dataclass(frozen=True)
class DecoderConfig:
    """LLaDA decoder (OLMo-style field names, as in LLaDA-8B-Instruct's config.json)."""

    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    mlp_hidden_size: int = 12288  # SwiGLU hidden width (ff_proj / up_proj output)
    vocab_size: int = 126464
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


@dataclass(frozen=True)
class RegionConfig:
    roi_grid: int = 8  # bilinear RoI samples per box side
    roi_merge: int = 2  # samples merged per RoI token side: R = (roi_grid / roi_merge)^2 tokens per region
    roi_context: float = 0.1  # box enlarged by this fraction of its size on each side before sampling
    roi_pixels: bool = True  # also sample RGB and the region mask at full image resolution (DAM/GAR-style mask cue)
    max_regions: int = 16  # regions per denoising pass; more are processed in further passes (never dropped)
    # A learned embedding per caption slot, added to the caption tokens. Off for LLaDA checkpoints (RoPE only);
    # on for small models trained from scratch, where identical mask tokens otherwise learn their slot slowly.
    span_position_embedding: bool = False
    # Add a projection of the region's mean RoI token to each of its caption tokens, so every caption slot starts
    # from its own region's content instead of having to find it by attention first. The structured mask is
    # unaffected (the summary is the region's own). Off for LLaDA checkpoints; on for models trained from scratch.
    span_region_query: bool = False
    # Channels of a small conv stem over the G x G RoI samples (strided down to the token grid), added to the RoI
    # tokens; 0 = off. Object shape is a spatial pattern that 4x4-merged samples leave for the decoder to rebuild;
    # a conv stem extracts it directly (the tiny model learned colour, size and pattern without one, shape not).
    roi_stem_channels: int = 0
    # Hidden width of an MLP over the region's whole G x G grid of mask and pixel samples (not the vision features),
    # added to every RoI token; 0 = off. Shape is a global property of the outline: a linear read-out of the 16 x 16
    # mask samples names it 97 % of the time, while the conv stem's tokens of the same model gave 60 %.
    roi_shape_hidden: int = 0
    # How the geometry embedding codes a box side s (px): 0 = ln(s) / 5 (the first checkpoints' code), B > 0 =
    # log2(s / B). ln(s) / 5 moves by only 0.19 between a 16 px and a 42 px object, so the linear geometry embedding
    # needs thousands of Adam steps to tell small from large; log2(s / 32) moves by 1.4 over the same range.
    size_log_base_px: float = 0.0

    @property
    def tokens(self) -> int:
        return (self.roi_grid // self.roi_merge) ** 2


@dataclass(frozen=True)
class DecodingConfig:
    caption_len: int = 32  # L: masked tokens per region span
    steps: int = 32  # S: denoising steps; S = L commits one token per span per step
    threshold: float = 0.9  # confidence threshold of the threshold mode
    temperature: float = 0.0


@dataclass(frozen=True)
class OfficialConfig:
    """What only the official layout has (values from the released checkpoint's config and processor files)."""

    prompt_numbers: int = 6  # masks per pass (one learned mask-id embedding each)
    roi_output_size: tuple[int, int] | None = (4, 4)  # RoI-align grid per region; None = the merged map's size
    min_tiles: int = 1
    max_tiles: int = 6
    system_prompt: str = "You are a helpful assistant."
    question: str = "Describe the masked region in detail."
    image_token: str = "<IMG_CONTEXT>"
    stop_tokens: tuple[str, ...] = ("<|eot_id|>", "<|endoftext|>")  # a caption ends at the first of these

    @property
    def roi_tokens(self) -> int:
        if self.roi_output_size is None:
            raise ConfigError("roi_output_size None (the merged map's size) has no fixed token count")
        return self.roi_output_size[0] * self.roi_output_size[1]


LAYOUTS = ("native", "official")


@dataclass(frozen=True)
class PDLMConfig:
    name: str = "perception-dlm"
    vision: VisionConfig = field(default_factory=VisionConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    region: RegionConfig = field(default_factory=RegionConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    layout: str = "native"
    official: OfficialConfig | None = None  # set exactly when layout == "official"
    # diffusion: this package's models. ar: the autoregressive twin (`pdlm_ros.model.ar_baseline.ARCaptioner`), the
    # same modules trained left to right with causal attention, kept only to measure the diffusion model against.
    objective: str = "diffusion"
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    # Shared prompt after the visual tokens. Every region is described against the same prompt; the region itself
    # is given by its RoI tokens, so the prompt carries no region index.
    prompt: str = (
        "<|start_header_id|>user<|end_header_id|>\n\nDescribe the masked region in detail.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    # The user's question when the tokenizer carries a chat template (LLaDA's): the prefix is then the rendered
    # template with the visual tokens inside the user turn, and `prompt` is not used.
    question: str = "Describe the masked region in detail."

    def __post_init__(self) -> None:
        _check_fields(self)
        v, d, r, s = self.vision, self.decoder, self.region, self.decoding
        if self.layout not in LAYOUTS:
            raise ConfigError(f"unknown layout {self.layout!r}; choose one of {', '.join(LAYOUTS)}")
        if self.objective not in ("diffusion", "ar") or (self.objective == "ar" and self.layout != "native"):
            raise ConfigError(f"objective must be diffusion, or ar with the native layout (got {self.objective!r})")
        if (self.layout == "official") != (self.official is not None):
            raise ConfigError("an official-layout config needs an `official` section, and only it may have one")
        if self.official is not None:
            o = self.official
            if not 1 <= o.prompt_numbers <= 16:
                raise ConfigError(f"official.prompt_numbers must be in 1..16 (got {o.prompt_numbers})")
            if not 1 <= o.min_tiles <= o.max_tiles:
                raise ConfigError(f"official tiles must satisfy 1 <= min_tiles <= max_tiles (got {o.min_tiles}, "
                                  f"{o.max_tiles})")
            if o.roi_output_size is not None and min(o.roi_output_size) < 1:
                raise ConfigError(f"official.roi_output_size must be positive (got {o.roi_output_size})")
        if d.d_model % d.n_heads:
            raise ConfigError(f"decoder.d_model must be divisible by n_heads (got {d.d_model} and {d.n_heads})")
        if d.head_dim % 2:
            raise ConfigError(f"decoder head_dim must be even for RoPE (got {d.head_dim})")
        if v.image_size < v.patch_size:
            raise ConfigError(f"vision.image_size must be at least one patch (got {v.image_size} < {v.patch_size})")
        if r.roi_grid % r.roi_merge:
            raise ConfigError(f"region.roi_grid must be a multiple of roi_merge (got {r.roi_grid}, {r.roi_merge})")
        if r.roi_stem_channels and r.roi_merge & (r.roi_merge - 1):
            raise ConfigError(f"region.roi_stem_channels needs a power-of-two roi_merge (got {r.roi_merge})")
        if s.steps < 1 or (self.layout == "native" and s.steps > s.caption_len):
            raise ConfigError(f"decoding.steps must be in 1..caption_len={s.caption_len} (got {s.steps})")
        for name, tok in (("mask_token_id", self.mask_token_id), ("eos_token_id", self.eos_token_id)):
            if not 0 <= tok < d.vocab_size:
                raise ConfigError(f"{name}={tok} is outside the vocabulary (size {d.vocab_size})")
        if v.kind not in ("siglip", "siglip2"):
            raise ConfigError(f"vision.kind must be 'siglip' or 'siglip2' (got {v.kind!r})")
        if r.max_regions < 1:
            raise ConfigError(f"region.max_regions must be >= 1 (got {r.max_regions})")

    # -- (de)serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PDLMConfig":
        """A config from its JSON form. `vision` and `decoder` must be given with their sizes (see REQUIRED)."""
        _check_unknown(cls, data, "config")  # a misspelt key first: it is often why a size looks missing
        for section, keys in REQUIRED.items():
            part = data.get(section)
            if part is None:
                raise ConfigError(f"config has no {section!r} section; a checkpoint's config.json must give the "
                                  f"{section}'s sizes ({', '.join(keys)}); the 8b defaults are never assumed "
                                  "(for the 8b shape use preset('8b'))")
            missing = [k for k in keys if isinstance(part, dict) and k not in part]
            if missing:
                raise ConfigError(f"config.{section} has no {', '.join(map(repr, missing))}; a checkpoint's "
                                  f"config.json must give the {section}'s sizes ({', '.join(keys)})")
        return _build(cls, data, "config")

    @classmethod
    def from_json(cls, path: str | Path) -> "PDLMConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"cannot read config {path}: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config {path} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "PDLMConfig":
        return dataclasses.replace(self, **changes)


# Sections of a JSON config, and the sizes in them, that must be given: their defaults are the 8b shape.
REQUIRED = {
    "vision": ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads"),
    "decoder": ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size"),
}

# Value ranges: (section, field) -> (lowest, highest, whether the lowest is allowed); ints and floats alike.
# Fields not listed only have their type checked.
_RANGES: dict[tuple[str, str], tuple[float, float, bool]] = {
    **{("vision", k): (1, math.inf, True) for k in ("image_size", "patch_size", "hidden_size", "intermediate_size",
                                                   "num_hidden_layers", "num_attention_heads", "max_tiles",
                                                   "unshuffle", "num_patches")},
    ("vision", "layer_norm_eps"): (0, math.inf, False),
    **{("decoder", k): (1, math.inf, True) for k in ("d_model", "n_layers", "n_heads", "mlp_hidden_size",
                                                    "vocab_size", "max_sequence_length")},
    ("decoder", "rope_theta"): (0, math.inf, False),
    ("decoder", "rms_norm_eps"): (0, math.inf, False),
    ("region", "roi_grid"): (1, math.inf, True),
    ("region", "roi_merge"): (1, math.inf, True),
    ("region", "roi_context"): (0, math.inf, True),
    ("region", "max_regions"): (1, math.inf, True),
    ("region", "roi_stem_channels"): (0, math.inf, True),
    ("region", "roi_shape_hidden"): (0, math.inf, True),
    ("region", "size_log_base_px"): (0, math.inf, True),
    ("decoding", "caption_len"): (1, math.inf, True),
    ("decoding", "threshold"): (0, 1, False),
    ("decoding", "temperature"): (0, math.inf, True),
}


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether `value` fits the annotation `hint` (JSON's kinds: no bool for a number, int for a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        return len(value) == len(args) and all(_type_ok(v, a) for v, a in zip(value, args))
    return True  # nested sections are checked on their own


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is tuple:
        plural = {int: "integers", float: "finite numbers", str: "strings"}.get(args[0], str(args[0]))
        return f"a list of {plural}" if len(args) == 2 and args[1] is Ellipsis else f"a list of {len(args)} {plural}"
    return {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def _check_fields(cfg: "PDLMConfig") -> None:
    """Types and ranges of every field, before any arithmetic on them can fail with a TypeError or a division by 0."""
    sections = [("", cfg), *((name, getattr(cfg, name)) for name in _NESTED)]
    for name, part in sections:
        if part is None:
            continue
        if name and not isinstance(part, _NESTED[name]):
            raise ConfigError(f"config.{name} must be a {_NESTED[name].__name__} (got {part!r})")
        hints = typing.get_type_hints(type(part))
        for f in dataclasses.fields(part):
            if name == "" and f.name in _NESTED:
                continue
            value, where = getattr(part, f.name), f"config.{name + '.' if name else ''}{f.name}"
            if not _type_ok(value, hints[f.name]):
                raise ConfigError(f"{where} must be {_describe(hints[f.name])} (got {value!r})")
            lo, hi, lo_ok = _RANGES.get((name, f.name), (-math.inf, math.inf, True))
            if isinstance(value, (int, float)) and not isinstance(value, bool) and not (
                    (value >= lo if lo_ok else value > lo) and value <= hi):
                bound = (f">= {lo}" if lo_ok else f"> {lo}") + ("" if hi == math.inf else f" and <= {hi}")
                raise ConfigError(f"{where} must be {bound} (got {value!r})")
    v = cfg.vision
    if v.hidden_size % v.num_attention_heads:
        raise ConfigError(f"vision.hidden_size must be divisible by num_attention_heads (got {v.hidden_size} and "
                          f"{v.num_attention_heads})")
    if not -(v.num_hidden_layers + 1) <= v.feature_layer <= v.num_hidden_layers:
        raise ConfigError(f"vision.feature_layer must index the encoder's {v.num_hidden_layers + 1} hidden states "
                          f"(-{v.num_hidden_layers + 1}..{v.num_hidden_layers}; got {v.feature_layer})")
    if min(v.image_std) <= 0:
        raise ConfigError(f"vision.image_std must be positive (got {list(v.image_std)})")
    if v.kind == "siglip2" and math.isqrt(v.num_patches) ** 2 != v.num_patches:
        raise ConfigError(f"vision.num_patches must be a square number (a k x k grid; got {v.num_patches})")


_NESTED = {"vision": VisionConfig, "decoder": DecoderConfig, "region": RegionConfig, "decoding": DecodingConfig,
           "official": OfficialConfig}


def _check_unknown(cls: type, data: dict[str, Any], where: str) -> None:
    """ConfigError naming every key of `data` (and of its sections) that `cls` has no field for."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(hints)}")
    if cls is PDLMConfig:
        for key, sub in _NESTED.items():
            if isinstance(data.get(key), dict):
                _check_unknown(sub, data[key], f"{where}.{key}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    _check_unknown(cls, data, where)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        sub = _NESTED.get(key) if cls is PDLMConfig else None
        if sub is not None and value is None and key == "official":
            pass
        elif sub is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key} must be an object, got {value!r}")
            value = _build(sub, value, f"{where}.{key}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def _tiny() -> PDLMConfig:
    # Vocabulary and special ids match the word-level tokenizer built by pdlm_ros.model.tokenizer.
    from pdlm_ros.model.tokenizer import TINY_SPECIAL_TOKENS, tiny_vocab_size

    return PDLMConfig(
        name="pdlm-tiny",
        vision=VisionConfig(image_size=64, patch_size=4, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, feature_layer=-1, max_tiles=2),
        decoder=DecoderConfig(d_model=160, n_layers=4, n_heads=4, mlp_hidden_size=432, vocab_size=tiny_vocab_size(),
                              rope_theta=10000.0, max_sequence_length=1024),
        region=RegionConfig(roi_grid=16, roi_merge=4, roi_context=0.15, max_regions=8, span_position_embedding=True,
                            span_region_query=True, roi_stem_channels=64, roi_shape_hidden=256,
                            size_log_base_px=32.0),
        # Captions of the scene vocabulary are 5 words: 8 slots hold one plus EOS padding, at a quarter of 32's work.
        decoding=DecodingConfig(caption_len=8, steps=8, threshold=0.9),
        mask_token_id=TINY_SPECIAL_TOKENS.index("<|mdm_mask|>"),
        eos_token_id=TINY_SPECIAL_TOKENS.index("<|endoftext|>"),
        prompt="describe the region .",
    )


def _small() -> PDLMConfig:
    from pdlm_ros.model.tokenizer import TINY_SPECIAL_TOKENS, tiny_vocab_size

    return PDLMConfig(
        name="pdlm-small",
        # The prefix/region token ratio decides what the prefix cache and parallel decoding save, so the vision
        # geometry is the 8b one; only the widths and depths are cut.
        vision=VisionConfig(image_size=384, patch_size=14, hidden_size=256, intermediate_size=1024,
                            num_hidden_layers=4, num_attention_heads=4, max_tiles=4),
        decoder=DecoderConfig(d_model=384, n_layers=4, n_heads=6, mlp_hidden_size=1152, vocab_size=tiny_vocab_size(),
                              rope_theta=10000.0, max_sequence_length=2048),
        region=RegionConfig(roi_grid=8, roi_merge=2, max_regions=16),
        decoding=DecodingConfig(caption_len=32, steps=32, threshold=0.9),
        mask_token_id=TINY_SPECIAL_TOKENS.index("<|mdm_mask|>"),
        eos_token_id=TINY_SPECIAL_TOKENS.index("<|endoftext|>"),
        prompt="describe the region .",
    )


def _8b() -> PDLMConfig:
    return PDLMConfig(name="pdlm-8b")  # the defaults are the real shape


def _official_preset(name: str, vision: VisionConfig, decoder: DecoderConfig, official: OfficialConfig,
                     caption_len: int = 32) -> PDLMConfig:
    from pdlm_ros.model.tokenizer import TINY_OFFICIAL_SPECIAL_TOKENS, tiny_official_vocab_size

    if decoder.vocab_size == 0:
        decoder = dataclasses.replace(decoder, vocab_size=tiny_official_vocab_size())
    return PDLMConfig(name=name, vision=vision, decoder=decoder,
                      decoding=DecodingConfig(caption_len=caption_len, steps=caption_len),
                      layout="official", official=official,
                      mask_token_id=TINY_OFFICIAL_SPECIAL_TOKENS.index("<|mdm_mask|>"),
                      eos_token_id=TINY_OFFICIAL_SPECIAL_TOKENS.index("<|eot_id|>"))


def _tiny_official() -> PDLMConfig:
    # The tiny decoder under the official rules, with coarse 8 px patches (16 tokens per view, up to 2 tiles and a
    # thumbnail) and 12-token caption spans (scene captions have 6 tokens with EOS): every step recomputes the whole
    # sequence, so it must stay short to train on a CPU.
    return _official_preset(
        "pdlm-tiny-official",
        VisionConfig(image_size=64, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, feature_layer=-2, max_tiles=2),
        DecoderConfig(d_model=160, n_layers=4, n_heads=4, mlp_hidden_size=432, vocab_size=0, rope_theta=10000.0,
                      max_sequence_length=2048),
        OfficialConfig(max_tiles=2, system_prompt="", question="describe the region ."), caption_len=12)


def _small_official() -> PDLMConfig:
    # The released model's geometry (512 px tiles, patch 16, 256 tokens per view, up to 6 tiles and a thumbnail,
    # 16 RoI and 32 caption tokens per mask) with narrow layers, for the CPU benchmark of the official modes.
    return _official_preset(
        "pdlm-small-official",
        VisionConfig(image_size=512, patch_size=16, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, feature_layer=-2, max_tiles=6),
        DecoderConfig(d_model=384, n_layers=4, n_heads=6, mlp_hidden_size=1152, vocab_size=0, rope_theta=500000.0,
                      max_sequence_length=4096),
        OfficialConfig(system_prompt="", question="describe the region ."))


def _8b_official() -> PDLMConfig:
    # The released PerceptionDLM's shapes (random weights; its tokenizer is not bundled): SigLIP-2 so400m/16 at
    # 512 px, LLaDA-8B with its vocabulary plus the added tokens.
    return PDLMConfig(
        name="pdlm-8b-official",
        vision=VisionConfig(image_size=512, patch_size=16, max_tiles=6),
        decoder=DecoderConfig(vocab_size=126490, max_sequence_length=8192),
        decoding=DecodingConfig(caption_len=32, steps=32), layout="official", official=OfficialConfig(),
        mask_token_id=126336, eos_token_id=126348)


PRESETS = {"tiny": _tiny, "small": _small, "8b": _8b, "tiny-official": _tiny_official,
           "small-official": _small_official, "8b-official": _8b_official}


def preset(name: str) -> PDLMConfig:
    """A named configuration: "tiny", "small" or "8b"."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown preset {name!r}{hint}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
