"""Running an evaluation's work, counted on one progress clock: one model at a time is loaded, asked
every item of every question-answering benchmark (answers come from the cache when present) and its
answers graded on a thread pool (rules, and the judge when one is needed); then keyframe style
consistency. An item that fails (undecodable video, a model or judge error) is recorded and the run
goes on; only cancellation stops it, and then everything answered so far is already in the cache."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from dreamframe.errors import Cancelled, DreamFrameError, InvalidArgument, described
from dreamframe.logging import get_logger
from dreamframe.progress import Progress, ProgressClock
from services.evaluator.settings import EvaluatorSettings

from .benchmarks.base import Asker, Graded
from .cache import ResultCache
from .items import Item, ItemError
from .judge import Judge
from .models import VideoQAModel
from .planning import LoadedBench, PlannedModel
from .report import ModelRun
from .style import embed_story, summarize

log = get_logger("dreamframe.evaluator")
# An endpoint that is down would otherwise fail every item slowly, one by one.
MAX_CONSECUTIVE_MODEL_ERRORS = 10


class Runner:
    """One evaluation's work: results go into the plans' and benchmarks' runs (``ModelRun``,
    ``BenchmarkRun``) and ``item_lines`` (items.jsonl), progress is yielded as it goes."""

    def __init__(
        self,
        settings: EvaluatorSettings,
        *,
        cache: ResultCache,
        judge: Judge | None,
        clock: ProgressClock,
        should_stop: Callable[[], bool],
        model_cache_dir: Path,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.judge = judge
        self.clock = clock
        self.should_stop = should_stop
        self.model_cache_dir = model_cache_dir
        self.scratch = Path(settings.work_dir) / "scratch"
        self.item_lines: list[dict] = []

    # --- question answering -----------------------------------------------------------------------------
    def run_model(self, plan: PlannedModel, qa: list[LoadedBench]) -> Iterator[Progress]:
        """Load the model, run every benchmark with it, close it; a model that cannot load is reported
        on each of its items (the other models still run)."""
        clock, run = self.clock, plan.run
        n_items = sum(len(b.loaded.items) for b in qa)
        yield clock.progress(run.name, f"loading model {run.name}")
        try:
            model = plan.open()
        except Exception as exc:  # noqa: BLE001 - a model that cannot load is reported; the others still run
            reason = exc.message if isinstance(exc, DreamFrameError) else described(exc)
            run.error = f"could not load: {reason}"
            log.warning("model failed to load", model=run.name, error=reason)
            for bench in qa:
                bench.run.scores[run.name] = []
                bench.run.item_errors[run.name] = [
                    ItemError(i.task, i.item_id, run.error) for i in bench.loaded.items
                ]
            clock.advance(n_items)
            yield clock.progress(run.name, run.error)
            return
        try:
            with ThreadPoolExecutor(self.settings.judge_parallel_calls, thread_name_prefix="grade") as pool:
                for bench in qa:
                    yield from self._run_benchmark(model, run, bench, pool)
        finally:
            model.close()

    def _run_benchmark(
        self, model: VideoQAModel, run: ModelRun, bench: LoadedBench, pool: ThreadPoolExecutor
    ) -> Iterator[Progress]:
        benchmark = bench.benchmark
        assert benchmark is not None
        clock, item_lines = self.clock, self.item_lines
        errors: list[ItemError] = []
        graded: list[Graded] = []
        judge_calls = 0
        pending: list[tuple[Item, dict, Future[Graded]]] = []
        consecutive_errors = 0

        def harvest(block: bool) -> Iterator[Progress]:
            nonlocal judge_calls
            while pending and (block or pending[0][2].done()):
                item, answers, future = pending.pop(0)
                try:
                    g = future.result()
                except Exception as exc:  # noqa: BLE001 - a grading error is this item's, not the run's
                    errors.append(ItemError(item.task, item.item_id, f"grading failed: {exc}"))
                    item_lines.append(_line(run.name, bench.run.name, item, answers, None, str(exc)))
                else:
                    graded.append(g)
                    judge_calls += g.judge_calls
                    item_lines.append(_line(run.name, bench.run.name, item, answers, g, None))
                clock.advance()
                yield clock.progress(f"{run.name} · {bench.run.name} · {item.item_id}")

        for item in bench.loaded.items:
            if self.should_stop():
                raise Cancelled("evaluation cancelled; answers so far are cached")
            if consecutive_errors >= MAX_CONSECUTIVE_MODEL_ERRORS:
                errors.append(
                    ItemError(item.task, item.item_id, "skipped: the model failed on every recent item")
                )
                clock.advance()
                continue
            asker = Asker(
                model,
                item,
                cache=self.cache,
                num_frames=run.num_frames,
                max_new_tokens=self.settings.max_new_tokens,
                load_frames=self._frames_loader(item, run.num_frames),
            )
            try:
                answers = benchmark.answer(item, asker)
            except Exception as exc:  # noqa: BLE001 - one bad item (video, model call) never aborts the run
                consecutive_errors += 1
                reason = exc.message if isinstance(exc, DreamFrameError) else described(exc)
                errors.append(ItemError(item.task, item.item_id, reason))
                item_lines.append(_line(run.name, bench.run.name, item, None, None, reason))
                clock.advance()
                yield clock.progress(f"{run.name} · {bench.run.name} · {item.item_id}", reason)
                continue
            consecutive_errors = 0
            run.model_calls += asker.model_calls
            run.answers_cached += int(asker.model_calls == 0)
            pending.append((item, answers, pool.submit(benchmark.grade, item, answers, self.judge)))
            yield from harvest(block=False)
        yield from harvest(block=True)
        bench.run.scores[run.name] = benchmark.summarize(graded)
        bench.run.item_errors[run.name] = errors
        bench.run.judge_calls[run.name] = judge_calls

    def _frames_loader(self, item: Item, num_frames: int) -> Callable:
        def load():
            if item.visual is None:
                raise InvalidArgument("the item's video was not found", field="video")
            return item.visual.load_frames(num_frames, self.scratch)

        return load

    # --- style consistency ------------------------------------------------------------------------------
    def run_style(self, bench: LoadedBench) -> Iterator[Progress]:
        from dreamframe.models.clip_vision import load_clip_vision

        clock = self.clock
        yield clock.progress(bench.run.name, f"loading image encoder {self.settings.image_encoder}")
        encoder = load_clip_vision(
            self.settings.image_encoder,
            cache_dir=self.model_cache_dir,
            device=self.settings.device,
            field="evaluator.image_encoder",
        )
        embedded, errors = [], []
        for label, location in bench.stories:
            if self.should_stop():
                raise Cancelled("evaluation cancelled")
            emb, story_errors = embed_story(encoder, label, location, max_frames=bench.spec.max_items)
            errors += story_errors
            if emb is not None:
                embedded.append((label, emb))
            clock.advance()
            yield clock.progress(f"{bench.run.name} · {label}")
        result = summarize(embedded, errors)
        bench.run.items = sum(s["frames"] for s in result.stories)
        bench.run.load_errors = result.errors
        bench.run.scores[""] = result.rows
        bench.run.extra = {"stories": result.stories, "image_encoder": self.settings.image_encoder}


def _line(
    model: str, benchmark: str, item: Item, answers: dict | None, graded: Graded | None, error: str | None
) -> dict:
    """One line of items.jsonl."""
    line = {
        "model": model,
        "benchmark": benchmark,
        "task": item.task,
        "item_id": item.item_id,
        "answers": answers,
    }
    if graded is not None:
        line.update(
            correct=graded.correct, scores=graded.scores, failures=graded.failures, detail=graded.detail
        )
    if error is not None:
        line["error"] = error
    return line
