"""Judges: the exact rule judge, reply parsing, and the OpenAI-compatible judge against a real local HTTP server."""

from __future__ import annotations

import json
import re
import socket
import time

import pytest

from pdlm_ros.data.scenes import ATTRIBUTES, ObjectSpec, generate_scene, render_scene
from pdlm_ros.errors import JudgeError
from pdlm_ros.eval.judges import OpenAIJudge, RuleJudge, parse_choice, recognition_question
from pdlm_ros.eval.questions import Question, build_questions

from .chat_server import ChatServer, chat_reply


@pytest.fixture(scope="module")
def scene():
    return render_scene([
        ObjectSpec("circle", "red", "small", "solid", (20.0, 40.0), 18.0, 0.0, "t"),
        ObjectSpec("star", "blue", "large", "striped", (70.0, 40.0), 34.0, 0.0, "o"),
    ], 100, 80, 0)


def _find(results, kind, attribute=None, value=None):
    return [r for r in results if r.question.kind == kind and (attribute is None or r.question.attribute == attribute)
            and (value is None or r.question.value == value)]


# ------------------------------------------------------------------------------------------------------ RuleJudge
def test_rule_judge_gives_full_marks_to_the_true_caption(scene):
    j = RuleJudge().judge("a small solid red circle", build_questions(scene, 0), key="t")
    assert j.key == "t" and j.failures == 0
    assert all(r.right for r in j.results)
    assert {r.score for r in _find(j.results, "positive")} == {1.0}


def test_rule_judge_scores_wrong_missing_and_leaked_attributes(scene):
    qs = build_questions(scene, 0)
    j = RuleJudge().judge("a small blue circle", qs)  # colour leaked from the neighbour, pattern missing
    color = _find(j.results, "positive", "color")[0]
    assert (color.score, color.right, color.choice_text) == (-1.0, False, "a color other than red")
    pattern = _find(j.results, "positive", "pattern")[0]
    assert (pattern.score, pattern.right) == (0.0, False)
    assert _find(j.results, "positive", "shape")[0].right
    leaked = _find(j.results, "interference", "color", "blue")[0]
    assert (leaked.score, leaked.right) == (-1.0, False)
    assert all(r.right for r in _find(j.results, "interference") if r.question.value != "blue")


def test_rule_judge_counts_two_values_of_one_attribute_as_wrong(scene):
    j = RuleJudge().judge("a small solid red blue circle", build_questions(scene, 0))
    assert _find(j.results, "positive", "color")[0].score == -1.0


def test_rule_judge_matches_whole_words_only(scene):
    j = RuleJudge().judge("a smallish solid reddish circle", build_questions(scene, 0))
    assert _find(j.results, "positive", "size")[0].score == 0.0
    assert _find(j.results, "positive", "color")[0].score == 0.0


def test_rule_judge_mentioned_negative_is_not_avoided(scene):
    qs = build_questions(scene, 0)
    neg = _find(RuleJudge().judge("x", qs).results, "negative")[0].question
    j = RuleJudge().judge(f"a small solid red circle {neg.value}", qs)
    r = _find(j.results, "negative", neg.attribute, neg.value)[0]
    assert (r.score, r.right) == (-1.0, False)


def test_rule_judge_recognition_gate_caps_scores_at_zero(scene):
    qs = build_questions(scene, 0)
    j = RuleJudge().judge("a small solid red circle", qs, class_name="hexagon")
    assert j.recognized is False
    assert all(r.score <= 0 and not r.right for r in j.results)
    assert RuleJudge().judge("a small solid red circle", qs, class_name="circle").recognized is True


def test_rule_judge_refuses_free_form_questions():
    q = Question(kind="positive", attribute="", value="", text="Is the cup white?", choices=[("yes", 1.0)])
    with pytest.raises(JudgeError, match="rule judge answers only synthetic attribute questions"):
        RuleJudge().judge("a white cup", [q])


# ---------------------------------------------------------------------------------------------------- parse_choice
@pytest.mark.parametrize("reply, expected", [
    ("red", 0),
    ("A", 0),
    ("b", 1),
    ("B. a color other than red", 1),
    ("A color other than red.", 1),  # contains "red" too: the longer choice wins
    ("The answer is: the color is not mentioned", 2),
    ("C) something", 2),
    ("other than red", 1),  # the reply inside a choice
    ("I refuse", None),
    ("", None),
    ("F", None),
])
def test_parse_choice(reply, expected):
    choices = ["red", "a color other than red", "the color is not mentioned"]
    assert parse_choice(reply, choices) == expected


def test_parse_choice_yes_no():
    choices = ["yes, it says the object is a star", "no, star is not mentioned"]
    assert parse_choice("Yes", choices) == 0
    assert parse_choice("No.", choices) == 1
    assert parse_choice("B", choices) == 1


def test_recognition_question_wording():
    assert "is a cup or an object of a similar type" in recognition_question("cup").text
    assert "is an apple or" in recognition_question("apple").text
    assert "the objects in the description are shoes or objects" in recognition_question("shoes").text
    assert "is a glass or" in recognition_question("glass").text
    assert recognition_question("cup").choices == [("Yes", 1.0), ("No", 0.0)]


# ------------------------------------------------------------------------------------------ a real local LLM server
_NOUNS = {"shape": "shape", "color": "color", "fill pattern": "pattern", "size": "size"}


def oracle(prompt: str) -> str:
    """A stand-in LLM that reads the DLC-Bench prompt like a careful model would, and replies in varied formats."""
    desc = prompt.split("The description is:\n")[1].split("\n\nFrom the description above")[0]
    words = set(re.findall(r"[a-z]+", desc.lower()))
    block = prompt.split("with one of the choices:\n")[1].strip().splitlines()
    choices = [line[3:] for line in block[1:]]
    if choices == ["Yes", "No"]:
        return "Yes" if words & {"circle", "star", "hexagon", "square", "triangle", "cross"} else "No"
    if len(choices) == 3:
        value, noun = choices[0], choices[1][2:].split(" other than ")[0]
        if words & (set(ATTRIBUTES[_NOUNS[noun]]) - {value}):
            return f"B. {choices[1]}"
        return "A" if value in words else choices[2].capitalize()
    value = re.match(r"no, (\w+) is not mentioned", choices[1]).group(1)
    return "Yes" if value in words else "B"


def honest(n, body):
    return 200, chat_reply(oracle(body["messages"][0]["content"]))


@pytest.fixture
def server():
    started = []

    def start(behave):
        s = ChatServer(behave)
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()


def _judge(url, **kw):
    kw.setdefault("retries", 2)
    return OpenAIJudge(base_url=url, model="judge-model", api_key="sk-test", timeout=5.0, backoff=0.0, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_judge_agrees_with_the_rule_judge_on_real_scenes(server):
    srv = server(honest)
    llm, rule = _judge(srv.url), RuleJudge()
    for seed in (3, 4):
        sc = generate_scene(seed, min_objects=2, max_objects=3)
        n = len(sc.objects)
        for i in range(n):
            qs = build_questions(sc, i)
            for caption in (sc.objects[i].caption, sc.objects[(i + 1) % n].caption, "a shape"):
                a, b = llm.judge(caption, qs), rule.judge(caption, qs)
                assert a.failures == 0
                assert [r.choice for r in a.results] == [r.choice for r in b.results], caption
                assert [r.right for r in a.results] == [r.right for r in b.results]


def test_openai_judge_sends_the_dlc_bench_request(server, scene):
    srv = server(honest)
    qs = build_questions(scene, 0)
    j = _judge(srv.url).judge("a small solid red circle", qs, class_name="circle")
    assert j.recognized is True and all(r.right for r in j.results)
    assert len(srv.requests) == len(qs) + 1
    first, second = srv.requests[0], srv.requests[1]
    assert first["path"] == "/v1/chat/completions"
    assert first["auth"] == "Bearer sk-test"
    body = first["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == 300
    prompt = body["messages"][0]["content"]
    assert prompt.startswith("Answer the multiple-choice question based on the text description of an object")
    assert "The description is:\na small solid red circle\n" in prompt
    assert "Is it likely that the object in the description is a circle or an object of a similar type?" in prompt
    assert "A. Yes\nB. No" in prompt
    assert "A. circle\nB. a shape other than circle\nC. the shape is not mentioned" in (
        second["body"]["messages"][0]["content"])


def test_openai_judge_unrecognised_object_scores_at_most_zero(server, scene):
    srv = server(lambda n, body: (200, chat_reply("No" if n == 1 else oracle(body["messages"][0]["content"]))))
    j = _judge(srv.url).judge("a small solid red circle", build_questions(scene, 0), class_name="circle")
    assert j.recognized is False
    assert all(r.score <= 0 and not r.right for r in j.results) and j.failures == 0


def test_openai_judge_garbage_fails_the_question_after_retries(server, scene):
    srv = server(lambda n, body: (200, chat_reply("I would rather not say.")))
    qs = build_questions(scene, 0)[:3]
    j = _judge(srv.url, retries=2).judge("a small solid red circle", qs)
    assert len(srv.requests) == 3 * 3  # 1 try + 2 retries per question
    assert j.failures == 3
    for r in j.results:
        assert r.failed and not r.right and r.score == 0.0 and r.choice is None
        assert "names no choice" in r.reason and "after 3 attempts" in r.reason
        assert r.reply == "I would rather not say."


def test_openai_judge_retries_server_errors_then_succeeds(server, scene):
    srv = server(lambda n, body: (503, {"error": "loading"}) if n <= 2 else honest(n, body))
    qs = build_questions(scene, 0)[:2]
    j = _judge(srv.url, retries=2).judge("a small solid red circle", qs)
    assert j.failures == 0 and all(r.right for r in j.results)
    assert len(srv.requests) == 2 + len(qs)


def test_openai_judge_unusable_body_is_retried_then_failed(server, scene):
    srv = server(lambda n, body: (200, b"<html>proxy error</html>"))
    j = _judge(srv.url, retries=1).judge("a small solid red circle", build_questions(scene, 0)[:1])
    assert j.results[0].failed and "unusable response" in j.results[0].reason
    assert len(srv.requests) == 2


def test_openai_judge_client_error_stops_at_once(server, scene):
    srv = server(lambda n, body: (404, {"error": "model 'judge-model' does not exist"}))
    with pytest.raises(JudgeError, match="HTTP 404.*does not exist"):
        _judge(srv.url).judge("a small solid red circle", build_questions(scene, 0))
    assert len(srv.requests) == 1


def test_openai_judge_down_endpoint(scene):
    url = f"http://127.0.0.1:{_free_port()}/v1"
    judge = _judge(url, retries=1, max_consecutive_failures=100)
    with pytest.raises(JudgeError, match="is not answering .*--judge rule"):
        judge.check()
    j = judge.judge("a small solid red circle", build_questions(scene, 0)[:2])
    assert j.failures == 2 and not any(r.right for r in j.results)
    assert all("cannot reach" in r.reason for r in j.results)
    stopping = _judge(url, retries=0, max_consecutive_failures=3)
    with pytest.raises(JudgeError, match="failed 3 questions in a row"):
        stopping.judge("a small solid red circle", build_questions(scene, 0))


def test_openai_judge_timeout_is_a_failure_not_an_answer(server, scene):
    def slow(n, body):
        time.sleep(1.0)
        return honest(n, body)

    srv = server(slow)
    judge = OpenAIJudge(base_url=srv.url, model="m", timeout=0.2, retries=0, backoff=0.0)
    j = judge.judge("a small solid red circle", build_questions(scene, 0)[:1])
    assert j.results[0].failed and not j.results[0].right


def test_openai_judge_validates_its_settings():
    with pytest.raises(JudgeError, match="http"):
        OpenAIJudge(base_url="127.0.0.1:8000", model="m")
    with pytest.raises(JudgeError, match="retries >= 0"):
        OpenAIJudge(base_url="http://127.0.0.1:1/v1", model="m", retries=-1)
