"""The LLM judge: an OpenAI-compatible chat endpoint (a configured one, ``endpoints``), through ``openai``.

Prompts are the benchmarks' own (Video-ChatGPT's five criteria, TempCompass's correctness and caption
prompts, Video-Bench's answer selection). A judgment that cannot be parsed is asked again, up to
``max_attempts`` calls in all; if it still fails the outcome says so (``value is None``) and the caller
counts a failure. Judgments are cached in storage by judge identity + prompt, so a re-run costs nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import openai

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

    def to_json(self) -> dict:
        return {"value": self.value, "attempts": self.attempts, "raw": self.raw, "error": self.error}


class Judge:
    def __init__(
        self,
        client: openai.OpenAI,
        model: str,
        *,
        max_attempts: int = 3,
        cache: ResultCache | None = None,
        identity: str | None = None,
    ) -> None:
        self.client = client
        self.model = model
        self.max_attempts = max_attempts
        self.cache = cache
        self.identity = identity or f"openai:{client.base_url}:{model}"
        self._lock = threading.Lock()
        self.calls = 0  # HTTP requests actually made (tests and the report)

    def _complete(self, messages: list[dict]) -> str:
        with self._lock:
            self.calls += 1
        response = self.client.chat.completions.create(model=self.model, messages=messages, temperature=0)
        return (response.choices[0].message.content or "").strip()

    def ask(self, messages: list[dict], parse: Callable[[str], Any], *, purpose: str) -> Judgment:
        """Call until ``parse`` returns a value (not None) or attempts run out."""
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
                error = f"{type(exc).__name__}: {exc}"
                continue
            value = parse(raw)
            if value is not None:
                judgment = Judgment(value, attempt, raw)
                if self.cache is not None:
                    self.cache.put("judgments", material, judgment.to_json())
                return judgment
            error = f"malformed judgment: {raw[:200]!r}"
        return Judgment(None, self.max_attempts, raw, error)

    # --- the benchmarks' questions to the judge ----------------------------------------------------------
    def score(self, criterion: str, fields: dict[str, str]) -> Judgment:
        """Video-ChatGPT: a 0-5 score for one criterion (consistency takes Q1/Q2/pred1/pred2)."""
        return self.ask(
            prompts.video_chatgpt_messages(criterion, fields), parse_score, purpose=f"vcgpt/{criterion}"
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
        """Video-Bench: which option letter the free-form output means."""
        messages = prompts.videobench_choice_messages(question_with_options, output)
        return self.ask(messages, lambda text: parse_choice(text, letters), purpose="videobench/choice")


def make_judge(
    endpoint: Endpoint,
    *,
    max_attempts: int,
    timeout: float,
    cache: ResultCache | None,
    max_retries: int = 2,
) -> Judge:
    client = openai_client(endpoint, timeout=timeout, max_retries=max_retries)
    return Judge(client, endpoint.model, max_attempts=max_attempts, cache=cache, identity=endpoint.identity)


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
    )
