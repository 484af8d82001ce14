"""The evaluation harness and `pdlm-ros eval` with the real tiny captioner (random weights: structure, not accuracy)."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from pdlm_ros.cli import main
from pdlm_ros.data.scenes import ObjectSpec, Scene, generate_scene, render_scene, scene_seeds
from pdlm_ros.errors import ConfigError, DatasetError, JudgeError
from pdlm_ros.eval.harness import evaluate
from pdlm_ros.eval.judges import OpenAIJudge, RuleJudge
from pdlm_ros.eval.questions import build_questions



class Recorder:
    """Passes calls through to the real captioner and keeps what went in and came out."""

    def __init__(self, captioner):
        self.captioner = captioner
        self.name = captioner.name
        self.calls = []

    def caption(self, image, regions, **kw):
        result = self.captioner.caption(image, regions, **kw)
        self.calls.append({"image": image, "regions": list(regions), "kw": kw, "result": result})
        return result


@pytest.fixture(scope="module")
def scenes():
    return [generate_scene(s, min_objects=2, max_objects=3) for s in scene_seeds("heldout", 3)]


@pytest.fixture
def rec(tiny_captioner):
    return Recorder(tiny_captioner)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_call_per_scene_and_the_accounting_comes_from_the_captioner(rec, scenes):
    report = evaluate(rec, scenes, RuleJudge(), steps=1, progress=False, seed=7)
    assert len(rec.calls) == len(scenes)
    for call, scene in zip(rec.calls, scenes):
        assert call["image"] is scene.image
        assert call["kw"]["mode"] == "parallel" and call["kw"]["steps"] == 1
        assert len(call["regions"]) == len(scene.objects)
        for region, obj in zip(call["regions"], scene.objects):
            assert region.box is None and np.array_equal(region.mask, obj.mask)
            assert region.region_id == obj.track_id
    n_regions = sum(len(s.objects) for s in scenes)
    assert report.scores.regions == n_regions and report.frames == len(scenes)
    n_questions = sum(len(build_questions(s, i)) for s in scenes for i in range(len(s.objects)))
    assert report.scores.counts.questions == n_questions
    assert report.nfe == sum(c["result"].stats.nfe for c in rec.calls)
    assert report.tokens == sum(c["result"].stats.tokens for c in rec.calls)
    assert report.tpf == pytest.approx(report.tokens / report.nfe)
    captions = [r.caption for c in rec.calls for r in c["result"].regions]
    assert [j.caption for j in report.judgements] == captions
    d = report.to_dict()
    json.dumps(d)
    for key in ("pos", "neg", "avg", "regions", "tpf", "nfe", "judge", "mode", "region_kind", "per_attribute",
                "interference_neg", "seconds"):
        assert key in d
    assert d["regions"] == n_regions and d["seed"] == 7 and d["judge"]["name"] == "rule"
    assert d["nfe"] == pytest.approx(report.nfe / len(scenes))
    assert set(d["per_attribute"]) == {"shape", "color", "pattern", "size"}
    assert 0.0 <= d["pos"] <= 100.0 and 0.0 <= d["neg"] <= 100.0


def test_boxes_mode_and_limit(rec, scenes):
    report = evaluate(rec, scenes, RuleJudge(), mode="sequential", region_kind="box", steps=1, progress=False,
                      limit=3)
    assert report.scores.regions == 3
    assert [len(c["regions"]) for c in rec.calls] == [len(scenes[0].objects), 3 - len(scenes[0].objects)]
    assert all(c["kw"]["mode"] == "sequential" for c in rec.calls)
    first = rec.calls[0]["regions"][0]
    assert first.mask is None and first.box == scenes[0].objects[0].box
    # Questions still come from the whole scene, including objects cut by the limit.
    assert len(report.judgements[-1].results) == len(build_questions(scenes[1], 0))
    assert report.to_dict()["region_kind"] == "box" and report.to_dict()["mode"] == "sequential"


def test_a_refused_region_keeps_its_questions_as_failures(rec):
    scene = render_scene([
        ObjectSpec("circle", "red", "large", "solid", (30.0, 30.0), 34.0, 0.0, "seen"),
        ObjectSpec("star", "blue", "small", "dotted", (-50.0, -50.0), 18.0, 0.0, "gone"),  # outside: empty mask
    ], 100, 90, 0)
    report = evaluate(rec, [scene], RuleJudge(), steps=1, progress=False)
    assert report.scores.regions == 2 and report.scores.refused == 1
    gone = report.judgements[1]
    assert gone.refused and gone.failures == len(build_questions(scene, 1))
    assert not any(r.right for r in gone.results)
    assert report.judgements[0].refused == ""


def test_a_corrupt_frame_is_refused_and_the_run_goes_on(rec, scenes):
    bad = scenes[1]
    corrupt = Scene(seed=bad.seed, image=np.full(bad.image.shape, np.nan, dtype=np.float32), objects=bad.objects,
                    instance_mask=bad.instance_mask)
    report = evaluate(rec, [scenes[0], corrupt, scenes[2]], RuleJudge(), steps=1, progress=False)
    n = [len(s.objects) for s in scenes]
    assert report.scores.regions == sum(n) and report.frames == 3
    assert report.scores.refused == n[1]
    refused = report.judgements[n[0]:n[0] + n[1]]
    assert all("NaN" in j.refused for j in refused)
    assert all(not j.refused for j in report.judgements[:n[0]] + report.judgements[n[0] + n[1]:])
    assert report.nfe == sum(c["result"].stats.nfe for c in rec.calls)  # the failed call adds nothing


def test_judge_down_fails_before_any_captioning(rec, scenes):
    judge = OpenAIJudge(base_url=f"http://127.0.0.1:{_free_port()}/v1", model="m", retries=0, backoff=0.0)
    with pytest.raises(JudgeError, match="not answering"):
        evaluate(rec, scenes, judge, steps=1, progress=False)
    assert rec.calls == []


def test_empty_dataset_and_bad_options(rec, scenes):
    with pytest.raises(DatasetError, match="empty"):
        evaluate(rec, [], RuleJudge(), steps=1, progress=False)
    with pytest.raises(DatasetError, match=">= 1"):
        evaluate(rec, scenes, RuleJudge(), limit=0, progress=False)
    with pytest.raises(ConfigError, match="unknown region kind 'polygon'"):
        evaluate(rec, scenes, RuleJudge(), region_kind="polygon", progress=False)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------------------ CLI
def test_cli_json_to_stdout(capsys):
    rc = main(["eval", "--preset", "tiny", "--regions", "3", "--steps", "1", "--json"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    d = json.loads(out.out)
    assert d["regions"] == 3 and d["mode"] == "parallel" and d["region_kind"] == "mask"
    assert d["judge"]["name"] == "rule" and d["dataset"] == "synthetic-heldout"
    assert d["nfe"] > 0 and d["tpf"] == pytest.approx(d["tokens"] / d["nfe_total"], abs=1e-3)
    assert set(d["per_attribute"]) == {"shape", "color", "pattern", "size"}


def test_cli_json_file_and_table(tmp_path, capsys):
    path = tmp_path / "report.json"
    rc = main(["eval", "--preset", "tiny", "--regions", "2", "--steps", "1", "--region-kind", "box",
               "--json", str(path), "--details"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    d = json.loads(path.read_text())
    assert d["regions"] == 2 and d["region_kind"] == "box" and len(d["per_region"]) == 2
    assert "Pos" in out.out and "Neg (interference only)" in out.out


@pytest.mark.parametrize("argv, message", [
    (["--preset", "tiny", "--regions", "0"], "--regions must be >= 1"),
    (["--checkpoint", "/nonexistent/model"], "error:"),
    (["--preset", "tiny", "--judge", "openai", "--endpoint", "http://127.0.0.1:{port}/v1", "--judge-retries", "0"],
     "not answering"),
    (["--preset", "tiny", "--bench", "dlcbench", "--annotations", ".", "--judge", "rule"], "judged by an LLM"),
    (["--preset", "tiny", "--bench", "paradlc", "--annotations", "."], "needs --judge-url, --judge-model"),
    (["--preset", "tiny", "--annotations", "."], "belong to --bench"),
])
def test_cli_errors(argv, message, capsys):
    argv = [a.replace("{port}", str(_free_port())) for a in argv]
    rc = main(["eval", *argv])
    err = capsys.readouterr().err
    assert rc == 1
    assert message in err and err.startswith("error:")
