"""What a benchmark is to the evaluator: a loader for its files, how a model answers one item (through
an ``Asker`` that caches), how an answer is graded (rules, maybe a judge) and how grades add up."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from ..cache import ResultCache
from ..items import Item, LoadedBenchmark
from ..judge import Judge
from ..models import Choice, PredictionsModel, VideoQAModel
from ..sources import Source

if TYPE_CHECKING:
    from ..settings import EvaluatorSettings


@dataclass(frozen=True)
class Location:
    """A source and a base key (prefix or single file) inside it."""

    source: Source
    base: str

    def join(self, rel: str) -> str:
        return self.source.join(self.base, rel)


@dataclass
class Graded:
    """One item's grade. Accuracy benchmarks set ``correct``; judged ones set ``scores`` (criterion →
    0-5, None where the judge failed). ``failures`` counts answers or judgments that could not be read
    (an unreadable answer is graded wrong, as the benchmarks do, and counted here)."""

    task: str
    correct: bool | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    failures: int = 0
    judge_calls: int = 0
    detail: dict = field(default_factory=dict)
    # The lenient reading's outcome where a benchmark has one (MVBench-style multiple choice): never the
    # score, only the "lenient" column when ``lenient_answer_matching`` is on.
    lenient: bool | None = None


# ScoreRow.extra key of the lenient reading's accuracy (report.py shows it only when asked to).
LENIENT_SCORE = "lenient_score"


@dataclass(frozen=True)
class ScoreRow:
    task: str
    score: float | None
    items: int
    failures: int
    # "accuracy" (0-100), "judge_score" (0-5) or "cosine" (-1..1)
    unit: str = "accuracy"
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {
            "task": self.task,
            "score": self.score,
            "items": self.items,
            "failures": self.failures,
            "unit": self.unit,
        }
        if self.extra:
            out["extra"] = self.extra
        return out


class Asker:
    """A model seen through the answer cache, for one item: frames are decoded only when a call misses."""

    def __init__(
        self,
        model: VideoQAModel,
        item: Item,
        *,
        cache: ResultCache | None,
        num_frames: int,
        max_new_tokens: int,
        load_frames: Callable[[], list[Image.Image]],
    ) -> None:
        self.model = model
        self.item = item
        self.cache = cache
        self.num_frames = num_frames
        self.max_new_tokens = max_new_tokens
        self._load_frames = load_frames
        self._frames: list[Image.Image] | None = None
        self.model_calls = 0
        self.namespace = "answers/" + hashlib.sha256(model.identity.encode()).hexdigest()[:16]

    @property
    def predictions_only(self) -> bool:
        return isinstance(self.model, PredictionsModel)

    def frames(self) -> list[Image.Image]:
        if self._frames is None:
            self._frames = self._load_frames()
        return self._frames

    def _material(self, call: str, **fields: object) -> dict:
        return {
            "model": self.model.identity,
            "item": self.item.identity(),
            "num_frames": self.num_frames,
            "call": call,
            **fields,
        }

    def _cached(self, material: dict, compute: Callable[[], dict]) -> dict:
        if self.cache is not None:
            hit = self.cache.get(self.namespace, material)
            if hit is not None:
                return hit
        value = compute()
        self.model_calls += 1
        if self.cache is not None:
            self.cache.put(self.namespace, material, value)
        return value

    def answer(self, prompt: str, *, prefix: str = "", max_new_tokens: int | None = None) -> str:
        limit = max_new_tokens or self.max_new_tokens
        material = self._material("answer", prompt=prompt, prefix=prefix, max_new_tokens=limit)
        value = self._cached(
            material,
            lambda: {"text": self.model.answer(self.frames(), prompt, prefix=prefix, max_new_tokens=limit)},
        )
        return value["text"]

    def choose(self, prompt: str, candidates: list[str], *, prefix: str) -> Choice:
        material = self._material("choose", prompt=prompt, candidates=candidates, prefix=prefix)
        value = self._cached(
            material, lambda: self.model.choose(self.frames(), prompt, candidates, prefix=prefix).to_json()
        )
        return Choice(value["letter"], value["raw"], value["method"])


class Benchmark(ABC):
    kind: str
    # The judge is required (open answers) rather than a fallback for answers the rules cannot read.
    requires_judge: bool = False

    def for_settings(self, settings: EvaluatorSettings) -> Benchmark:
        """This benchmark as the server's settings configure it (its lenient readings); the shared
        instance when they change nothing."""
        return self

    @abstractmethod
    def load(self, data: Location, videos: Location | None, *, max_items: int) -> LoadedBenchmark: ...

    @abstractmethod
    def answer(self, item: Item, asker: Asker) -> dict:
        """The model's raw outputs for the item (JSON-able)."""

    @abstractmethod
    def grade(self, item: Item, answers: dict, judge: Judge | None) -> Graded: ...

    def summarize(self, graded: list[Graded]) -> list[ScoreRow]:
        """Accuracy per task, then "overall" over all items (MVBench's Avg: correct / total)."""
        return accuracy_rows(graded)


def accuracy_rows(graded: list[Graded], *, overall: str | None = "overall") -> list[ScoreRow]:
    by_task: dict[str, list[Graded]] = defaultdict(list)
    for g in graded:
        by_task[g.task].append(g)
    rows = [_accuracy(task, gs) for task, gs in by_task.items()]
    if overall and graded:
        rows.append(_accuracy(overall, graded))
    return rows


def _accuracy(task: str, graded: list[Graded]) -> ScoreRow:
    correct = sum(1 for g in graded if g.correct)
    extra: dict = {"correct": correct}
    if graded and any(g.lenient is not None for g in graded):
        extra[LENIENT_SCORE] = 100.0 * sum(1 for g in graded if g.lenient) / len(graded)
    return ScoreRow(
        task,
        100.0 * correct / len(graded) if graded else None,
        len(graded),
        sum(g.failures for g in graded),
        extra=extra,
    )


def cap_per_task(items: list[Item], max_items: int) -> list[Item]:
    """The first ``max_items`` items of every task (0: all), in file order."""
    if max_items <= 0:
        return items
    seen: dict[str, int] = defaultdict(int)
    kept = []
    for item in items:
        if seen[item.task] < max_items:
            seen[item.task] += 1
            kept.append(item)
    return kept
