"""compare-modes and the official-layout benchmark: one run, real captions and timings of every mode."""

from __future__ import annotations

import json

import pytest

from pdlm_ros import Captioner
from pdlm_ros.cli import main
from pdlm_ros.errors import ConfigError
from pdlm_ros.eval.official_bench import run_official_bench
from pdlm_ros.eval.official_modes import compare_modes


@pytest.fixture(scope="module")
def official_cap():
    return Captioner.load(preset="tiny-official", seed=0)


def test_compare_modes_reference_is_identical_to_itself(official_cap):
    report = compare_modes(official_cap, regions=6, grid=[("official", "global"), ("cached", "global")], refresh=1,
                           speed_regions=(1, 2), speed_repeats=1, progress=False)
    rows = {(r.mode, r.sampler): r for r in report.rows}
    assert rows[("official", "global")].identical_to_official == 1.0
    # cached with refresh 1 is the official mode exactly, so its captions are identical too
    assert rows[("cached", "global")].identical_to_official == 1.0
    assert set(rows[("cached", "global")].speed) == {1, 2}
    assert "| cached | global |" in report.table((1, 2))


def test_official_bench_counts_less_decoding_work_for_the_fast_modes(official_cap):
    report = run_official_bench(official_cap, regions=(2,), modes=("official", "isolated", "cached"), repeats=1,
                                warmup=0, frame_size=(160, 120), flops=False)
    work = {r.mode: r.decoded_tokens for r in report.rows}
    nfe = {r.mode: r.nfe for r in report.rows}
    assert nfe["official"] == nfe["isolated"] == nfe["cached"]  # same schedule
    assert work["isolated"] < work["official"] and work["cached"] < work["official"]
    assert set(report.ratios) == {"isolated_vs_official", "cached_vs_official"}


def test_native_checkpoint_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="official checkpoints"):
        run_official_bench(Captioner.load(preset="tiny"), regions=(1,))


def test_bench_cli_runs_official_presets(capsys):
    assert main(["bench", "--preset", "tiny-official", "--regions", "1", "--repeats", "1", "--warmup", "0",
                 "--frame-size", "96x64", "--threshold-checkpoint", "none", "--no-flops", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["mode"] for r in doc["rows"]] == ["official", "isolated", "cached"]
