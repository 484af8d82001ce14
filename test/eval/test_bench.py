"""The benchmark's accounting and schema, on a tiny random model. No timing is asserted anywhere.

NFE, TPF and token counts are checked against the decoding that actually happened: counting wrappers around the
model's forward functions, and direct `Captioner.caption` calls on the same frames.
"""

import json

import pytest
import torch

from pdlm_ros.captioner import Captioner
from pdlm_ros.cli import main
from pdlm_ros.cli.bench import parse_device, parse_int_list, parse_size
from pdlm_ros.errors import ConfigError
from pdlm_ros.eval.bench import (
    BENCH_MODES,
    BenchRow,
    BenchSettings,
    _ratios,
    _regions,
    _targets,
    make_frames,
    measure_step_flops,
    run_bench,
    threshold_check,
)
from pdlm_ros.model.ar_baseline import ARRegionDecoder

FRAME = (160, 96)  # small frames keep the vision cost negligible


@pytest.fixture()
def cap():
    return Captioner.load(preset="tiny", seed=0)


def _counting(fn, counter, key):
    def wrapped(*args, **kwargs):
        counter[key] = counter.get(key, 0) + 1
        return fn(*args, **kwargs)
    return wrapped


# -- the AR baseline -------------------------------------------------------------------------------------------------
def _embeddings(cap, p=12, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, r = cap.config.decoder.d_model, cap.config.region.tokens
    return torch.randn(p, c, generator=g), torch.randn(n, r, c, generator=g)


def test_ar_kv_cache_matches_a_full_causal_recompute(cap):
    """Logits with the KV cache equal those of the whole causal sequence recomputed; greedy picks their argmax."""
    dec = cap.model.decoder
    prefix, roi = _embeddings(cap)
    length, p = 6, prefix.shape[0]
    ar = ARRegionDecoder(dec)
    res = ar.caption_regions(prefix, roi, length)
    assert res.tokens.shape == (3, length)
    with torch.no_grad():
        cache = ar.prefix_cache(prefix, roi.shape[1] + length)
        for k in range(roi.shape[0]):
            cache.length = p
            hidden = [ar.forward(roi[k], cache)[-1]]
            hidden += [ar.forward(dec.wte(res.tokens[k, i].view(1)), cache)[-1] for i in range(length - 1)]
            seq = torch.cat([prefix, roi[k], dec.wte(res.tokens[k, :-1])])
            t = seq.shape[0]
            full = dec.logits(dec.forward_dense(seq, torch.arange(t), torch.ones(t, t, dtype=torch.bool).tril()))
            cached = dec.logits(torch.stack(hidden))
            diff = (cached - full[-length:]).abs().max().item()
            assert diff < 1e-4, f"region {k}: cached vs recomputed logits differ by {diff:.3g}"
            assert torch.equal(full[-length:].argmax(-1), res.tokens[k])


def test_ar_regions_do_not_see_each_other(cap):
    prefix, roi = _embeddings(cap, seed=1)
    ar = ARRegionDecoder(cap.model.decoder)
    together = ar.caption_regions(prefix, roi, 5)
    for k in range(roi.shape[0]):
        alone = ar.caption_regions(prefix, roi[k:k + 1], 5)
        assert torch.equal(alone.tokens[0], together.tokens[k])
    assert together.nfe == 3 * 5 and together.tpf == 1.0


def test_ar_rejects_bad_lengths(cap):
    prefix, roi = _embeddings(cap)
    ar = ARRegionDecoder(cap.model.decoder)
    with pytest.raises(ConfigError, match="caption_len must be >= 1"):
        ar.caption_regions(prefix, roi, 0)
    cache = ar.new_cache(4)
    with pytest.raises(ConfigError, match="KV cache of 4 positions cannot take 12 more"):
        ar.forward(prefix, cache)


# -- the benchmark's accounting --------------------------------------------------------------------------------------
def test_bench_counts_what_the_decoding_did(cap):
    """Per cell: forwards counted by wrappers = repeats x NFE; NFE/tokens/TPF = a direct caption call's stats."""
    counts: dict = {}
    model = cap.model
    model.region_logits = _counting(model.region_logits, counts, "cached")
    model.dense_logits = _counting(model.dense_logits, counts, "dense")
    ar = ARRegionDecoder(model.decoder)
    ar.forward = _counting(ar.forward, counts, "ar")
    settings = BenchSettings(regions=(1, 2), steps=4, repeats=2, warmup=0, max_cell_s=None, frame_size=FRAME,
                             frames=2, flops=False)
    per_cell = {}

    def on_row(row):
        per_cell[row.mode, row.regions] = dict(counts)
        counts.clear()

    report = run_bench(cap, settings, ar=ar, on_row=on_row)
    L = cap.config.decoding.caption_len
    frames = make_frames(2, *FRAME, objects=2)
    for row in report.rows:
        n, used = row.regions, per_cell[row.mode, row.regions]
        assert row.repeats == 2 and row.tokens == n * L, row
        assert row.tpf == pytest.approx(row.tokens / row.nfe)
        if row.mode == "ar":
            assert used == {"ar": 2 * (1 + n * L)}  # per frame: one prefix forward, then L per region
            assert row.nfe == n * L
            continue
        key = "cached" if row.mode in ("parallel", "threshold", "sequential") else "dense"
        assert used == {key: 2 * row.nfe}, row.mode
        direct = [cap.caption(img, _regions(boxes, n), mode=row.mode, steps=4).stats for img, boxes in frames]
        assert all((d.nfe, d.tokens) == (row.nfe, row.tokens) for d in direct), row.mode
    by = {(r.mode, r.regions): r for r in report.rows}
    assert by["parallel", 2].nfe == 4 and by["sequential", 2].nfe == 2 * 4 and by["sequential_nocache", 2].nfe == 8
    assert by["parallel_nocache", 2].nfe == 4 and by["threshold", 1].nfe <= L
    assert report.ratios["threshold_vs_parallel_nfe"][2] == pytest.approx(by["threshold", 2].nfe / 4)


def test_step_flops_count_every_matrix_product(cap):
    frames = make_frames(1, *FRAME, objects=2)
    n = 2
    f = measure_step_flops(cap, *frames[0], n, repeats=1)
    d, L = cap.config.decoder, cap.config.decoding.caption_len
    s = cap.config.region.tokens + L
    t, c, p = n * s, d.d_model, f.prefix_len
    per_layer = 2 * t * (4 * c * c + 3 * c * d.mlp_hidden_size) + 4 * t * (p + s) * c  # linears + QK^T and PV
    assert f.flops == d.n_layers * per_layer + 2 * n * L * c * d.vocab_size
    assert f.fraction == pytest.approx(f.step_flops_per_s / f.matmul_flops_per_s)


def test_threshold_check_accounting(cap):
    check = threshold_check(cap, scenes=1)
    L = cap.config.decoding.caption_len
    assert check.nfe_parallel == L  # a generated scene has <= 8 objects: one pass
    assert 1 <= check.nfe_threshold <= L
    assert check.nfe_ratio == pytest.approx(check.nfe_threshold / L)
    assert check.tpf_per_region == pytest.approx(L / check.nfe_threshold)
    assert 0.0 <= check.same_caption <= 1.0


def _row(mode, n, tps, latency, nfe=32, step=1.0):
    return BenchRow(mode=mode, regions=n, latency_ms=latency, tokens_per_s=tps, nfe=nfe, tpf=n * 32 / nfe,
                    tokens=n * 32, decode_ms=step * nfe, step_ms=step, repeats=1)


def test_ratios_and_targets_follow_the_rows():
    rows = [_row("parallel", 1, 100.0, 300.0, step=2.0), _row("parallel", 4, 600.0, 200.0, step=2.0),
            _row("sequential_nocache", 4, 100.0, 1200.0, nfe=128), _row("parallel_nocache", 4, 50.0, 2400.0, step=8.0),
            _row("threshold", 4, 900.0, 140.0, nfe=12)]
    ratios = _ratios(rows, (1, 4))
    assert ratios["parallel_vs_sequential_nocache"] == {4: 6.0}
    assert ratios["cached_vs_uncached_step"] == {4: 0.25}
    assert ratios["threshold_vs_parallel_nfe"] == {4: 12 / 32}
    assert ratios["parallel_tokens_per_s_vs_n_x_1_region"] == {1: 1.0, 4: 1.5}
    targets = _targets(ratios, rows, None, torch.device("cpu"), 32)
    assert [t.met for t in targets] == [True, True, True]
    gpu = {t.name: t for t in _targets(ratios, rows, None, torch.device("cuda"), 32)}
    assert gpu["parallel latency at 4 regions, 32 steps (ms)"].met is True
    assert gpu["parallel vs sequential throughput at 4 regions"].met is None  # no sequential row: not measured


# -- CLI and JSON schema ---------------------------------------------------------------------------------------------
def test_cli_writes_json_table_and_plot(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(["bench", "--preset", "tiny", "--regions", "1,2", "--steps", "4", "--repeats", "1", "--warmup", "0",
               "--frame-size", "160x96", "--threshold-checkpoint", "none", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert {(r["mode"], r["regions"]) for r in rows} == {(m, n) for m in BENCH_MODES for n in (1, 2)}
    for r in rows:
        assert {"mode", "regions", "latency_ms", "tokens_per_s", "nfe", "tpf"} <= set(r)
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["latency_ms"] * 1000.0)
    assert {"machine", "torch_version", "git_commit", "ratios", "step_flops", "targets", "published"} <= set(doc)
    assert doc["torch_version"] == torch.__version__ and doc["machine"]["device"] == "cpu"
    assert [f["regions"] for f in doc["step_flops"]] == [1, 2]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "sequential_nocache" in table and "targets:" in table


def test_cli_json_to_stdout_keeps_stdout_parseable(capsys):
    rc = main(["bench", "--preset", "tiny", "--regions", "1", "--modes", "parallel,ar", "--steps", "2", "--repeats",
               "1", "--warmup", "0", "--frame-size", "160x96", "--threshold-checkpoint", "none", "--no-flops",
               "--json"])
    assert rc == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert [r["mode"] for r in doc["rows"]] == ["parallel", "ar"] and doc["step_flops"] == []
    assert "latency ms" in captured.err  # the human table goes to stderr


# -- bad input -------------------------------------------------------------------------------------------------------
def test_bad_settings_are_refused_with_the_value():
    with pytest.raises(ConfigError, match="unknown benchmark mode.*fast"):
        BenchSettings(modes=("parallel", "fast"))
    with pytest.raises(ConfigError, match=r"region counts must be >= 1 \(got \[0, 2\]\)"):
        BenchSettings(regions=(0, 2))
    with pytest.raises(ConfigError, match="need repeats >= 1"):
        BenchSettings(repeats=0)
    with pytest.raises(ConfigError, match="--regions must be comma-separated positive integers.*'1,x'"):
        parse_int_list("1,x", "--regions")
    with pytest.raises(ConfigError, match="--frame-size must be WIDTHxHEIGHT.*'big'"):
        parse_size("big")
    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        parse_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is missing")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ConfigError, match="no usable CUDA"):
        parse_device("cuda")


def test_cli_reports_errors_and_exits_1(capsys):
    assert main(["bench", "--preset", "tiny", "--modes", "parallel,warp"]) == 1
    assert "unknown benchmark mode(s) warp" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--checkpoint", "somewhere"]) == 1
    assert "give --preset or --checkpoint, not both" in capsys.readouterr().err
