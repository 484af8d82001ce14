"""The published benchmarks: official files (committed excerpt), protocol, scoring rules, judge client and a run.

The judge is the local chat server (test/eval/chat_server.py): real HTTP on 127.0.0.1 with scripted replies, the
one stand-in here, for an LLM that cannot run in the tests. Everything else is real: the official annotation files,
pycocotools, the bundled model.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pdlm_ros.errors import DatasetError, JudgeError
from pdlm_ros.eval.dlcbench import DLCBench, ParaDLCBench, open_benchmark, rle_decode
from pdlm_ros.eval.judges import (
    QuestionResult,
    failed_result,
    paradlc_recognition_question,
    parse_choice_official,
    recognition_question,
)
from pdlm_ros.eval.cache import JsonCache
from pdlm_ros.eval.published import (
    PROTOCOLS,
    JudgeClient,
    _region_judgement,
    caption_benchmark,
    focal_crop,
    judge_messages,
    run_benchmark,
)
from pdlm_ros.eval.questions import Question
from pdlm_ros.eval.scoring import benchmark_scores

from .chat_server import ChatServer, chat_reply

FIXTURES = Path(__file__).parent / "fixtures"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _synthetic_images(bench, root: Path) -> Path:
    """Noise images of the annotated sizes, one per image of the benchmark, named as the annotations name them."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for item in bench.items:
        path = root / item.image_file
        if not path.exists():
            Image.fromarray(rng.integers(0, 255, (item.height, item.width, 3), dtype=np.uint8)).save(path, "JPEG")
    return root


# ------------------------------------------------------------------------------------------------ official files
def test_all_299_paradlc_masks_decode_with_the_right_counts_per_image(tmp_path):
    """Every mask of the whole official annotations.json, through the reader (qa/class files naming all 299)."""
    shutil.copy(FIXTURES / "paradlc" / "annotations.json", tmp_path / "annotations.json")
    images = json.loads((tmp_path / "annotations.json").read_text())
    keys = [f"{im['image_id']}_{a['index']}" for im in images for a in im["annotations"]]
    one = next(iter(json.loads((FIXTURES / "paradlc" / "qa.json").read_text()).values()))
    (tmp_path / "qa.json").write_text(json.dumps({k: one for k in keys}))
    (tmp_path / "class_names.json").write_text(json.dumps({k: "thing" for k in keys}))
    bench = ParaDLCBench(tmp_path)
    assert len(bench) == 299 and bench.images == 100
    per_image = Counter(len(items) for _, items in bench.groups())
    assert per_image == {2: 38, 3: 41, 4: 13, 5: 4, 6: 1, 7: 2, 8: 1}  # 2 to 8 masks per image
    counts = {im["image_id"]: len(im["annotations"]) for im in images}
    assert {key: len(items) for key, items in bench.groups()} == counts
    for item in bench.items:
        mask = bench.mask(item)
        assert mask.shape == (item.height, item.width) and mask.dtype == bool
        assert 0 < mask.sum() < mask.size, item.ann_id


def test_paradlc_excerpt_reads_as_the_official_scripts_key_it(tmp_path):
    bench = ParaDLCBench(FIXTURES / "paradlc", tmp_path)
    qa = json.loads((FIXTURES / "paradlc" / "qa.json").read_text())
    assert [it.ann_id for it in bench.items] == list(qa)  # qa.json order
    assert [(k, len(v)) for k, v in bench.groups()] == [("1592560", 3), ("2315970", 3), ("1037636", 5)]
    first = bench.items[0]
    assert first.image_file == "000000404484.jpg" and (first.width, first.height) == (320, 240)
    assert first.class_name == json.loads((FIXTURES / "paradlc" / "class_names.json").read_text())[first.ann_id]
    q = first.questions[0]
    assert q.kind == qa[first.ann_id][0]["type"]
    assert q.choices == [(t, float(s)) for t, s in qa[first.ann_id][0]["choices"]]
    kinds = Counter((q.kind, q.subtype) for it in bench.items for q in it.questions)
    assert set(kinds) == {("positive", ""), ("negative", "negative part"), ("negative", "salient negative")}


def test_dlcbench_excerpt_reads_coco_and_the_images_folder_is_separate(tmp_path):
    bench = open_benchmark("dlcbench", FIXTURES / "dlcbench", tmp_path / "imgs")
    assert isinstance(bench, DLCBench) and len(bench) == 5 and bench.images == 2
    assert all((it.width, it.height) == (1024, 768) for it in bench.items)
    for it in bench.items:
        assert bench.mask(it).any()
    with pytest.raises(DatasetError, match=r"DLC-Bench image missing: .*imgs/objects365_v2_01010195.jpg .*--images"):
        next(bench.frames())
    with pytest.raises(DatasetError, match="must be a list of images .*is this DLC-Bench"):
        ParaDLCBench(FIXTURES / "dlcbench")
    with pytest.raises(DatasetError, match="unknown benchmark 'coco'"):
        open_benchmark("coco", FIXTURES / "dlcbench")


def test_paradlc_reader_errors_name_the_problem(tmp_path):
    for name in ("annotations.json", "qa.json", "class_names.json"):
        shutil.copy(FIXTURES / "paradlc" / name, tmp_path / name)
    qa = json.loads((tmp_path / "qa.json").read_text())
    (tmp_path / "qa.json").write_text(json.dumps({**qa, "1_0": qa[next(iter(qa))]}))
    names = json.loads((tmp_path / "class_names.json").read_text())
    (tmp_path / "class_names.json").write_text(json.dumps({**names, "1_0": "cup"}))
    with pytest.raises(DatasetError, match="qa.json names region 1_0, which annotations.json lacks"):
        ParaDLCBench(tmp_path)
    (tmp_path / "qa.json").write_text("[1, 2")
    with pytest.raises(DatasetError, match="ParaDLC-Bench file .*qa.json is not valid JSON"):
        ParaDLCBench(tmp_path)


# -------------------------------------------------------------------------------------------------- protocol parts
CHOICES = ["The person is standing upright.", "The person is not mentioned.",
           "The person is mentioned but not standing.", "The pose is not mentioned, but the person is mentioned."]


@pytest.mark.parametrize("reply, want", [
    ("A", 0), ("b", 1), (" C. The person is mentioned but not standing. ", 2),  # 1. letter / "x. choice"
    ("the person is not mentioned.", 1),  # 1. the choice itself
    ("I think: The person is standing upright.", 0),  # 2. exactly one choice inside the reply
    ("D. something else", 3),  # 3. a leading "x."
    ("The person is standing upright. The person is not mentioned.", 1),  # 4. several: the later one
    ("standing upright", 0),  # 5. the reply inside a choice
    ("not mentioned", 3),  # 5. ... inside several: the longest choice (as published)
    ("c\nbecause", 2),  # 6. a lone leading letter
    ("E", 3),  # as published: "e" occurs inside choices, so step 5 picks the longest
    ("I cannot tell", None), ("", None), ("   ", None), ("zzz", None),  # nothing: scored 0
])
def test_official_choice_parsing(reply, want):
    assert parse_choice_official(reply, CHOICES) == want


def test_recognition_questions_follow_each_benchmark():
    q = paradlc_recognition_question("tie")
    assert q.text == ("The object in the image is tie. Based on the image, is it likely that the object in the "
                      "description is given class: tie or object of a similar type?")
    assert q.choices == [("Yes", 1.0), ("No", 0.0)]
    # DLC-Bench words it with inflect's plural test and article; the reference was built with inflect itself.
    ref = json.loads((FIXTURES / "dlcbench" / "recognition_reference.json").read_text())["questions"]
    names = set(json.loads((FIXTURES / "dlcbench" / "all_class_names.json").read_text()).values())
    assert set(ref) == names and len(names) == 95
    wrong = {n: recognition_question(n).text for n in names if recognition_question(n).text != ref[n]}
    assert not wrong


def test_focal_crop_is_three_boxes_wide_with_a_56_px_floor():
    image = np.arange(200 * 300 * 3, dtype=np.uint32).reshape(200, 300, 3).astype(np.uint8)
    mask = np.zeros((200, 300), bool)
    mask[50:60, 100:120] = True  # box 20 x 10 -> 56 x 56 about (110, 55): x0 = 82, y0 = 27
    crop, crop_mask = focal_crop(image, mask)
    assert crop.shape == (139, 168, 3) and crop_mask.shape == (139, 168)  # rows 0..139, columns 26..194
    assert np.array_equal(crop, image[0:139, 26:194]) and crop_mask.sum() == mask.sum()
    big = np.zeros((200, 300), bool)
    big[60:140, 100:200] = True  # 100 x 80: window 0..300 x 0..200 clipped
    assert focal_crop(image, big)[0].shape == (200, 300, 3)


def test_judge_requests_have_the_official_layout():
    question = Question(kind="positive", attribute="", value="", text="Which applies?",
                        choices=[("red", 1.0), ("blue", -1.0)])
    text = judge_messages(PROTOCOLS["dlcbench"], "a red cup", question)
    assert text == [{"role": "user", "content": (
        "Answer the multiple-choice question based on the text description of an object in an image. You need to "
        "follow these rules:\n1. Do not output any reasoning. Do not perform correction. Please output exactly one "
        "answer from the choices for each question. Do not repeat the question.\n2. There is no need for exact "
        "matching. Please choose the closest option based on the description.\n\nThe description is:\na red cup\n\n"
        "From the description above, please answer the following question with one of the choices:\nWhich applies?"
        "\nA. red\nB. blue\n")}]
    parts = judge_messages(PROTOCOLS["paradlc"], "a red cup", question, ("AAAA", "BBBB"))[0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
    assert parts[0]["text"] == "The image:\n" and parts[2]["text"] == "\nThe mask of the image:\n"
    assert parts[1]["image_url"]["url"] == "data:image/png;base64,AAAA"
    assert parts[3]["image_url"]["url"] == "data:image/png;base64,BBBB"
    assert parts[4]["text"].startswith("\nAnswer the multiple-choice question based on the text description of an "
                                       "object in this image.")
    assert parts[4]["text"].endswith("A. red\nB. blue\n\n")


# --------------------------------------------------------------------------------------------- scoring, by hand
POS = [("right", 1.0), ("not mentioned", 0.0), ("wrong", -1.0), ("part", 0.5)]
NEG = [("not mentioned", 1.0), ("mentioned", -1.0)]


def _q(kind, choices):
    return Question(kind=kind, attribute="", value="", text=f"{kind}?", choices=list(choices),
                    subtype="" if kind == "positive" else "salient negative")


class _Item:
    def __init__(self, key, questions, class_name="cup"):
        self.ann_id, self.questions, self.class_name = key, questions, class_name


def _judged(key, rec_reply, replies, kinds):
    qs = [_q(k, POS if k == "positive" else NEG) for k in kinds]
    return _region_judgement(_Item(key, qs), "a caption", paradlc_recognition_question("cup"), rec_reply, replies)


def test_scores_follow_the_official_rules_on_hand_worked_regions():
    # r1 recognised: pos (1 + 0.5 - 1) / 3 = 1/6; neg (1 - 1) / 2 = 0
    r1 = _judged("r1", "Yes", ["A", "D", "C", "A", "B"], ["positive"] * 3 + ["negative"] * 2)
    # r2 not recognised, so every score is capped at 0: pos (min(0,1) + min(0,-1)) / 2 = -1/2; neg (0 + -1) / 2
    r2 = _judged("r2", "No", ["A", "C", "A", "B"], ["positive", "positive", "negative", "negative"])
    # r3 recognised, no negatives (left out of Neg); a reply naming no choice scores 0: pos (1 + 0) / 2
    r3 = _judged("r3", "Yes.", ["right", "I cannot tell"], ["positive", "positive"])
    assert [r.score for r in r1.results] == [1.0, 0.5, -1.0, 1.0, -1.0]
    assert [r.score for r in r2.results] == [0.0, -1.0, 0.0, -1.0]
    assert r3.results[1].failed and r3.results[1].score == 0.0
    s = benchmark_scores([r1, r2, r3])
    pos = (1 / 6 - 1 / 2 + 1 / 2) / 3
    neg = (0.0 - 1 / 2) / 2
    assert s.pos == pytest.approx(100 * pos) and s.neg == pytest.approx(100 * neg)
    assert s.avg == pytest.approx(100 * (pos + neg) / 2)
    assert (s.regions, s.regions_with_negatives, s.recognized, s.parse_failures) == (3, 2, 2, 1)


def test_the_recognition_gate_and_negative_scores_move_the_numbers():
    """Guards for the two rules a reimplementation most easily loses: the same answers with the gate open score
    higher, and a mentioned negative costs a point (-1), not just its credit."""
    kinds = ["positive", "positive", "negative"]
    gated = benchmark_scores([_judged("k", "No", ["A", "D", "A"], kinds)])
    open_ = benchmark_scores([_judged("k", "Yes", ["A", "D", "A"], kinds)])
    assert (gated.pos, gated.neg) == (0.0, 0.0)
    assert (open_.pos, open_.neg) == (75.0, 100.0)
    mentioned = benchmark_scores([_judged("k", "Yes", ["B", "B", "B"], kinds)])
    assert mentioned.neg == -100.0 and mentioned.avg == -50.0
    # an unparsable recognition reply is "not recognised" (the official script would stop)
    assert _judged("k", "Maybe?", ["A"], ["positive"]).recognized is False


def test_refused_regions_score_zero_without_judging():
    from pdlm_ros.eval.judges import refused_judgement

    qs = [_q("positive", POS), _q("negative", NEG)]
    s = benchmark_scores([refused_judgement("r", qs, "empty mask"), _judged("k", "Yes", ["A", "A"],
                                                                           ["positive", "negative"])])
    assert (s.pos, s.neg, s.refused, s.parse_failures) == (50.0, 50.0, 1, 0)
    with pytest.raises(DatasetError, match="no judged regions"):
        benchmark_scores([])


def test_failed_results_are_zero_and_never_right():
    r: QuestionResult = failed_result(_q("positive", POS), "reply names no choice")
    assert (r.score, r.right, r.failed) == (0.0, False, True)


# ---------------------------------------------------------------------------------------------------- judge client
def _client(url, **kw):
    kw.setdefault("backoff", 0.0)
    return JudgeClient(base_url=url, model="judge", **kw)


def test_unreachable_and_garbage_endpoints_are_clear_errors():
    with pytest.raises(JudgeError, match="failed 2 attempts: cannot reach"):
        _client(f"http://127.0.0.1:{_free_port()}/v1", retries=1).check(PROTOCOLS["dlcbench"])
    srv = ChatServer(lambda n, body: (200, b"<html>proxy login</html>"))
    try:
        with pytest.raises(JudgeError, match="not an OpenAI chat completion"):
            _client(srv.url, retries=1).check(PROTOCOLS["dlcbench"])
        assert len(srv.requests) == 2
    finally:
        srv.close()
    text_only = ChatServer(lambda n, body: (400, {"error": "model does not support images"})
                           if isinstance(body["messages"][0]["content"], list) else (200, chat_reply("A")))
    try:
        _client(text_only.url).check(PROTOCOLS["dlcbench"])
        with pytest.raises(JudgeError, match="HTTP 400: .*support images"):
            _client(text_only.url).check(PROTOCOLS["paradlc"])
    finally:
        text_only.close()
    with pytest.raises(JudgeError, match="http"):
        _client("127.0.0.1:8000")


def test_retries_back_off_then_succeed_and_the_call_limit_is_hard():
    srv = ChatServer(lambda n, body: (503, {"error": "loading"}) if n <= 2 else (200, chat_reply("A")))
    try:
        client = _client(srv.url, retries=2, backoff=0.05)
        t0 = time.perf_counter()
        assert client.ask([{"role": "user", "content": "q"}]) == "A"
        assert time.perf_counter() - t0 >= 0.05 + 0.1  # backoff 0.05 s, then 0.1 s
        assert client.calls == 3 == len(srv.requests)
        limited = _client(srv.url, max_calls=2)
        limited.ask([{"role": "user", "content": "1"}])
        limited.ask([{"role": "user", "content": "2"}])
        with pytest.raises(JudgeError, match="call limit of 2 reached.*--max-judge-calls"):
            limited.ask([{"role": "user", "content": "3"}])
        assert len(srv.requests) == 3 + 2
    finally:
        srv.close()


def test_cache_is_atomic_and_refuses_a_foreign_or_damaged_file(tmp_path):
    path = tmp_path / "c.json"
    cache = JsonCache(path, {"run": 1}, every=2)
    cache.put("a", 1)
    assert not path.exists()  # written every 2 updates
    cache.put("b", 2)
    assert json.loads(path.read_text()) == {"meta": {"run": 1}, "entries": {"a": 1, "b": 2}}
    cache.put("c", 3)
    cache.flush()
    assert JsonCache(path, {"run": 1}).data == {"a": 1, "b": 2, "c": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temporary file left behind
    with pytest.raises(DatasetError, match="belongs to another run"):
        JsonCache(path, {"run": 2})
    path.write_text('{"meta": {"run": 1}, "entr')
    with pytest.raises(DatasetError, match="is damaged .*delete it"):
        JsonCache(path, {"run": 1})


# -------------------------------------------------------------------------------------------------- whole runs
class Recorder:
    """Passes calls through to the real captioner and keeps what went in; can stop the run at a given call."""

    def __init__(self, captioner, stop_at=None):
        self.captioner, self.name, self.config = captioner, captioner.name, captioner.config
        self.resolve_mode = captioner.resolve_mode
        self.calls, self.stop_at = [], stop_at

    def caption(self, image, regions, **kw):
        if self.stop_at is not None and len(self.calls) + 1 == self.stop_at:
            raise KeyboardInterrupt
        result = self.captioner.caption(image, regions, **kw)
        self.calls.append({"image": image, "regions": list(regions), "kw": kw, "result": result})
        return result


_CLASS = re.compile(r"(?:given class: |is an? |are )(.+?) or (?:an )?objects? of a similar type")


class ScriptedJudge:
    """A judge policy on the local server: "No" to the recognition question of `unknown` classes, "Yes"
    otherwise; "B" to every other question, except "I cannot tell" where a choice reads `unsure`. It counts
    requests in flight to check the concurrency bound."""

    def __init__(self, unknown=(), unsure="", delay=0.0):
        self.unknown, self.unsure, self.delay = set(unknown), unsure, delay
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0

    def __call__(self, n, body):
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            content = body["messages"][0]["content"]
            text = content if isinstance(content, str) else content[-1]["text"] if len(content) > 2 else ""
            match = _CLASS.search(text)
            if match:
                return 200, chat_reply("No" if match.group(1) in self.unknown else "Yes")
            if self.unsure and f". {self.unsure}\n" in text:
                return 200, chat_reply("I cannot tell")
            return 200, chat_reply("B")
        finally:
            with self.lock:
                self.in_flight -= 1


def _expected(bench, unknown, unsure):
    """Pos / Neg under ScriptedJudge, straight from qa.json's choice lists (choice B = index 1)."""
    pos, neg = [], []
    for it in bench.items:
        gate = it.class_name in unknown
        scores = {"positive": [], "negative": []}
        for q in it.questions:
            s = 0.0 if any(c == unsure for c, _ in q.choices) else q.choices[1][1]
            scores[q.kind].append(min(0.0, s) if gate else s)
        pos.append(sum(scores["positive"]) / len(scores["positive"]))
        if scores["negative"]:
            neg.append(sum(scores["negative"]) / len(scores["negative"]))
    return 100 * sum(pos) / len(pos), 100 * sum(neg) / len(neg)


@pytest.fixture(scope="module")
def bundled():
    from pdlm_ros.captioner import Captioner

    return Captioner.load()


def test_paradlc_run_end_to_end_with_the_bundled_model(bundled, tmp_path):
    bench = ParaDLCBench(FIXTURES / "paradlc", tmp_path / "images")
    _synthetic_images(bench, tmp_path / "images")
    unknown = {bench.items[0].class_name, bench.items[5].class_name}
    unsure = bench.items[2].questions[0].choices[0][0]
    policy = ScriptedJudge(unknown, unsure, delay=0.01)
    srv = ChatServer(policy)
    rec = Recorder(bundled)
    try:
        client = _client(srv.url, concurrency=3)
        report = run_benchmark(rec, bench, client, model_id="bundled", steps=8, cache_dir=tmp_path / "cache")
    finally:
        srv.close()
    # one caption call per image (the tiny model takes 8 regions a pass), masks largest first
    assert [len(c["regions"]) for c in rec.calls] == [3, 3, 5]
    for call in rec.calls:
        areas = [int(r.mask.sum()) for r in call["regions"]]
        assert areas == sorted(areas, reverse=True)
        assert call["kw"] == {"mode": "parallel", "steps": 8}
    captions = {r.region_id: r.caption for c in rec.calls for r in c["result"].regions}
    assert [j.caption for j in report.judgements] == [captions[it.ann_id] for it in bench.items]
    assert all(captions.values())
    # every judge request: the check, then recognition + questions per region, each with the crop and its mask
    n_questions = sum(len(it.questions) + 1 for it in bench.items)
    assert len(srv.requests) == 1 + n_questions == report.judge_calls
    assert 2 <= policy.max_in_flight <= 3
    views = {it.ann_id: focal_crop(bench.load_image(it), bench.mask(it)) for it in bench.items}
    seen: Counter = Counter()
    for request in srv.requests[1:]:
        parts = request["body"]["messages"][0]["content"]
        crop, crop_mask = (np.asarray(Image.open(io.BytesIO(base64.b64decode(parts[i]["image_url"]["url"].split(
            ",", 1)[1])))) for i in (1, 3))
        seen.update(k for k, (c, m) in views.items() if np.array_equal(crop, c) and np.array_equal(crop_mask > 0, m))
    assert seen == {it.ann_id: len(it.questions) + 1 for it in bench.items}
    # the scores are the official rule applied to the judge's answers
    pos, neg = _expected(bench, unknown, unsure)
    s = report.scores
    assert s.pos == pytest.approx(pos) and s.neg == pytest.approx(neg) and s.avg == pytest.approx((pos + neg) / 2)
    assert s.recognized == sum(it.class_name not in unknown for it in bench.items)
    assert s.parse_failures == sum(q.choices[0][0] == unsure for it in bench.items for q in it.questions) >= 1
    row = report.table_row()
    assert row["nfe_total"] == sum(c["result"].stats.nfe for c in rec.calls) == report.captions.nfe
    assert row["tpf"] == pytest.approx(report.captions.tokens / report.captions.nfe, abs=0.01)
    assert report.captions.passes == 3 and row["time_s"] >= 0

    # the same run again: captions and answers come from the caches (only the endpoint check is sent)
    srv = ChatServer(ScriptedJudge(unknown, unsure))
    again = Recorder(bundled)
    try:
        second = run_benchmark(again, bench, _client(srv.url), model_id="bundled", steps=8,
                               cache_dir=tmp_path / "cache")
    finally:
        srv.close()
    assert again.calls == [] and len(srv.requests) == 1
    assert second.scores == report.scores and second.captions.cached_images == 3
    assert second.captions.seconds == pytest.approx(report.captions.seconds)


def test_a_run_stopped_midway_continues_where_it_stopped(bundled, tmp_path):
    bench = DLCBench(FIXTURES / "dlcbench", tmp_path / "images")
    _synthetic_images(bench, tmp_path / "images")
    # Ctrl-C while captioning the second image: the first image's captions are kept
    with pytest.raises(KeyboardInterrupt):
        caption_benchmark(Recorder(bundled, stop_at=2), bench, steps=2,
                          cache=JsonCache(tmp_path / "captions.json", {"m": 1}))
    rec = Recorder(bundled)
    captions = caption_benchmark(rec, bench, steps=2, cache=JsonCache(tmp_path / "captions.json", {"m": 1}))
    assert len(rec.calls) == 1 and captions.cached_images == 1 and len(captions.captions) == 5

    # the judge goes down after 10 answers: the run stops with JudgeError, the answers so far are kept
    n_questions = sum(len(it.questions) + 1 for it in bench.items)
    policy = ScriptedJudge()
    flaky = ChatServer(lambda n, body: policy(n, body) if n <= 11 else (500, {"error": "down"}))
    try:
        with pytest.raises(JudgeError, match="failed 2 attempts: HTTP 500"):
            run_benchmark(Recorder(bundled), bench, _client(flaky.url, retries=1, concurrency=1), model_id="m",
                          steps=2, cache_dir=tmp_path / "cache")
    finally:
        flaky.close()
    srv = ChatServer(ScriptedJudge())
    try:
        report = run_benchmark(Recorder(bundled), bench, _client(srv.url), model_id="m", steps=2,
                               cache_dir=tmp_path / "cache")
    finally:
        srv.close()
    assert len(srv.requests) == 1 + n_questions - 10  # the check, then only what was not answered
    assert report.captions.passes == 5 and report.masks_per_pass == 1  # DLC-Bench's inference: one mask a pass
    assert report.judge_cached == 10
    # DLC-Bench's judge reads text only
    assert all(isinstance(r["body"]["messages"][0]["content"], str) for r in srv.requests)
    pos, neg = _expected(bench, set(), "")
    assert report.scores.pos == pytest.approx(pos) and report.scores.neg == pytest.approx(neg)


def test_cli_writes_the_table_json_and_html(tmp_path, capsys):
    from pdlm_ros.cli import main

    bench = ParaDLCBench(FIXTURES / "paradlc", tmp_path / "images")
    _synthetic_images(bench, tmp_path / "images")
    srv = ChatServer(ScriptedJudge())
    try:
        rc = main(["eval", "--bench", "paradlc", "--annotations", str(FIXTURES / "paradlc"), "--images",
                   str(tmp_path / "images"), "--judge-url", srv.url, "--judge-model", "judge", "--steps", "4",
                   "--regions", "4", "--out", str(tmp_path / "out")])
    finally:
        srv.close()
    out = capsys.readouterr()
    assert rc == 0, out.err
    for head in ("Method", "Type", "Pos (%)", "Neg (%)", "Avg (%)", "TPF", "NFE / image", "Time (s)"):
        assert head in out.out
    doc = json.loads((tmp_path / "out" / "paradlc-parallel.json").read_text())
    assert doc["benchmark"] == "ParaDLC-Bench" and doc["scores"]["regions"] == 4 and len(doc["regions"]) == 4
    assert set(doc["table"]) == {"method", "type", "pos", "neg", "avg", "tpf", "nfe_per_image", "nfe_total",
                                 "time_s"}
    assert doc["judge"]["model"] == "judge" and doc["judge"]["requests"] == len(srv.requests)
    html = (tmp_path / "out" / "paradlc-parallel.html").read_text()
    assert "Avg (%)" in html and doc["regions"][0]["caption"] in html
    assert sorted(p.name for p in (tmp_path / "out" / "cache").iterdir())[0].startswith("captions-paradlc-parallel-")


def test_cli_refuses_missing_images_and_a_down_judge_before_loading_the_model(tmp_path, capsys):
    from pdlm_ros.cli import main

    rc = main(["eval", "--bench", "paradlc", "--annotations", str(FIXTURES / "paradlc"), "--images",
               str(tmp_path), "--judge-url", "http://127.0.0.1:1/v1", "--judge-model", "m"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: 3 of the 3 ParaDLC-Bench images are missing from") and "--images" in err
    bench = DLCBench(FIXTURES / "dlcbench", tmp_path)
    _synthetic_images(bench, tmp_path)
    rc = main(["eval", "--bench", "dlcbench", "--annotations", str(FIXTURES / "dlcbench"), "--images", str(tmp_path),
               "--judge-url",
               f"http://127.0.0.1:{_free_port()}/v1", "--judge-model", "m", "--judge-retries", "0",
               "--checkpoint", str(tmp_path / "no-such-model")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: judge endpoint") and "cannot reach" in err


def test_passes_follow_the_official_chunking():
    """Chunks of the per-pass count in qa.json order, each sorted largest mask first (ties: request order)."""
    from types import SimpleNamespace

    from pdlm_ros.eval.published import _passes, _per_pass

    masks = [np.ones((1, a), bool) for a in (3, 9, 1, 9, 4, 2, 7, 5)]
    assert _passes(list(range(8)), masks, 6) == [[1, 3, 4, 0, 5, 2], [6, 7]]
    assert _passes(list(range(8)), masks, None) == [[1, 3, 6, 7, 4, 0, 5, 2]]
    native = SimpleNamespace(config=SimpleNamespace(region=SimpleNamespace(max_regions=8), official=None))
    official = SimpleNamespace(config=SimpleNamespace(region=SimpleNamespace(max_regions=16),
                                                      official=SimpleNamespace(prompt_numbers=6)))
    assert (_per_pass(native), _per_pass(official), _per_pass(object())) == (8, 6, None)


def test_the_official_layout_checkpoint_runs_through_the_same_harness(tmp_path):
    """The released checkpoint's layout (a tiny random one with its file layout): `auto` resolves to its own mode,
    passes hold at most its prompt_numbers masks, and the accounting comes from its own stats."""
    from pdlm_ros.captioner import Captioner

    official = Captioner.load(Path(__file__).parents[1] / "fixtures" / "official" / "checkpoint")
    bench = ParaDLCBench(FIXTURES / "paradlc", tmp_path / "images")
    _synthetic_images(bench, tmp_path / "images")
    rec = Recorder(official)
    run = caption_benchmark(rec, bench, steps=2, limit=6)
    assert [len(c["regions"]) for c in rec.calls] == [3, 3]
    assert all(c["kw"]["mode"] == "official" for c in rec.calls)
    assert run.nfe == sum(c["result"].stats.nfe for c in rec.calls) > 0 and len(run.captions) == 6


def test_caption_cache_keys_follow_the_checkpoint_files(tmp_path):
    from pdlm_ros.eval.published import _fingerprint

    (tmp_path / "model.safetensors").write_bytes(b"1234")
    before = _fingerprint(tmp_path)
    assert before == _fingerprint(tmp_path) and _fingerprint(None) == ""
    (tmp_path / "model.safetensors").write_bytes(b"123456")  # retrained: another size
    assert _fingerprint(tmp_path) != before


def test_ctrl_c_while_judging_keeps_the_answers(bundled, tmp_path):
    import os
    import signal

    bench = DLCBench(FIXTURES / "dlcbench", tmp_path / "images")
    _synthetic_images(bench, tmp_path / "images")
    policy = ScriptedJudge()

    def interrupted(n, body):
        if n == 6:  # the check and 4 answers are in: a real SIGINT, as Ctrl-C sends
            os.kill(os.getpid(), signal.SIGINT)
        return policy(n, body)

    srv = ChatServer(interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_benchmark(Recorder(bundled), bench, _client(srv.url, concurrency=1), model_id="m", steps=1,
                          limit=1, cache_dir=tmp_path / "cache")
        answered = len(srv.requests) - 1
        assert answered >= 4
    finally:
        srv.close()
    srv = ChatServer(ScriptedJudge())
    try:
        report = run_benchmark(Recorder(bundled), bench, _client(srv.url), model_id="m", steps=1, limit=1,
                               cache_dir=tmp_path / "cache")
    finally:
        srv.close()
    assert report.judge_cached == answered and len(srv.requests) == 1 + len(bench.items[0].questions) + 1 - answered
