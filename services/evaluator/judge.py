"""The LLM judge: an OpenAI-compatible chat endpoint (a configured one, ``endpoints``), through ``openai``.

Prompts are the benchmarks' own (Video-ChatGPT's five criteria, TempCompass's correctness and caption
prompts, Video-Bench's answer selection). A judgment that cannot be parsed is asked again, up to
``max_attempts`` calls in all; if it still fails the outcome says so (``value is None``) and the caller
counts a failure. Judgments are cached in storage by judge identity + prompt, so a re-run costs nothing.

Replies are read by the official rule of each benchmark (``videobench_choice_reply``,
``video_chatgpt_score_reply``). With ``lenient`` (``evaluator.lenient_judge_replies``, off by default) a
reply the official rule rejects on every attempt is also read by a forgiving rule (a dict inside other
text, JSON or Python, bracketed letters); that reading goes into ``Judgment.lenient_value`` only, which
the benchmarks report in separate "(lenient)" rows, never in the official ones.
"""

from __future__ import annotations

import ast
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import openai

from dreamframe.errors import described
from services.evaluator.settings import EvaluatorSettings

from . import prompts
from .cache import ResultCache
from .endpoints import Endpoint, openai_client, resolve_judge
from .extract import judge_correct, parse_choice, parse_score, tempcompass_caption_rating
from .request import EndpointSpec


@dataclass(frozen=True)
class Judgment:
    """What the judge decided (None: every attempt was malformed or failed) and how it got there."""

    value: Any
    attempts: int
    raw: str
    error: str | None = None
    cached: bool = False
    # Only with Judge.lenient and value None: what the forgiving rule read from the last reply.
    lenient_value: Any = None

    def to_json(self) -> dict:
        out = {"value": self.value, "attempts": self.attempts, "raw": self.raw, "error": self.error}
        if self.lenient_value is not None:
            out["lenient_value"] = self.lenient_value
        return out


# --- the official reading of a judge's reply ------------------------------------------------------------
VIDEOBENCH_JUDGE_LETTERS = ("A", "B", "C", "D", "E", "F")


def videobench_choice_reply(text: str) -> str | None:
    """PKU-YuanGroup/Video-Bench Step2_chatgpt_judge.py, ``process_file``: the whole reply through
    ``json.loads``, its ``"maximum probability"`` kept only when it is exactly one of A-F (any letter of
    A-F, even one the item does not have: it is then simply wrong). Anything else raises there, nothing is
    saved and the item is asked again on the next run (their README: run Step 2 until every item is
    judged); here: None, asked again up to ``max_attempts``."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    choice = value.get("maximum probability")
    return choice if isinstance(choice, str) and choice in VIDEOBENCH_JUDGE_LETTERS else None


def video_chatgpt_score_reply(text: str) -> float | None:
    """mbzuai-oryx/Video-ChatGPT quantitative_evaluation/evaluate_benchmark_*.py: ``annotate`` keeps
    ``ast.literal_eval(reply)`` (any text around the dict is a SyntaxError: not saved, asked again by
    ``main``'s while loop) and saves it with ``json.dump``; ``main`` averages ``int(result[0]['score'])``
    with no range check (``{'score': 6}`` counts 6, 4.8 counts 4, ``'4'`` counts 4, other keys such as
    ``'pred'`` are ignored). A reply that parses but has no usable ``score`` (not a dict, no key, ``'4.5'``,
    ``'four'``) crashes their averaging; here it is malformed like the rest: None."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(value, dict) or "score" not in value:
        return None
    try:
        json.dumps(value)  # their json.dump of the pair fails on sets, tuple keys, ...
        return float(int(value["score"]))
    except (TypeError, ValueError, OverflowError):
        return None


class Judge:
    def __init__(
        self,
        client: openai.OpenAI,
        model: str,
        *,
        max_attempts: int = 3,
        cache: ResultCache | None = None,
        identity: str | None = None,
        lenient: bool = False,
    ) -> None:
        self.client = client
        self.model = model
        self.max_attempts = max_attempts
        self.lenient = lenient
        self.cache = cache
        self.identity = identity or f"openai:{client.base_url}:{model}"
        self._lock = threading.Lock()
        self.calls = 0  # HTTP requests actually made (tests and the report)

    def _complete(self, messages: list[dict]) -> str:
        with self._lock:
            self.calls += 1
        response = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0)
        return (response.choices[0].message.content or "").strip()

    def ask(
        self,
        messages: list[dict],
        parse: Callable[[str], Any],
        *,
        purpose: str,
        lenient: Callable[[str], Any] | None = None,
    ) -> Judgment:
        """Call until ``parse`` returns a value (not None) or attempts run out; then, with ``self.lenient``,
        the last reply read by ``lenient`` (``Judgment.lenient_value``)."""
        material = {"judge": self.identity, "purpose": purpose, "messages": messages}
        if self.cache is not None:
            hit = self.cache.get("judgments", material)
            if hit is not None:
                return Judgment(hit["value"], hit["attempts"], hit["raw"], None, cached=True)
        raw, error = "", None
        for attempt in range(1, self.max_attempts + 1):
            try:
                raw = self._complete(messages)
            except openai.OpenAIError as exc:
                # The client already retried transport errors; count this attempt and go on.
                error = described(exc)
                continue
            value = parse(raw)
            if value is not None:
                judgment = Judgment(value, attempt, raw)
                if self.cache is not None:
                    self.cache.put("judgments", material, judgment.to_json())
                return judgment
            error = f"malformed judgment: {raw[:200]!r}"
        forgiven = lenient(raw) if self.lenient and lenient is not None and raw else None
        return Judgment(None, self.max_attempts, raw, error, lenient_value=forgiven)

    # --- the benchmarks' questions to the judge ----------------------------------------------------------
    def score(self, criterion: str, fields: dict[str, str]) -> Judgment:
        """Video-ChatGPT: a score for one criterion (consistency takes Q1/Q2/pred1/pred2), read as the
        official scripts read it (``video_chatgpt_score_reply``)."""
        return self.ask(
            prompts.video_chatgpt_messages(criterion, fields),
            video_chatgpt_score_reply,
            purpose=f"vcgpt/{criterion}/official",
            lenient=parse_score,
        )

    def is_correct(self, qtype: str, question: str, answer: str, prediction: str) -> Judgment:
        """TempCompass fallback when its rules fail: "Correct" or "Incorrect"."""
        messages = prompts.tempcompass_judge_messages(qtype, question, answer, prediction)
        return self.ask(messages, judge_correct, purpose=f"tempcompass/{qtype}")

    def answer_from_caption(self, caption: str, mc_question: str, mc_answer: str) -> Judgment:
        """TempCompass captioning: answer the multi-choice question from the caption alone → 1/0."""

        def parse(text: str) -> int | None:
            return tempcompass_caption_rating(text, mc_answer) if text.strip() else None

        return self.ask(
            prompts.tempcompass_caption_messages(caption, mc_question), parse, purpose="tempcompass/cap"
        )

    def map_choice(self, question_with_options: str, output: str, letters: list[str]) -> Judgment:
        """Video-Bench: which option letter the free-form output means (``videobench_choice_reply``;
        ``letters`` only bound the lenient reading)."""
        messages = prompts.videobench_choice_messages(question_with_options, output)
        return self.ask(
            messages,
            videobench_choice_reply,
            purpose="videobench/choice/official",
            lenient=lambda text: parse_choice(text, letters),
        )


def make_judge(
    endpoint: Endpoint,
    *,
    max_attempts: int,
    timeout: float,
    cache: ResultCache | None,
    max_retries: int = 2,
    lenient: bool = False,
) -> Judge:
    client = openai_client(endpoint, timeout=timeout, max_retries=max_retries)
    return Judge(
        client,
        endpoint.model,
        max_attempts=max_attempts,
        cache=cache,
        identity=endpoint.identity,
        lenient=lenient,
    )


def judge_for(spec: EndpointSpec | None, settings: EvaluatorSettings, cache: ResultCache) -> Judge | None:
    """The request's judge (a configured entry, or a caller's URL where allowed), else the server's
    default judge, else none (``endpoints.resolve_judge``)."""
    endpoint = resolve_judge(spec, settings)
    if endpoint is None:
        return None
    return make_judge(
        endpoint,
        max_attempts=settings.judge_max_attempts,
        timeout=settings.judge_timeout_seconds,
        cache=cache,
        max_retries=settings.openai_max_retries,
        lenient=settings.lenient_judge_replies,
    )
