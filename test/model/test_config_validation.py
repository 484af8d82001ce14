"""Config files: a missing section is an error naming it, and every bad value is one ConfigError line quoting it.

The CLI cases load a real checkpoint directory (a copy of the bundled model with one config value changed) through
`pdlm-ros caption`, as a user would, and check the one-line error and the exit code.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from pdlm_ros.captioner import DEFAULT_CHECKPOINT
from pdlm_ros.cli import main
from pdlm_ros.errors import ConfigError
from pdlm_ros.model.config import PRESETS, DecoderConfig, PDLMConfig, VisionConfig, preset

BUNDLED = json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())


def _with(change):
    data = copy.deepcopy(BUNDLED)
    change(data)
    return data


def test_presets_and_the_bundled_config_pass_and_round_trip():
    for name in PRESETS:
        cfg = preset(name)
        assert PDLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    PDLMConfig.from_dict(BUNDLED)


@pytest.mark.parametrize("section", ["decoder", "vision"])
def test_a_missing_size_section_is_an_error_naming_it(section):
    # Before: the section silently took its defaults, the 8b sizes (a 23 GB process for a 7 MB checkpoint).
    with pytest.raises(ConfigError, match=rf"config has no '{section}' section; .*8b defaults are never assumed"):
        PDLMConfig.from_dict(_with(lambda d: d.pop(section)))


def test_a_missing_size_inside_a_section_is_named():
    with pytest.raises(ConfigError, match=r"config.decoder has no 'n_layers', 'vocab_size'"):
        PDLMConfig.from_dict(_with(lambda d: [d["decoder"].pop(k) for k in ("n_layers", "vocab_size")]))


@pytest.mark.parametrize(("section", "key", "value", "message"), [
    ("decoder", "d_model", -160, r"config.decoder.d_model must be >= 1 \(got -160\)"),
    ("decoder", "d_model", "160", r"config.decoder.d_model must be an integer \(got '160'\)"),
    ("decoder", "n_heads", True, r"config.decoder.n_heads must be an integer \(got True\)"),
    ("decoder", "n_layers", 2.5, r"config.decoder.n_layers must be an integer \(got 2.5\)"),
    ("decoder", "rope_theta", 0, r"config.decoder.rope_theta must be > 0 \(got 0\)"),
    ("decoder", "rms_norm_eps", float("nan"), r"config.decoder.rms_norm_eps must be a finite number \(got nan\)"),
    ("decoder", "d_model", 162, r"decoder.d_model must be divisible by n_heads \(got 162 and 4\)"),
    ("vision", "patch_size", 0, r"config.vision.patch_size must be >= 1 \(got 0\)"),
    ("vision", "image_size", -64, r"config.vision.image_size must be >= 1 \(got -64\)"),
    ("vision", "hidden_size", 66, r"vision.hidden_size must be divisible by num_attention_heads \(got 66 and 4\)"),
    ("vision", "feature_layer", 7, r"vision.feature_layer must index the encoder's 3 hidden states \(-3..2; got 7\)"),
    ("vision", "image_mean", [0.5, 0.5], r"config.vision.image_mean must be a list of 3 finite numbers"),
    ("vision", "image_std", [0.5, 0.0, 0.5], r"vision.image_std must be positive \(got \[0.5, 0.0, 0.5\]\)"),
    ("region", "roi_merge", 0, r"config.region.roi_merge must be >= 1 \(got 0\)"),
    ("region", "roi_context", -0.5, r"config.region.roi_context must be >= 0 \(got -0.5\)"),
    ("decoding", "threshold", 1.5, r"config.decoding.threshold must be > 0 and <= 1 \(got 1.5\)"),
    ("decoding", "caption_len", 0, r"config.decoding.caption_len must be >= 1 \(got 0\)"),
])
def test_bad_values_are_one_line_errors_quoting_the_value(section, key, value, message):
    with pytest.raises(ConfigError, match=message) as info:
        PDLMConfig.from_dict(_with(lambda d: d[section].__setitem__(key, value)))
    assert "\n" not in str(info.value)


def test_values_are_checked_in_code_too():
    # Not only JSON: a config built in Python fails the same way before any model is built from it.
    with pytest.raises(ConfigError, match=r"config.vision.patch_size must be >= 1 \(got 0\)"):
        preset("tiny").replace(vision=VisionConfig(patch_size=0))
    with pytest.raises(ConfigError, match=r"config.decoder.vocab_size must be >= 1 \(got -5\)"):
        PDLMConfig(decoder=DecoderConfig(vocab_size=-5))
    with pytest.raises(ConfigError, match=r"config.layout must be a string \(got 1\)"):
        PDLMConfig(layout=1)  # type: ignore[arg-type]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "frame.png"
    Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(path)
    return path


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.pop("decoder"), "config has no 'decoder' section"),
    (lambda d: d["decoder"].update(d_model=-160), "config.decoder.d_model must be >= 1 (got -160)"),
    (lambda d: d["decoder"].update(d_model="160"), "config.decoder.d_model must be an integer (got '160')"),
    (lambda d: d["vision"].update(patch_size=0), "config.vision.patch_size must be >= 1 (got 0)"),
])
def test_cli_prints_one_line_and_exits_1(tmp_path, image, capsys, change, message):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(DEFAULT_CHECKPOINT, ckpt)
    (ckpt / "config.json").write_text(json.dumps(_with(change)))
    assert main(["caption", str(image), "--box", "1,1,30,30", "--checkpoint", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: invalid config in {ckpt}: ") and message in err
    assert "Traceback" not in err
