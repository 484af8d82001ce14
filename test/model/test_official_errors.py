"""Broken official checkpoints: each gives one `error: ...` line naming the problem, and a non-zero exit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pdlm_ros.cli import main

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "official" / "checkpoint"
BUNDLED = Path(__file__).resolve().parents[2] / "pdlm_ros" / "assets" / "default"


@pytest.fixture()
def frame(tmp_path):
    path = tmp_path / "frame.png"
    Image.fromarray(np.full((48, 64, 3), 120, dtype=np.uint8)).save(path)
    return path


def caption(capsys, frame, ckpt) -> tuple[int, list[str]]:
    rc = main(["caption", str(frame), "--box", "4,4,30,30", "--checkpoint", str(ckpt), "--dtype", "float32"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return rc, err


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_official_checkpoint_captions_from_the_cli(capsys, frame):
    rc = main(["caption", str(frame), "--box", "4,4,30,30", "--box", "20,10,60,40", "--checkpoint", str(FIXTURE),
               "--dtype", "float32", "--steps", "4", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert len(doc["regions"]) == 2 and doc["stats"]["nfe"] == 4


def test_missing_special_token(tmp_path, capsys, frame):
    ckpt = copy_of(FIXTURE, tmp_path / "ckpt")
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|Mask_Cap_3|>"]
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    rc, err = caption(capsys, frame, ckpt)
    assert rc != 0 and len(err) == 1
    assert err[0].startswith("error:") and "<|Mask_Cap_3|>" in err[0]


def test_missing_shard(tmp_path, capsys, frame):
    ckpt = copy_of(FIXTURE, tmp_path / "ckpt")
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    rc, err = caption(capsys, frame, ckpt)
    assert rc != 0 and len(err) == 1 and "model-00002-of-00003.safetensors" in err[0] and "missing" in err[0]


def test_pickle_weights_are_refused(tmp_path, capsys, frame):
    ckpt = copy_of(FIXTURE, tmp_path / "ckpt")
    for f in list(ckpt.glob("*.safetensors")) + [ckpt / "model.safetensors.index.json"]:
        f.unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    rc, err = caption(capsys, frame, ckpt)
    assert rc != 0 and len(err) == 1 and "pickle" in err[0] and "pytorch_model.bin" in err[0]


def test_unknown_layout(tmp_path, capsys, frame):
    ckpt = copy_of(BUNDLED, tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["layout"] = "legacy"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    rc, err = caption(capsys, frame, ckpt)
    assert rc != 0 and len(err) == 1 and "unknown layout 'legacy'" in err[0]


def test_shape_mismatch(tmp_path, capsys, frame):
    ckpt = copy_of(FIXTURE, tmp_path / "ckpt")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["language_model_config"]["intermediate_size"] = 48
    (ckpt / "config.json").write_text(json.dumps(cfg))
    rc, err = caption(capsys, frame, ckpt)
    assert rc != 0 and len(err) == 1 and "shape mismatches" in err[0] and "decoder.blocks.0.ff_proj.weight" in err[0]
