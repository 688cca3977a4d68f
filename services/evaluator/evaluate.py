"""One evaluation: models × benchmarks (+ style consistency) → report.json, report.md and items.jsonl
under ``reports/<name>/``, with progress streamed as it goes.

Order of work: every benchmark is loaded first (bad items become per-item errors, a benchmark with no
files at all is an INVALID_ARGUMENT); then one model at a time is loaded, asked every item (answers
come from the cache when present) and its answers graded on a thread pool (rules, and the judge when
one is needed); then keyframe style consistency; the report files are written last, each atomically.
An item that fails (undecodable video, a model or judge error) is listed in the report and the run goes
on; only cancellation stops it, and then everything answered so far is already in the cache.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from dreamframe import keys
from dreamframe.errors import Cancelled, DreamFrameError, FailedPrecondition, InvalidArgument, NotFound
from dreamframe.logging import get_logger
from dreamframe.storage.base import ObjectRef, ObjectStore
from services.evaluator.settings import EvaluatorSettings

from .benchmarks import BENCHMARKS, STYLE_CONSISTENCY
from .benchmarks.base import Asker, Benchmark, Graded, Location
from .cache import ResultCache
from .items import Item, ItemError, LoadedBenchmark
from .judge import Judge, make_judge
from .models import (
    PredictionsModel,
    VideoQAModel,
    checkpoint_identity,
    download_checkpoint,
    load_checkpoint_model,
    make_endpoint_model,
)
from .report import BenchmarkRun, ModelRun, build_report, render_markdown
from .sources import open_location
from .style import embed_story, summarize

log = get_logger("dreamframe.evaluator")
# An endpoint that is down would otherwise fail every item slowly, one by one.
MAX_CONSECUTIVE_MODEL_ERRORS = 10


# --- the request, transport-free ---------------------------------------------------------------------------
@dataclass(frozen=True)
class EndpointSpec:
    base_url: str
    model: str
    api_key_env: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """Exactly one of checkpoint_prefix / endpoint / preset, or none: the predictions shipped in the
    benchmark files (Video-ChatGPT's ``pred`` fields)."""

    name: str = ""
    checkpoint_prefix: str = ""
    endpoint: EndpointSpec | None = None
    preset: str = ""
    num_frames: int = 0


@dataclass(frozen=True)
class BenchmarkSpec:
    kind: str
    name: str = ""
    data_prefix: str = ""
    video_prefix: str = ""
    max_items: int = 0
    frame_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvaluateRequest:
    report_name: str
    models: tuple[ModelSpec, ...] = ()
    benchmarks: tuple[BenchmarkSpec, ...] = ()
    job_id: str = ""
    judge: EndpointSpec | None = None
    ignore_cache: bool = False


@dataclass(frozen=True)
class Progress:
    unit: str
    done: int
    total: int
    current_item: str
    elapsed_seconds: float
    eta_seconds: float
    message: str = ""


@dataclass(frozen=True)
class Score:
    model: str
    benchmark: str
    task: str
    score: float
    items: int
    failures: int
    unit: str


@dataclass(frozen=True)
class EvaluateResult:
    report_json: ObjectRef
    report_markdown: ObjectRef
    items_jsonl: ObjectRef
    scores: list[Score]
    report: dict = field(repr=False, compare=False)


# --- validation ---------------------------------------------------------------------------------------------
def _model_source(spec: ModelSpec) -> str:
    return (
        "checkpoint"
        if spec.checkpoint_prefix
        else "endpoint"
        if spec.endpoint
        else "preset"
        if spec.preset
        else ""
    )


def validate(request: EvaluateRequest, settings: EvaluatorSettings) -> None:
    """Reject what can never run, naming the field; everything item-level is reported instead."""
    keys.report_prefix(request.report_name)
    if request.job_id:
        keys.validate_id(request.job_id, field="job_id")
    if not request.benchmarks:
        raise InvalidArgument("at least one benchmark is required", field="benchmarks")
    names = set()
    for i, b in enumerate(request.benchmarks):
        where = f"benchmarks[{i}]"
        if b.kind not in BENCHMARKS and b.kind != STYLE_CONSISTENCY:
            raise InvalidArgument(
                f"unknown benchmark format {b.kind!r}; known: {', '.join([*BENCHMARKS, STYLE_CONSISTENCY])}",
                field=f"{where}.kind",
            )
        name = b.name or b.kind
        if name in names:
            raise InvalidArgument(f"benchmark name {name!r} is used twice", field=f"{where}.name")
        names.add(name)
        if b.max_items < 0:
            raise InvalidArgument("must be >= 0", field=f"{where}.max_items")
        if b.kind == STYLE_CONSISTENCY:
            if not b.frame_prefixes:
                raise InvalidArgument(
                    "style consistency needs one frame prefix per story", field=f"{where}.frame_prefixes"
                )
        elif not b.data_prefix:
            raise InvalidArgument("the benchmark's files are required", field=f"{where}.data_prefix")
    qa = [b for b in request.benchmarks if b.kind != STYLE_CONSISTENCY]
    if qa and not request.models:
        raise InvalidArgument("at least one model is required for question answering", field="models")
    model_names = set()
    for i, m in enumerate(request.models):
        where = f"models[{i}]"
        sources = [bool(m.checkpoint_prefix), m.endpoint is not None, bool(m.preset)]
        if sum(sources) > 1:
            raise InvalidArgument("give one of checkpoint_prefix, endpoint, preset", field=where)
        name = m.name or m.checkpoint_prefix or m.preset or (m.endpoint.model if m.endpoint else "")
        if not name:
            raise InvalidArgument(
                "a model without a source (shipped predictions) needs a name", field=f"{where}.name"
            )
        if name in model_names:
            raise InvalidArgument(f"model name {name!r} is used twice", field=f"{where}.name")
        model_names.add(name)
        if not 0 <= m.num_frames <= 256:
            raise InvalidArgument("must be between 0 (default) and 256", field=f"{where}.num_frames")
        if m.endpoint is not None:
            if not m.endpoint.base_url:
                raise InvalidArgument("required", field=f"{where}.endpoint.base_url")
            if not m.endpoint.model:
                raise InvalidArgument("required", field=f"{where}.endpoint.model")
            if m.endpoint.api_key_env and m.endpoint.api_key_env not in os.environ:
                raise FailedPrecondition(
                    f"environment variable {m.endpoint.api_key_env!r} is not set",
                    field=f"{where}.endpoint.api_key_env",
                )
        if not any(sources):
            bad = [b.name or b.kind for b in qa if b.kind != "video_chatgpt"]
            if bad:
                raise InvalidArgument(
                    f"a model without a source only has Video-ChatGPT predictions to judge, not {bad[0]!r}",
                    field=where,
                )
    if any(BENCHMARKS[b.kind].requires_judge for b in qa) and not (request.judge or settings.judge_base_url):
        raise InvalidArgument(
            "judge-scored open answers need a judge (request.judge or evaluator.judge_base_url)",
            field="judge",
        )
    if request.judge is not None:
        if not request.judge.base_url:
            raise InvalidArgument("required", field="judge.base_url")
        if request.judge.api_key_env and request.judge.api_key_env not in os.environ:
            raise FailedPrecondition(
                f"environment variable {request.judge.api_key_env!r} is not set", field="judge.api_key_env"
            )


# --- the evaluator ------------------------------------------------------------------------------------------
@dataclass
class _Planned:
    spec: ModelSpec
    run: ModelRun
    open: Callable[[], VideoQAModel]


@dataclass
class _Loaded:
    spec: BenchmarkSpec
    benchmark: Benchmark | None
    loaded: LoadedBenchmark
    run: BenchmarkRun
    stories: list[tuple[str, Location]] = field(default_factory=list)


class _Clock:
    def __init__(self, total: int) -> None:
        self.start = time.monotonic()
        self.total = total
        self.done = 0

    def progress(self, current: str, message: str = "") -> Progress:
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else -1.0
        return Progress("items", self.done, self.total, current, elapsed, eta, message)


class Evaluator:
    """Runs EvaluateRequests against one store. ``open_encoder`` and ``open_judge`` can be replaced
    (tests use the defaults with tiny models and a local judge server)."""

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
        self.scratch = Path(settings.work_dir) / "scratch"

    # --- planning ---------------------------------------------------------------------------------------
    def _plan_model(self, i: int, spec: ModelSpec) -> _Planned:
        name = (
            spec.name
            or spec.checkpoint_prefix
            or spec.preset
            or (spec.endpoint.model if spec.endpoint else "")
        )
        frames = spec.num_frames or self.settings.num_frames
        device = self.settings.device
        if spec.checkpoint_prefix:
            try:
                identity, files = checkpoint_identity(self.store, spec.checkpoint_prefix)
            except NotFound as exc:
                raise NotFound(exc.message, field=f"models[{i}].checkpoint_prefix") from exc
            source = {"checkpoint_prefix": spec.checkpoint_prefix}

            def open_model() -> VideoQAModel:
                path = download_checkpoint(
                    self.store, spec.checkpoint_prefix, files, self.settings.work_dir, identity
                )
                return load_checkpoint_model(path, identity, device=device)

        elif spec.preset:
            from dreamframe.models import video_llm

            where = self.settings.model_paths.get(spec.preset) or video_llm.HUB_IDS.get(
                spec.preset, spec.preset
            )
            identity = (
                f"preset:{video_llm.TINY}:v{video_llm.TINY_VERSION}"
                if spec.preset == video_llm.TINY and spec.preset not in self.settings.model_paths
                else f"preset:{spec.preset}:{where}"
            )
            source = {"preset": spec.preset}

            def open_model() -> VideoQAModel:
                path = video_llm.resolve_model_path(
                    spec.preset, self.settings.model_paths, self.model_cache_dir
                )
                return load_checkpoint_model(path, identity, device=device)

        elif spec.endpoint is not None:
            endpoint = spec.endpoint
            identity = f"openai:{endpoint.base_url}:{endpoint.model}"
            source = {"endpoint": {"base_url": endpoint.base_url, "model": endpoint.model}}

            def open_model() -> VideoQAModel:
                key = os.environ.get(endpoint.api_key_env, "") if endpoint.api_key_env else ""
                return make_endpoint_model(
                    endpoint.base_url,
                    endpoint.model,
                    key,
                    timeout=self.settings.endpoint_timeout_seconds,
                    max_retries=self.settings.openai_max_retries,
                )

        else:
            identity = f"predictions:{name}"
            source = {"predictions": True}

            def open_model() -> VideoQAModel:
                return PredictionsModel(name)

        return _Planned(spec, ModelRun(name, identity, source, frames), open_model)

    def _judge(self, request: EvaluateRequest, cache: ResultCache) -> Judge | None:
        s = self.settings
        if request.judge is not None:
            key = os.environ.get(request.judge.api_key_env, "") if request.judge.api_key_env else ""
            base_url, model = request.judge.base_url, request.judge.model or s.judge_model
        elif s.judge_base_url:
            base_url, model, key = s.judge_base_url, s.judge_model, s.judge_api_key.get_secret_value()
        else:
            return None
        return make_judge(
            base_url,
            model,
            key,
            max_attempts=s.judge_max_attempts,
            timeout=s.judge_timeout_seconds,
            cache=cache,
            max_retries=s.openai_max_retries,
        )

    def _load(self, i: int, spec: BenchmarkSpec) -> _Loaded:
        where = f"benchmarks[{i}]"
        roots = self.settings.local_data_roots
        name = spec.name or spec.kind
        run = BenchmarkRun(name, spec.kind, spec.data_prefix, spec.video_prefix)
        if spec.kind == STYLE_CONSISTENCY:
            stories = []
            for j, prefix in enumerate(spec.frame_prefixes):
                source, base = open_location(
                    prefix, self.store, local_roots=roots, field=f"{where}.frame_prefixes[{j}]"
                )
                stories.append((prefix, Location(source, base)))
            return _Loaded(spec, None, LoadedBenchmark(), run, stories)
        benchmark = BENCHMARKS[spec.kind]
        source, base = open_location(
            spec.data_prefix, self.store, local_roots=roots, field=f"{where}.data_prefix"
        )
        videos = None
        if spec.video_prefix:
            vsource, vbase = open_location(
                spec.video_prefix, self.store, local_roots=roots, field=f"{where}.video_prefix"
            )
            videos = Location(vsource, vbase)
        loaded = benchmark.load(Location(source, base), videos, max_items=spec.max_items)
        if not loaded.files:
            raise InvalidArgument(
                f"no {spec.kind} files found under {spec.data_prefix!r}"
                + (f" ({loaded.errors[0].reason})" if loaded.errors else ""),
                field=f"{where}.data_prefix",
            )
        run.files, run.items, run.load_errors = loaded.files, len(loaded.items), loaded.errors
        return _Loaded(spec, benchmark, loaded, run)

    # --- running ----------------------------------------------------------------------------------------
    def evaluate(
        self, request: EvaluateRequest, *, should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[Progress | EvaluateResult]:
        validate(request, self.settings)
        started, created = time.monotonic(), datetime.now(UTC).isoformat(timespec="seconds")
        prefix = keys.report_prefix(request.report_name)
        plans = [self._plan_model(i, m) for i, m in enumerate(request.models)]
        yield Progress("items", 0, 0, "", 0.0, -1.0, "loading benchmarks")
        benches = [self._load(i, b) for i, b in enumerate(request.benchmarks)]
        cache = ResultCache(self.store, self.settings.cache_prefix, read=not request.ignore_cache)
        needs_judge = any(b.benchmark is not None for b in benches)
        judge = self._judge(request, cache) if needs_judge else None
        qa = [b for b in benches if b.benchmark is not None]
        style = [b for b in benches if b.benchmark is None]
        clock = _Clock(sum(len(b.loaded.items) for b in qa) * len(plans) + sum(len(b.stories) for b in style))
        item_lines: list[dict] = []

        for plan in plans:
            yield from self._run_model(plan, qa, judge, cache, clock, item_lines, should_stop)
        for bench in style:
            yield from self._run_style(bench, clock, should_stop)

        report = build_report(
            report_name=request.report_name,
            job_id=request.job_id,
            created_at=created,
            duration_seconds=time.monotonic() - started,
            models=[p.run for p in plans],
            benchmarks=[b.run for b in benches],
            judge={"identity": judge.identity, "model": judge.model, "calls": judge.calls} if judge else None,
            cache={"prefix": cache.prefix, "read": cache.read, "hits": cache.hits, "misses": cache.misses},
        )
        yield clock.progress("", "writing report")
        items_ref = self.store.put_bytes(
            f"{prefix}items.jsonl",
            "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in item_lines).encode(),
            content_type="application/x-ndjson",
        )
        json_ref = self.store.put_json(f"{prefix}report.json", report)
        md_ref = self.store.put_bytes(
            f"{prefix}report.md", render_markdown(report).encode(), content_type="text/markdown"
        )
        scores = [
            Score(s["model"], s["benchmark"], s["task"], s["score"], s["items"], s["failures"], s["unit"])
            for s in report["scores"]
            if s["score"] is not None
        ]
        log.info("evaluation done", report=request.report_name, seconds=round(time.monotonic() - started, 2))
        yield EvaluateResult(json_ref, md_ref, items_ref, scores, report)

    def _run_model(
        self,
        plan: _Planned,
        qa: list[_Loaded],
        judge: Judge | None,
        cache: ResultCache,
        clock: _Clock,
        item_lines: list[dict],
        should_stop: Callable[[], bool],
    ) -> Iterator[Progress]:
        run = plan.run
        n_items = sum(len(b.loaded.items) for b in qa)
        yield clock.progress(run.name, f"loading model {run.name}")
        try:
            model = plan.open()
        except Exception as exc:  # noqa: BLE001 - a model that cannot load is reported; the others still run
            reason = exc.message if isinstance(exc, DreamFrameError) else f"{type(exc).__name__}: {exc}"
            run.error = f"could not load: {reason}"
            log.warning("model failed to load", model=run.name, error=reason)
            for bench in qa:
                bench.run.scores[run.name] = []
                bench.run.item_errors[run.name] = [
                    ItemError(i.task, i.item_id, run.error) for i in bench.loaded.items
                ]
            clock.done += n_items
            yield clock.progress(run.name, run.error)
            return
        try:
            with ThreadPoolExecutor(self.settings.judge_parallel_calls, thread_name_prefix="grade") as pool:
                for bench in qa:
                    yield from self._run_benchmark(
                        model, run, bench, judge, cache, pool, clock, item_lines, should_stop
                    )
        finally:
            model.close()

    def _run_benchmark(
        self,
        model: VideoQAModel,
        run: ModelRun,
        bench: _Loaded,
        judge: Judge | None,
        cache: ResultCache,
        pool: ThreadPoolExecutor,
        clock: _Clock,
        item_lines: list[dict],
        should_stop: Callable[[], bool],
    ) -> Iterator[Progress]:
        benchmark = bench.benchmark
        assert benchmark is not None
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
                clock.done += 1
                yield clock.progress(f"{run.name} · {bench.run.name} · {item.item_id}")

        for item in bench.loaded.items:
            if should_stop():
                raise Cancelled("evaluation cancelled; answers so far are cached")
            if consecutive_errors >= MAX_CONSECUTIVE_MODEL_ERRORS:
                errors.append(
                    ItemError(item.task, item.item_id, "skipped: the model failed on every recent item")
                )
                clock.done += 1
                continue
            asker = Asker(
                model,
                item,
                cache=cache,
                num_frames=run.num_frames,
                max_new_tokens=self.settings.max_new_tokens,
                load_frames=self._frames_loader(item, run.num_frames),
            )
            try:
                answers = benchmark.answer(item, asker)
            except Exception as exc:  # noqa: BLE001 - one bad item (video, model call) never aborts the run
                consecutive_errors += 1
                reason = exc.message if isinstance(exc, DreamFrameError) else f"{type(exc).__name__}: {exc}"
                errors.append(ItemError(item.task, item.item_id, reason))
                item_lines.append(_line(run.name, bench.run.name, item, None, None, reason))
                clock.done += 1
                yield clock.progress(f"{run.name} · {bench.run.name} · {item.item_id}", reason)
                continue
            consecutive_errors = 0
            run.model_calls += asker.model_calls
            run.answers_cached += int(asker.model_calls == 0)
            pending.append((item, answers, pool.submit(benchmark.grade, item, answers, judge)))
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

    def _run_style(
        self, bench: _Loaded, clock: _Clock, should_stop: Callable[[], bool]
    ) -> Iterator[Progress]:
        from dreamframe.models.clip_vision import load_clip_vision

        yield clock.progress(bench.run.name, f"loading image encoder {self.settings.image_encoder}")
        encoder = load_clip_vision(
            self.settings.image_encoder,
            cache_dir=self.model_cache_dir,
            device=self.settings.device,
            field="evaluator.image_encoder",
        )
        embedded, errors = [], []
        for label, location in bench.stories:
            if should_stop():
                raise Cancelled("evaluation cancelled")
            emb, story_errors = embed_story(encoder, label, location, max_frames=bench.spec.max_items)
            errors += story_errors
            if emb is not None:
                embedded.append((label, emb))
            clock.done += 1
            yield clock.progress(f"{bench.run.name} · {label}")
        result = summarize(embedded, errors)
        bench.run.items = sum(s["frames"] for s in result.stories)
        bench.run.load_errors = result.errors
        bench.run.scores[""] = result.rows
        bench.run.extra = {"stories": result.stories, "image_encoder": self.settings.image_encoder}


def _line(
    model: str, benchmark: str, item: Item, answers: dict | None, graded: Graded | None, error: str | None
) -> dict:
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
