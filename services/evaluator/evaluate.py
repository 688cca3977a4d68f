"""One evaluation: models × benchmarks (+ style consistency) → report.json, report.md and items.jsonl
under ``reports/<name>/``, with progress streamed as it goes.

Order of work: the request is validated (``validation``); every model is planned and every benchmark
loaded first (``planning``: bad items become per-item errors, a benchmark with no files at all is an
INVALID_ARGUMENT); then one model at a time is run over every item, then keyframe style consistency
(``runner``); the report files are written last, each atomically (``report``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from dreamframe import keys
from dreamframe.logging import get_logger
from dreamframe.progress import Progress, ProgressClock
from dreamframe.storage.base import ObjectStore
from services.evaluator.settings import EvaluatorSettings

from .cache import ResultCache
from .judge import judge_for
from .planning import load_benchmark, plan_model
from .report import build_report, write_report
from .request import EvaluateRequest, EvaluateResult, Score
from .runner import Runner
from .validation import validate

log = get_logger("dreamframe.evaluator")


class Evaluator:
    """Runs EvaluateRequests against one store (tests use it with tiny models and a local judge
    server)."""

    def __init__(
        self,
        store: ObjectStore,
        settings: EvaluatorSettings,
        *,
        model_cache_dir: Path = Path(".dreamframe/models"),
    ) -> None:
        self.store = store
        self.settings = settings
        self.model_cache_dir = Path(model_cache_dir)

    def evaluate(
        self, request: EvaluateRequest, *, should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[Progress | EvaluateResult]:
        validate(request, self.settings)
        started, created = time.monotonic(), datetime.now(UTC).isoformat(timespec="seconds")
        prefix = keys.report_prefix(request.report_name)
        plans = [
            plan_model(i, m, self.store, self.settings, model_cache_dir=self.model_cache_dir)
            for i, m in enumerate(request.models)
        ]
        yield Progress("items", 0, 0, "", 0.0, -1.0, "loading benchmarks")
        benches = [load_benchmark(i, b, self.store, self.settings) for i, b in enumerate(request.benchmarks)]
        cache = ResultCache(self.store, self.settings.cache_prefix, read=not request.ignore_cache)
        needs_judge = any(b.benchmark is not None for b in benches)
        judge = judge_for(request.judge, self.settings, cache) if needs_judge else None
        qa = [b for b in benches if b.benchmark is not None]
        style = [b for b in benches if b.benchmark is None]
        total = sum(len(b.loaded.items) for b in qa) * len(plans) + sum(len(b.stories) for b in style)
        clock = ProgressClock(total, "items")
        runner = Runner(
            self.settings,
            cache=cache,
            judge=judge,
            clock=clock,
            should_stop=should_stop,
            model_cache_dir=self.model_cache_dir,
        )
        for plan in plans:
            yield from runner.run_model(plan, qa)
        for bench in style:
            yield from runner.run_style(bench)

        report = build_report(
            report_name=request.report_name,
            job_id=request.job_id,
            created_at=created,
            duration_seconds=time.monotonic() - started,
            models=[p.run for p in plans],
            benchmarks=[b.run for b in benches],
            judge={"identity": judge.identity, "model": judge.model, "calls": judge.calls} if judge else None,
            cache={"prefix": cache.prefix, "read": cache.read, "hits": cache.hits, "misses": cache.misses},
            options={
                "lenient_answer_matching": self.settings.lenient_answer_matching,
                "lenient_judge_replies": self.settings.lenient_judge_replies,
                "lenient_letter_replies": self.settings.lenient_letter_replies,
            },
        )
        yield clock.progress("", "writing report")
        refs = write_report(self.store, prefix, report, runner.item_lines)
        scores = [
            Score(s["model"], s["benchmark"], s["task"], s["score"], s["items"], s["failures"], s["unit"])
            for s in report["scores"]
            if s["score"] is not None
        ]
        log.info("evaluation done", report=request.report_name, seconds=round(time.monotonic() - started, 2))
        yield EvaluateResult(refs.report_json, refs.report_markdown, refs.items_jsonl, scores, report)
