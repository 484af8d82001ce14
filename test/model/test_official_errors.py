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


def test_replay_takes_an_official_checkpoint(tmp_path, capsys):
    """A sample bag replayed with the official fixture checkpoint: one caption per detection, layout official."""
    from test.replay.conftest import read_bag

    assert main(["make-sample-bag", str(tmp_path / "s"), "--frames", "1", "--storage", "sqlite3",
                 "--size", "96x64"]) == 0
    capsys.readouterr()
    assert main(["replay", str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--checkpoint", str(FIXTURE),
                 "--dtype", "float32", "--steps", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["frames"] == 1 and doc["summary"]["regions"] >= 1
    captions = read_bag(tmp_path / "o" / "bag")["/pdlm/captions"]
    assert len(captions) == 1 and all(c.caption for c in captions[0][1].regions)


@pytest.mark.parametrize("values,mode", [({}, "official"),
                                         ({"decoding.mode": "cached", "decoding.sampler": "span",
                                           "decoding.refresh": 2}, "cached")])
def test_node_takes_an_official_checkpoint(values, mode):
    """The node's `checkpoint` parameter with the official fixture: captions per detection; mode auto -> official,
    and the fast modes' parameters reach the captioner."""
    from pdlm_ros.ros.node_core import NodeCore
    from pdlm_ros.ros.params import NodeParams
    from test.ros.conftest import RecordingOutputs, frame

    out = RecordingOutputs(None)
    node = NodeCore(NodeParams.from_values({"checkpoint": str(FIXTURE), "device": "cpu", "decoding.steps": 2,
                                            "diagnostics.period": 3600.0, **values}), out)
    try:
        node.configure()
        node.activate()
        image, dets = frame(1_000_000_000, [("a", (5.0, 5.0, 40.0, 30.0)), ("b", (50.0, 20.0, 80.0, 60.0))])
        node.on_image(image)
        node.on_detections(dets)
        assert node.wait_idle(timeout=120)
    finally:
        node.shutdown()
    caps = out.on("captions")
    assert len(caps) == 1 and [r.id for r in caps[0].regions] == ["a", "b"]
    assert all(r.caption and not r.error for r in caps[0].regions) and caps[0].nfe == 2
    assert out.on("model_info")[0].decoding_mode == mode
