"""The cross-frame benchmark: F frames in one caption_frames call against one frame at a time, in one run."""

import json

import pytest

from pdlm_ros.cli import main
from pdlm_ros.errors import ConfigError
from pdlm_ros.eval.bench import run_cross_frame_bench


def test_rows_ratios_and_exactness(tiny_captioner):
    report = run_cross_frame_bench(tiny_captioner, frames=(1, 2), regions=2, steps=2, repeats=1,
                                   frame_size=(160, 120))
    assert [(r.frames, r.regions, r.passes) for r in report.rows] == [(1, 2, 1), (2, 2, 1)]
    for r in report.rows:
        assert r.identical and r.repeats == 1
        assert r.tokens == r.frames * r.regions * tiny_captioner.config.decoding.caption_len
        assert r.ratio == pytest.approx(r.one_by_one_ms / r.batched_ms)
        assert r.batched_tokens_per_s == pytest.approx(r.tokens / r.batched_ms * 1000.0)
    json.dumps(report.to_dict())
    assert len(report.table().splitlines()) == 3


def test_cli_writes_the_table_and_json(tmp_path, capsys):
    out = tmp_path / "cf.json"
    code = main(["bench", "--preset", "tiny", "--cross-frame", "1,2", "--cross-frame-regions", "2", "--steps", "2",
                 "--repeats", "1", "--frame-size", "160x120", "--threads", "1", "--json", str(out)])
    assert code == 0
    doc = json.loads(out.read_text())
    assert [r["frames"] for r in doc["rows"]] == [1, 2] and all(r["identical"] for r in doc["rows"])
    assert "ratio = batched / one-by-one tokens per second" in capsys.readouterr().out


def test_bad_requests_are_named(tiny_captioner, capsys):
    with pytest.raises(ConfigError, match="frame counts >= 1"):
        run_cross_frame_bench(tiny_captioner, frames=(0,), regions=2)
    assert main(["bench", "--preset", "tiny-official", "--cross-frame", "1,2", "--threads", "1"]) == 1
    assert "--cross-frame needs a native checkpoint" in capsys.readouterr().err
