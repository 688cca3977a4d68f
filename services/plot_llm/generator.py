"""The three-level expansion of a theme into a Story.

    level 1: 1 call                    outline (title, style, places, cast, substories, QA)
    level 2: 1 call per substory       tiny stories + QA
    level 3: 1 call per tiny story     frames, dialogues between them, QA

Calls run concurrently under one semaphore (``max_parallel_calls``); each substory's level-3 calls start
as soon as its own level-2 call is done, so the critical path is three calls long. Each call:
cache → (LLM → parse with the answer model → checks → repair turn with the problems)* → cache.
Outputs: the native story.json and the reference-format reference_story.json; when both already exist
and verify, nothing is asked again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from dreamframe.errors import DreamFrameError, FailedPrecondition
from dreamframe.keys import reference_story_key, story_key
from dreamframe.progress import Progress, ProgressClock
from dreamframe.storage.base import ObjectRef, ObjectStore
from dreamframe.story import Story

from . import prompts
from .assemble import build_story
from .cache import CallCache, cache_prefix, call_digest
from .llm import ChatBackend, ChatRequest, Sampling
from .options import StoryOptions, validate_theme
from .schemas import TextLimits, answer_schema, level1_model, level2_model, level3_model
from .validation import MODES, STRICT, check_outline, check_part, check_scenes, known_words

log = logging.getLogger(__name__)


UNIT = "llm_calls"


@dataclass(frozen=True, kw_only=True)
class ProgressEvent(Progress):
    """One step of a generation (``UNIT``s done of the story's total): sent when a level starts and
    after every call, with the level it belongs to and whether the call's answer came from the cache.
    The ETA comes from the pace of the calls the LLM answered (cached ones take no time)."""

    level: int
    cached: bool = False

    @classmethod
    def finished(cls, total: int, message: str, *, elapsed_seconds: float = 0.0) -> ProgressEvent:
        """The last event of a generation: every call done."""
        return cls(UNIT, total, total, "", elapsed_seconds, 0.0, message, level=3)


@dataclass(frozen=True)
class StoryResult:
    story: Story
    story_ref: ObjectRef
    reference_ref: ObjectRef
    # Requests sent to the LLM (repair turns included) and calls answered from the cache.
    llm_calls: int
    cached_calls: int
    # True when both outputs already existed and verified: nothing was generated.
    skipped: bool = False


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class GeneratorConfig:
    validation: str = STRICT
    max_repair_attempts: int = 3
    limits: TextLimits = field(default_factory=TextLimits)
    max_parallel_calls: int = 8
    temperature: float = 0.8
    top_p: float = 1.0
    max_tokens: int = 8192
    cache: bool = True

    def __post_init__(self) -> None:
        if self.validation not in MODES:
            raise ValueError(f"validation must be one of {MODES}, got {self.validation!r}")


class StoryGenerator:
    """Generates stories with one backend into one store."""

    def __init__(
        self,
        backend: ChatBackend,
        store: ObjectStore,
        config: GeneratorConfig | None = None,
        *,
        bucket: str | None = None,
    ) -> None:
        self.backend = backend
        self.store = store
        self.config = config or GeneratorConfig()
        self.bucket = bucket

    async def generate(
        self,
        job_id: str,
        theme: str,
        options: StoryOptions | None = None,
        *,
        story_index: int = 0,
        on_progress: ProgressCallback | None = None,
    ) -> StoryResult:
        theme = validate_theme(theme)
        options = options or StoryOptions()
        keys = (story_key(job_id, story_index), reference_story_key(job_id, story_index))
        existing = await asyncio.to_thread(self._existing, keys, theme, options)
        if existing is not None:
            if on_progress:
                on_progress(ProgressEvent.finished(options.total_calls, "story already generated"))
            return existing
        prefix = cache_prefix(job_id, story_index)
        cache = CallCache(self.store, prefix, bucket=self.bucket, enabled=self.config.cache)
        await cache.load_listing()
        run = _Run(self, options, cache, on_progress)
        story = await run.story(theme)
        story_ref, reference_ref = await asyncio.to_thread(self._write, keys, story)
        log.info("story %s: %d LLM requests, %d cached calls", keys[0], run.llm_calls, run.cached_calls)
        return StoryResult(story, story_ref, reference_ref, run.llm_calls, run.cached_calls)

    # --- outputs -----------------------------------------------------------------------------------------
    def _existing(self, keys: tuple[str, str], theme: str, options: StoryOptions) -> StoryResult | None:
        """Both outputs, if they exist, parse, agree with each other and are the story asked for."""
        if not all(self.store.exists(k, bucket=self.bucket) for k in keys):
            return None
        try:
            story = Story.from_json(self.store.get_bytes(keys[0], bucket=self.bucket))
            reference = json.loads(self.store.get_bytes(keys[1], bucket=self.bucket))
        except (DreamFrameError, ValueError):
            return None  # half-broken outputs: generate again (from the cache) and replace them
        if reference != story.to_reference():
            return None
        if story.theme != theme or _shape(story) != _requested_shape(options):
            raise FailedPrecondition(
                f"{keys[0]} already holds a different story (theme {story.theme!r}, shape {_shape(story)}); "
                "use another job_id or story_index",
                field="job_id",
            )
        refs = tuple(self.store.stat(k, bucket=self.bucket) for k in keys)
        return StoryResult(story, refs[0], refs[1], 0, 0, skipped=True)

    def _write(self, keys: tuple[str, str], story: Story) -> tuple[ObjectRef, ObjectRef]:
        # Each write is atomic; the native story goes first, so a crash in between leaves an incomplete
        # pair that the next run regenerates (from the cache) and completes.
        story_ref = self.store.put_bytes(
            keys[0], story.to_json().encode(), content_type="application/json", bucket=self.bucket
        )
        reference_ref = self.store.put_json(keys[1], story.to_reference(), bucket=self.bucket)
        return story_ref, reference_ref


def _shape(story: Story) -> tuple[int, ...]:
    subs = story.substories
    tiny = subs[0].tiny_stories if subs else []
    items = tiny[0].items if tiny else []
    return (
        len(subs),
        len(tiny),
        sum(1 for i in items if i.kind == "frame"),
        sum(1 for i in items if i.kind == "dialogue"),
        len(tiny[0].qa) if tiny else 0,
    )


def _requested_shape(options: StoryOptions) -> tuple[int, ...]:
    return (
        options.substories,
        options.tiny_stories,
        options.frames_per_tiny_story,
        options.dialogues_per_tiny_story,
        options.qa_per_tiny_story,
    )


class _Run:
    """The state of one generation: counters, the semaphore, progress."""

    def __init__(
        self,
        gen: StoryGenerator,
        options: StoryOptions,
        cache: CallCache,
        on_progress: ProgressCallback | None,
    ) -> None:
        self.gen = gen
        self.config = gen.config
        self.options = options
        self.cache = cache
        self.on_progress = on_progress
        self.semaphore = asyncio.Semaphore(options.max_parallel_calls or self.config.max_parallel_calls)
        self.temperature = options.temperature if options.temperature is not None else self.config.temperature
        self.clock = ProgressClock(options.total_calls, UNIT)
        self.llm_calls = 0
        self.cached_calls = 0

    # --- the three levels ------------------------------------------------------------------------------
    async def story(self, theme: str) -> Story:
        o, limits = self.options, self.config.limits
        self._event(1, "outline", "level 1: outline")
        model = level1_model(o.substories, o.min_locations, o.max_characters, limits)
        messages = prompts.conversation(
            "level1",
            answer_schema(model),
            theme=theme,
            substories=o.substories,
            min_locations=o.min_locations,
            max_characters=o.max_characters,
        )
        outline = await self._call(
            1,
            "outline",
            "level 1 (outline)",
            model,
            messages,
            lambda a: check_outline(a, mode=self.config.validation),
        )
        self._event(2, "", f"levels 2-3: {o.substories} substories")
        names = tuple(c.name for c in outline.characters)
        locations = tuple(outline.locations)
        parts: list[Any] = [None] * o.substories
        scenes: list[list[Any]] = [[None] * o.tiny_stories for _ in range(o.substories)]

        async def substory(s: int) -> None:
            parts[s] = await self._part(theme, outline, s, names)
            async with asyncio.TaskGroup() as group:
                for t in range(o.tiny_stories):
                    group.create_task(self._scene(theme, outline, parts[s], s, t, names, locations, scenes))

        await _run_all(substory(s) for s in range(o.substories))
        return build_story(theme, outline, parts, scenes)

    async def _part(self, theme: str, outline: Any, s: int, names: tuple[str, ...]) -> Any:
        model = level2_model(self.options.tiny_stories, names, self.config.limits)
        sub = outline.substories[s]
        messages = prompts.conversation(
            "level2",
            answer_schema(model),
            **prompts.outline_values(outline),
            substory_number=s + 1,
            substory_scene=sub.scene,
            substory_content=sub.content,
            tiny_stories=self.options.tiny_stories,
        )
        return await self._call(
            2,
            f"substory-{s:03d}",
            f"level 2 (substory {s + 1})",
            model,
            messages,
            lambda a: check_part(a, mode=self.config.validation),
        )

    async def _scene(
        self,
        theme: str,
        outline: Any,
        part: Any,
        s: int,
        t: int,
        names: tuple[str, ...],
        locations: tuple[str, ...],
        out: list[list[Any]],
    ) -> None:
        o = self.options
        model = level3_model(
            o.frames_per_tiny_story,
            o.dialogues_per_tiny_story,
            o.qa_per_tiny_story,
            locations,
            names,
            self.config.limits,
        )
        sub, tiny = outline.substories[s], part.tiny_stories[t]
        messages = prompts.conversation(
            "level3",
            answer_schema(model),
            **prompts.outline_values(outline),
            substory_number=s + 1,
            substory_scene=sub.scene,
            substory_content=sub.content,
            tiny_story_list="\n".join(f"{i + 1}. {x.content}" for i, x in enumerate(part.tiny_stories)),
            tiny_story_number=t + 1,
            tiny_story_content=tiny.content,
            frames=o.frames_per_tiny_story,
            dialogues=o.dialogues_per_tiny_story,
            qa=o.qa_per_tiny_story,
        )
        known = known_words(
            theme,
            outline.title,
            outline.overview,
            outline.style_keyword,
            " ".join(names),
            " ".join(locations),
            sub.scene,
            sub.content,
            tiny.content,
        )
        out[s][t] = await self._call(
            3,
            f"substory-{s:03d}-tiny-{t:03d}",
            f"level 3 (substory {s + 1}, tiny story {t + 1})",
            model,
            messages,
            lambda a: check_scenes(
                a, keyword=outline.style_keyword, known=known, mode=self.config.validation
            ),
        )

    # --- one call ----------------------------------------------------------------------------------------
    async def _call(
        self,
        level: int,
        call_id: str,
        item: str,
        model: type[BaseModel],
        messages: list[dict[str, str]],
        check: Callable[[Any], list[str]],
    ) -> Any:
        schema = answer_schema(model)
        sampling = Sampling(
            self.temperature,
            self.config.top_p,
            self.config.max_tokens,
            _call_seed(self.options.seed, call_id),
        )
        first = ChatRequest(tuple(messages), schema, model.__name__, sampling)
        backend = self.gen.backend
        digest = call_digest(backend.kind, backend.model, first)

        cached = await self.cache.get(digest)
        if cached is not None:
            answer, problems = _parse(model, json.dumps(cached), check)
            if not problems:
                self.cached_calls += 1
                self._finished(level, item, cached=True)
                return answer
            log.warning(
                "cache entry %s for %s no longer validates (%s); asking again", digest, item, problems[0]
            )

        attempts = 1 + self.config.max_repair_attempts
        async with self.semaphore:
            conversation = list(messages)
            problems: list[str] = []
            for attempt in range(attempts):
                request = (
                    first
                    if attempt == 0
                    else ChatRequest(
                        tuple(conversation), schema, model.__name__, _reseeded(sampling, attempt)
                    )
                )
                text = await backend.complete(request)
                self.llm_calls += 1
                answer, problems = _parse(model, text, check)
                if not problems:
                    await self.cache.put(
                        digest, call=call_id, answer=answer.model_dump(mode="json"), attempts=attempt + 1
                    )
                    self._finished(level, item, cached=False)
                    return answer
                log.info(
                    "%s: attempt %d of %d unusable: %s", item, attempt + 1, attempts, "; ".join(problems[:3])
                )
                conversation += prompts.repair_turns(text, problems)
        shown = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        raise FailedPrecondition(
            f"{item}: the LLM's answer failed validation {attempts} times; last problems: {shown}"
        )

    # --- progress ----------------------------------------------------------------------------------------
    def _finished(self, level: int, item: str, *, cached: bool) -> None:
        if cached:
            self.clock.skip()
        else:
            self.clock.advance()
        self._event(level, item, "from cache" if cached else "done", cached=cached)

    def _event(self, level: int, item: str, message: str, *, cached: bool = False) -> None:
        if self.on_progress is None:
            return
        progress = self.clock.progress(item, message)
        self.on_progress(ProgressEvent(**vars(progress), level=level, cached=cached))


async def _run_all(coros: Any) -> None:
    """Run concurrently; on the first failure cancel the rest and raise that failure itself (finished
    calls are already cached, so a rerun resumes)."""
    try:
        async with asyncio.TaskGroup() as group:
            for coro in coros:
                group.create_task(coro)
    except BaseExceptionGroup as group_error:
        raise _first_leaf(group_error) from None


def _first_leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        # Prefer our own errors (they say what went wrong) over cancellations of siblings.
        ours = [e for e in error.exceptions if not isinstance(e, asyncio.CancelledError)]
        error = (ours or list(error.exceptions))[0]
    return error


def _parse(model: type[BaseModel], text: str, check: Callable[[Any], list[str]]) -> tuple[Any, list[str]]:
    """(answer, problems): schema problems from pydantic, then the level's checks."""
    try:
        answer = model.model_validate_json(text)
    except ValidationError as exc:
        return None, [_describe(e) for e in exc.errors(include_url=False)[:20]]
    return answer, check(answer)


def _describe(error: Any) -> str:
    path = ".".join(str(p) for p in error["loc"]) or "answer"
    if error["type"] == "json_invalid":
        return f"the answer is not valid JSON ({error['msg']})"
    return f"{path}: {error['msg']}"


def _call_seed(seed: int, call_id: str) -> int:
    """Each call gets its own seed from the request's seed and the call's place in the story."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{call_id}".encode()).digest()[:7], "big")


def _reseeded(sampling: Sampling, attempt: int) -> Sampling:
    return Sampling(sampling.temperature, sampling.top_p, sampling.max_tokens, sampling.seed + attempt)
