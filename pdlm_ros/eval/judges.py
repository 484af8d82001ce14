"""Judges answer a region's multiple-choice questions from its caption alone.

- `RuleJudge`: offline and exact, for the synthetic questions (closed vocabulary, one word per attribute value).
- `OpenAIJudge`: any OpenAI-compatible chat endpoint (vLLM, llama.cpp server, OpenAI), following DAM's DLC-Bench
  protocol: the same prompt, temperature 0, max_tokens 300, the recognition question first, the reply parsed into a
  choice (with `parse_choice`, stricter than the official heuristics, and retries on replies naming no choice), for
  the synthetic questions. Standard-library HTTP (urllib, `chat_completion`), so evaluation needs no client package.
- The published benchmarks' own protocol pieces, used by `pdlm_ros.eval.published`: `PARADLC_PROMPT`,
  `paradlc_recognition_question`, `format_question_official` and `parse_choice_official` (the official heuristics as
  published, no retries: a reply naming no choice scores 0).

A question is `right` only when its chosen choice carries the question's best score (> 0): the correct value for a
positive, "not mentioned" for a negative. A question the judge could not answer is `failed`, carries the reason, scores
0 and is never right; a failed recognition counts as "not recognised". Nothing fails silently in a caller's favour.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pdlm_ros.data.scenes import ATTRIBUTES
from pdlm_ros.errors import JudgeError
from pdlm_ros.eval.questions import Question

__all__ = [
    "QuestionResult",
    "Judgement",
    "Judge",
    "RuleJudge",
    "OpenAIJudge",
    "refused_judgement",
    "gated_result",
    "failed_result",
    "parse_choice",
    "recognition_question",
    "DLC_PROMPT",
    "PARADLC_PROMPT",
    "format_question",
    "format_question_official",
    "paradlc_recognition_question",
    "parse_choice_official",
    "chat_completion",
    "Retryable",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuestionResult:
    """The judge's answer to one question; `choice` indexes `question.choices` (None when it failed)."""

    question: Question
    choice: int | None
    score: float  # after the recognition gate
    right: bool
    failed: bool = False
    reason: str = ""  # why it failed
    reply: str = ""  # the raw reply of an LLM judge

    @property
    def choice_text(self) -> str:
        return "" if self.choice is None else self.question.choices[self.choice][0]


@dataclass(frozen=True)
class Judgement:
    """All answers about one region's caption. `refused` holds the captioner's error when it refused the region."""

    key: str
    caption: str
    results: list[QuestionResult]
    recognized: bool | None = None  # None when no recognition question was asked
    class_name: str = ""
    refused: str = ""
    recognition_reply: str = ""

    @property
    def failures(self) -> int:
        return sum(r.failed for r in self.results)


class Judge(Protocol):
    """What the harness needs from a judge."""

    name: str

    def describe(self) -> dict[str, str]:
        """name, endpoint and model, for reports."""
        ...

    def check(self) -> None:
        """Raise JudgeError now if the judge cannot work (endpoint down), before any captioning is spent."""
        ...

    def judge(self, caption: str, questions: Sequence[Question], *, key: str = "",
              class_name: str | None = None) -> Judgement:
        ...


def _is_right(score: float, question: Question) -> bool:
    return score > 0 and score == question.best_score


def gated_result(question: Question, choice: int, recognized: bool | None, reply: str = "") -> QuestionResult:
    """The chosen choice's score, capped at 0 when the region's object was not recognised (the recognition gate)."""
    score = float(question.choices[choice][1])
    if recognized is False:  # DLC-Bench: a caption naming the wrong object earns nothing (score at most 0)
        score = min(0.0, score)
    return QuestionResult(question=question, choice=choice, score=score, right=_is_right(score, question), reply=reply)


def failed_result(question: Question, reason: str, reply: str = "") -> QuestionResult:
    """A question without an answer (no parsable choice, or a refused region): scored 0, never right."""
    return QuestionResult(question=question, choice=None, score=0.0, right=False, failed=True, reason=reason,
                          reply=reply)


def refused_judgement(key: str, questions: Sequence[Question], reason: str, class_name: str = "") -> Judgement:
    """A region the captioner refused: every question failed (never right), with the captioner's reason."""
    return Judgement(key=key, caption="", results=[failed_result(q, f"region refused: {reason}") for q in questions],
                     class_name=class_name, refused=reason)


# ------------------------------------------------------------------------------------------------------ rule judge
def _words(text: str) -> str:
    """Lower-case words joined by single spaces and padded, so phrase lookup is `f" {phrase} " in words`."""
    return " " + " ".join(re.findall(r"[a-z]+", text.lower())) + " "


def _names(words: str, phrase: str) -> bool:
    return f" {' '.join(re.findall(r'[a-z]+', phrase.lower()))} " in words


class RuleJudge:
    """Exact judge for the synthetic vocabulary.

    Positive: right if the caption names the target value and no other value of that attribute; naming another value
    is the wrong-attribute choice (-1); naming none is "not mentioned" (0). Negative/interference: avoided if the
    caption does not name the value.
    """

    name = "rule"

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "endpoint": "", "model": "closed-vocabulary word match"}

    def check(self) -> None:
        return None

    def judge(self, caption: str, questions: Sequence[Question], *, key: str = "",
              class_name: str | None = None) -> Judgement:
        words = _words(caption)
        recognized = None if class_name is None else _names(words, class_name)
        results = []
        for q in questions:
            if q.attribute not in ATTRIBUTES or not q.value:
                raise JudgeError(f"the rule judge answers only synthetic attribute questions (got attribute "
                                 f"{q.attribute!r}, question {q.text!r}); use an LLM judge (--judge openai)")
            if q.kind == "positive":
                wrong = any(_names(words, v) for v in ATTRIBUTES[q.attribute] if v != q.value)
                want = -1.0 if wrong else (1.0 if _names(words, q.value) else 0.0)
            else:
                want = -1.0 if _names(words, q.value) else 1.0
            choice = next((i for i, (_, s) in enumerate(q.choices) if s == want), None)
            if choice is None:
                raise JudgeError(f"question {q.text!r} has no choice scored {want}: {q.choices}")
            results.append(gated_result(q, choice, recognized))
        return Judgement(key=key, caption=caption, results=results, recognized=recognized,
                         class_name=class_name or "")


# ------------------------------------------------------------------------------------------------------- LLM judge
# DAM's judge prompt (describe-anything evaluation/eval_model_outputs.py), kept word for word: scores are only
# comparable with published DLC-Bench numbers under the same prompt.
DLC_PROMPT = (
    "Answer the multiple-choice question based on the text description of an object in an image. "
    "You need to follow these rules:\n"
    "1. Do not output any reasoning. Do not perform correction. Please output exactly one answer from the choices "
    "for each question. Do not repeat the question.\n"
    "2. There is no need for exact matching. Please choose the closest option based on the description.\n"
    "\n"
    "The description is:\n"
    "{caption}\n"
    "\n"
    "From the description above, please answer the following question with one of the choices:\n"
    "{question}\n"
)
_LETTERS = "abcde"


def _looks_plural(name: str) -> bool:
    """Rough English plural test (DAM uses the `inflect` package; this covers the common cases without it)."""
    last = name.strip().lower().split(" ")[-1] if name.strip() else ""
    return last.endswith("s") and not last.endswith(("ss", "us", "is", "bus"))


def recognition_question(class_name: str) -> Question:
    """DLC-Bench's first question: does the caption name the right kind of object? Yes -> 1, No -> 0."""
    if _looks_plural(class_name):
        text = (f"Is it likely that the objects in the description are {class_name} or objects of a similar type? "
                "Again, It does not have to be an exact match.")
    else:
        article = "an" if class_name[:1].lower() in "aeiou" else "a"
        text = (f"Is it likely that the object in the description is {article} {class_name} or an object of a "
                "similar type? Again, It does not have to be an exact match.")
    return Question(kind="positive", attribute="", value="", text=text, choices=[("Yes", 1.0), ("No", 0.0)],
                    subtype="recognition")


def format_question(question: Question) -> str:
    lines = [question.text] + [f"{'ABCDE'[i]}. {text}" for i, (text, _) in enumerate(question.choices)]
    return "\n".join(lines)


def parse_choice(reply: str, choices: Sequence[str]) -> int | None:
    """Map a judge reply to a choice index, or None when it names none (DLC-Bench's heuristics, made stricter).

    In order: 1. exact choice text, "x. choice", or the bare letter; 2. the reply inside a choice: the longest such
    choice (so "other than red" is option "a colour other than red", not "red"); 3. exactly one choice text inside the
    reply, ignoring choices nested in another contained one; 4. a leading "x." / "x)"; 5. several contained: the one
    occurring last; 6. a lone leading letter.
    """
    pred = reply.strip().lower().rstrip(".").strip()
    if not pred:
        return None
    opts = [c.strip().lower() for c in choices]
    letters = _LETTERS[:len(opts)]
    for i, c in enumerate(opts):
        if pred in (c, f"{letters[i]}. {c}", letters[i]):
            return i
    inside = [(i, len(c)) for i, c in enumerate(opts) if len(pred) > 1 and pred in c]
    if inside:
        return max(inside, key=lambda f: f[1])[0]
    found = [(i, pred.rfind(c), len(c)) for i, c in enumerate(opts) if c and c in pred]
    found = [f for f in found if not any(f[0] != g[0] and opts[f[0]] in opts[g[0]] for g in found)]
    if len(found) == 1:
        return found[0][0]
    if len(pred) > 1 and pred[0] in letters and pred[1] in ".)":
        return letters.index(pred[0])
    if found:
        last = max(pos for _, pos, _ in found)
        return max((f for f in found if f[1] == last), key=lambda f: f[2])[0]
    if pred[0] in letters and (len(pred) == 1 or pred[1] == "\n"):
        return letters.index(pred[0])
    return None


# ParaDLC-Bench's judge prompt (PerceptionDLM evaluation/ParaDLC-Bench/eval_gpt_with_image.py): DAM's prompt with
# "an object in this image", for a judge that also sees the focal crop and its mask.
PARADLC_PROMPT = DLC_PROMPT.replace("an object in an image.", "an object in this image.", 1)


def format_question_official(question: Question) -> str:
    """The official question block: the question, then "A. choice" lines, stripped as the scripts do."""
    text = f"{question.text}\n" + "".join(f"{'ABCDE'[i]}. {c}\n" for i, (c, _) in enumerate(question.choices))
    return text.strip()


def paradlc_recognition_question(class_name: str) -> Question:
    """ParaDLC-Bench's recognition question (asked with the image). Yes -> recognised, No -> not."""
    text = (f"The object in the image is {class_name}. Based on the image, is it likely that the object in the "
            f"description is given class: {class_name} or object of a similar type?")
    return Question(kind="positive", attribute="", value="", text=text, choices=[("Yes", 1.0), ("No", 0.0)],
                    subtype="recognition")


def parse_choice_official(reply: str, choices: Sequence[str]) -> int | None:
    """The official scripts' `parse_pred`: a judge reply -> choice index, or None (scored 0).

    Order: 1. the reply equals a choice, "x. choice" or the letter x; 2. exactly one choice text occurs in the
    reply; 3. the reply starts with "x."; 4. several occur: the one whose first occurrence starts last (ties: the
    longest); 5. the reply occurs inside choices: the longest such choice; 6. a lone leading letter ("x" or
    "x\n..."). Kept as published, ambiguities included, so scores compare with published ones. One deviation: an
    empty reply names no choice (the ParaDLC script's step 5 matches "" inside every choice and picks the longest;
    the DLC-Bench script crashes on it).
    """
    pred = reply.strip().lower()
    if not pred:
        return None
    letters = _LETTERS[:len(choices)]
    found = []
    for i, choice in enumerate(choices):
        c = choice.strip().lower()
        if pred in (c, f"{letters[i]}. {c}", letters[i]):
            return i
        if c in pred:
            found.append((i, pred.index(c), len(c)))
    if len(found) == 1:
        return found[0][0]
    if len(pred) >= 2 and pred[0] in letters and pred[1] == ".":
        return letters.index(pred[0])
    if found:
        last = max(pos for _, pos, _ in found)
        return max((f for f in found if f[1] == last), key=lambda f: f[2])[0]
    inside = [(i, len(c.strip())) for i, c in enumerate(choices) if pred in c.strip().lower()]
    if inside:
        return max(inside, key=lambda f: f[1])[0]
    if pred[0] in letters and (len(pred) == 1 or pred[1] == "\n"):
        return letters.index(pred[0])
    return None


class Retryable(Exception):
    """A transient failure (connection, timeout, 5xx, 429, unusable body): try again after a pause."""



def chat_completion(base_url: str, model: str, messages: list[dict], *, api_key: str | None = None,
                    timeout: float = 60.0, temperature: float = 0.0, max_tokens: int = 300) -> str:
    """One `POST {base_url}/chat/completions`; the reply's text.

    Raises `Retryable` for what may pass (connection errors, timeouts, HTTP 5xx/408/429, a body that is not a chat
    completion) and JudgeError for what will not (other HTTP 4xx: wrong model name, bad key, a text-only model sent
    images). Sampling settings are those of the DLC-Bench judge scripts.
    """
    url = f"{base_url.rstrip('/')}/chat/completions"
    body = json.dumps({
        "model": model,
        "messages": messages,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "top_p": 1,
        "frequency_penalty": 0,
        "presence_penalty": 0,
    }).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as err:
        detail = err.read()[:300].decode(errors="replace").strip()
        if err.code >= 500 or err.code in (408, 429):
            raise Retryable(f"HTTP {err.code} from {url}: {detail}") from err
        raise JudgeError(f"judge endpoint {url} refused the request with HTTP {err.code}: {detail} "
                         f"(check --judge-model {model!r} and the API key)") from err
    except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError,
            http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        raise Retryable(f"cannot reach {url}: {reason}") from err
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise Retryable(f"unusable response from {url} (not an OpenAI chat completion): {raw[:200]!r}") from err
    if not isinstance(content, str):
        raise Retryable(f"unusable response from {url}: message content is {type(content).__name__}")
    return content


@dataclass
class OpenAIJudge:
    """DLC-Bench judge on an OpenAI-compatible endpoint (`POST {base_url}/chat/completions`).

    `retries` extra attempts per question on connection errors, timeouts, HTTP 5xx/408/429 and replies that name no
    choice, with exponential backoff from `backoff` seconds. Other HTTP 4xx (wrong model name, bad key) raise
    JudgeError at once: every later question would fail the same way. After `max_consecutive_failures` failed
    questions in a row the endpoint is taken to be down and JudgeError is raised.
    """

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 1.0
    max_consecutive_failures: int = 20
    temperature: float = 0.0
    max_tokens: int = 300
    name: str = field(default="openai", init=False)
    _consecutive: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if not re.match(r"^https?://", self.base_url):
            raise JudgeError(f"judge endpoint must be an http(s) URL such as http://127.0.0.1:8000/v1 "
                             f"(got {self.base_url!r})")
        if self.retries < 0 or self.timeout <= 0 or self.backoff < 0:
            raise JudgeError(f"need retries >= 0, timeout > 0, backoff >= 0 (got {self.retries}, {self.timeout}, "
                             f"{self.backoff})")
        self.base_url = self.base_url.rstrip("/")

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "endpoint": self.base_url, "model": self.model}

    # -- transport
    def _post(self, prompt: str, max_tokens: int) -> str:
        return chat_completion(self.base_url, self.model, [{"role": "user", "content": prompt}],
                               api_key=self.api_key, timeout=self.timeout, temperature=self.temperature,
                               max_tokens=max_tokens)

    def _ask(self, question: Question, caption: str) -> tuple[int | None, str, str]:
        """(choice, reply, failure reason) for one question, retrying transient failures and garbage replies."""
        prompt = DLC_PROMPT.format(caption=caption, question=format_question(question))
        texts = [t for t, _ in question.choices]
        reason, reply = "", ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            try:
                reply = self._post(prompt, self.max_tokens)
            except Retryable as err:
                reason = str(err)
                log.warning("judge attempt %d/%d failed: %s", attempt + 1, self.retries + 1, reason)
                continue
            choice = parse_choice(reply, texts)
            if choice is not None:
                return choice, reply, ""
            reason = f"reply names no choice: {reply.strip()[:120]!r}"
            log.warning("judge attempt %d/%d: %s", attempt + 1, self.retries + 1, reason)
        return None, reply, f"{reason} (after {self.retries + 1} attempts)"

    def _track(self, failed: bool, reason: str) -> None:
        self._consecutive = self._consecutive + 1 if failed else 0
        if self._consecutive >= self.max_consecutive_failures:
            self._consecutive = 0
            raise JudgeError(f"judge endpoint {self.base_url} failed {self.max_consecutive_failures} questions in a "
                             f"row; last: {reason}. Is the server still up?")

    def check(self) -> None:
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), 30.0))
            try:
                self._post("Answer with the single letter A.", 1)
                return
            except Retryable as err:
                reason = str(err)
        raise JudgeError(f"judge endpoint {self.base_url} is not answering ({reason}). Start an OpenAI-compatible "
                         f"server there (e.g. `vllm serve {self.model}`) or use --judge rule")

    def judge(self, caption: str, questions: Sequence[Question], *, key: str = "",
              class_name: str | None = None) -> Judgement:
        recognized: bool | None = None
        recognition_reply = ""
        if class_name:
            choice, recognition_reply, reason = self._ask(recognition_question(class_name), caption)
            self._track(choice is None, reason)
            recognized = choice == 0  # a failed recognition counts as "not recognised"
        results = []
        for q in questions:
            choice, reply, reason = self._ask(q, caption)
            self._track(choice is None, reason)
            results.append(failed_result(q, reason, reply) if choice is None
                           else gated_result(q, choice, recognized, reply))
        return Judgement(key=key, caption=caption, results=results, recognized=recognized,
                         class_name=class_name or "", recognition_reply=recognition_reply)

