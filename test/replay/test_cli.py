"""`pdlm-ros make-sample-bag`, `replay` and `demo` through the real CLI entry point (tiny model)."""

from __future__ import annotations

import json

import pytest

from pdlm_ros.cli import main
from test.replay.conftest import read_bag


@pytest.fixture
def sample(tmp_path, capsys):
    assert main(["make-sample-bag", str(tmp_path / "s"), "--frames", "1", "--storage", "sqlite3", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_make_sample_bag_reports_what_it_wrote(tmp_path, sample, capsys):
    assert sample["bag"] == str(tmp_path / "s") and sample["storage"] == "sqlite3" and sample["frames"] == 1
    assert (tmp_path / "s.annotations.json").is_file()
    assert main(["make-sample-bag", str(tmp_path / "s")]) == 1
    assert "exists already" in capsys.readouterr().err
    assert main(["make-sample-bag", str(tmp_path / "r"), "--ros1", "--frames", "1", "--size", "64x48"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'r.bag'} (ros1, 1 frames" in out and "next: pdlm-ros replay" in out
    assert main(["make-sample-bag", str(tmp_path / "q"), "--size", "big"]) == 1
    assert "--size must look like WIDTHxHEIGHT" in capsys.readouterr().err


def test_replay_json_to_stdout_and_table_otherwise(tmp_path, sample, capsys):
    args = ["replay", sample["bag"], "--out", str(tmp_path / "o"), "--preset", "tiny", "--threads", "1",
            "--annotations", sample["annotations"]]
    assert main([*args, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)  # stdout is pure JSON
    assert doc["summary"]["frames"] == 1 and doc["scores"]["regions_scored"] == 3
    assert doc["reports"]["html"] == str(tmp_path / "o" / "report.html")
    assert len(read_bag(tmp_path / "o" / "bag")["/pdlm/captions"]) == 1

    assert main([*args, "--overwrite", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "latency p50 / p95 per frame" in out and "regions per second" in out and "ParaDLC" in out
    assert f"captioned bag: {tmp_path / 'o' / 'bag'}" in out
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["regions"] == 3


def test_replay_errors_are_one_line_and_exit_1(tmp_path, sample, capsys):
    assert main(["replay", sample["bag"], "--out", str(tmp_path / "o"), "--preset", "tiny",
                 "--detections-topic", "/dets"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --detections-topic '/dets' is not in") and "/detections (vision_msgs" in err
    assert main(["replay", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--preset", "tiny"]) == 1
    assert "bag not found" in capsys.readouterr().err
    assert main(["replay", sample["bag"], "--out", str(tmp_path / "o"), "--preset", "tiny",
                 "--annotations", str(tmp_path / "nope.json")]) == 1
    assert "annotations file not found" in capsys.readouterr().err


def test_demo_without_bundled_model_says_so_and_uses_tiny(tmp_path, capsys, monkeypatch):
    import pdlm_ros.captioner

    monkeypatch.setattr(pdlm_ros.captioner, "DEFAULT_CHECKPOINT", tmp_path / "no_model")
    assert main(["demo", "--out", str(tmp_path / "d"), "--frames", "2"]) == 0
    captured = capsys.readouterr()
    assert "bundled default model is missing" in captured.err and "RANDOM" in captured.err
    out = captured.out
    assert "frame 0 (stamp" in out and "track 1 [" in out and "(truth: 'a " in out
    assert "captions above come from a random model" in out
    for line in ("sample bag:", "captioned bag:", "reports:"):
        assert line in out
    assert (tmp_path / "d" / "replay" / "report.html").is_file()
    assert main(["demo", "--out", str(tmp_path / "d"), "--frames", "2", "--preset", "tiny"]) == 0  # reruns cleanly


def test_replay_no_cache_flag(tmp_path, capsys):
    assert main(["make-sample-bag", str(tmp_path / "s"), "--frames", "3", "--json"]) == 0
    bag = json.loads(capsys.readouterr().out)["bag"]
    cached = {}
    for flag in ([], ["--no-cache"]):
        out = tmp_path / ("plain" if not flag else "nocache")
        assert main(["replay", bag, "--out", str(out), "--preset", "tiny", "--threads", "1", "--json", *flag]) == 0
        capsys.readouterr()
        caps = read_bag(out / "bag")["/pdlm/captions"]
        cached[bool(flag)] = sum(r.cached for _, m in caps for r in m.regions)
    assert cached[False] > 0 and cached[True] == 0
