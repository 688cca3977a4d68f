"""RenderFrames as a plain, transport-free operation: request in, a stream of events out.

    Renderer(store, settings).render(RenderRequest(...), should_stop=...) -> Iterator[RenderEvent]

Order of work: validate everything that can be validated (request, story, frame selection, embedding,
options against the model) before writing anything; report frames already done (skipped); render the
rest in batches on the preset's engine (loaded once per process, one render at a time per engine);
write each frame (PNG, its JPEG thumbnail, then the sidecar) on a writer thread while the GPU renders
the next batch.

Stateless between calls: what is done is read from storage, so the coordinator can split a story over
any number of replicas and re-send any shard. ``should_stop`` is checked between batches: a cancelled
call finishes the batch in flight (and its writes), then raises ``Cancelled``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from dreamframe import keys
from dreamframe.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound
from dreamframe.models.holder import ModelHolder, using
from dreamframe.progress import Progress, ProgressClock
from dreamframe.storage.base import ObjectRef, ObjectStore, sha256_bytes
from dreamframe.story import Story, load_story
from services.keyframe_renderer.settings import RendererSettings

from .engine import EngineCache, EngineOptions, SDXLEngine, load_engine, renderer_compile_cache
from .frames import FrameRecipe, StoredFrame, find_done, write_frame
from .options import (
    FrameSelection,
    RenderOptions,
    RenderParams,
    preset_of,
    resolve_options,
    select_frames,
    validate_options,
)
from .prompts import frame_prompts
from .sim import SIM, SimEngine
from .style import StyleEmbedding, parse_style_embedding

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RenderRequest:
    job_id: str
    story: ObjectRef
    style_embedding: ObjectRef | None = None
    # Defaults to the story's style keyword (the reference binds the embedding to the keyword itself).
    style_token: str = ""
    frames: FrameSelection = field(default_factory=FrameSelection)
    options: RenderOptions = field(default_factory=RenderOptions)
    story_index: int = 0


@dataclass(frozen=True)
class Summary:
    rendered: int
    skipped: int
    seconds: float
    images_per_second: float
    frames_prefix: str
    batch_size: int
    # Time spent in engine.render (GPU work plus the one device→host copy per batch).
    render_seconds: float


@dataclass(frozen=True)
class RenderEvent:
    """One stream message: progress always; the frames written since the last event (one batch, or a
    group found already done); the summary at the end."""

    progress: Progress
    frames: tuple[StoredFrame, ...] = ()
    summary: Summary | None = None


# Frames found already done are reported in groups of this many: one stream message each, not one per
# frame (a restarted 1,331-frame story is then 21 messages).
SKIPPED_PER_EVENT = 64


def render_batch(engine: SDXLEngine | SimEngine, chunk: list[FrameRecipe], params, batch_size: int):
    """Render ``chunk`` (at most ``batch_size`` frames). A compiled engine gets exactly ``batch_size``
    rows, the last recipe repeated and its extra images dropped: a shorter batch is another shape, which
    torch.compile compiles anew (minutes) in the middle of a job. Each image has its own generator, so a
    frame is the same whatever fills the rest of its batch."""
    prompts, seeds = [r.prompt for r in chunk], [r.seed for r in chunk]
    padding = batch_size - len(chunk) if engine.compiled else 0
    if padding > 0:
        prompts += [prompts[-1]] * padding
        seeds += [seeds[-1]] * padding
    pixels = engine.render(prompts, seeds, params)
    return pixels[: len(chunk)]


def warm_up_params(engine: SDXLEngine, params: RenderParams) -> RenderParams:
    """``params`` with the fewest steps that still run every compiled module (each UNet once, the VAE
    decoder): the compiled graphs' shapes do not depend on the step count (see ``engine.workload``), so
    the other steps of a warm-up batch only cost GPU time before the service says SERVING."""
    for steps in range(1, params.steps):
        fewer = replace(params, steps=steps)
        try:
            engine.step_split(fewer)
        except InvalidArgument:
            continue
        return fewer
    return params


class Renderer:
    """The keyframe renderer's data plane; the gRPC servicer is a thin adapter over ``render``."""

    def __init__(
        self,
        store: ObjectStore,
        settings: RendererSettings,
        *,
        cache_dir: Path = Path(".dreamframe/models"),
        engines: EngineCache | ModelHolder | None = None,
        idle_release_s: float = 0.0,
    ) -> None:
        """``idle_release_s`` > 0 (``models.idle_release_s``, GPU sharing): loaded presets are dropped
        after that long without a render and loaded again by the next one."""
        self.store = store
        self.settings = settings
        self.cache_dir = Path(cache_dir)
        self.engines = engines or ModelHolder(
            self._load,
            name="keyframe-renderer",
            capacity=settings.max_loaded_presets,
            idle_release_s=idle_release_s,
        )
        # PNG and thumbnail encoding and uploads overlap the next batch's GPU work.
        self._writer = ThreadPoolExecutor(
            max_workers=settings.writer_threads, thread_name_prefix="frame-writer"
        )
        self.frames_rendered = 0
        self.frames_skipped = 0

    def _load(self, preset: str) -> SDXLEngine | SimEngine:
        s = self.settings
        if preset == SIM:
            return SimEngine(frame_seconds=s.sim_frame_seconds, resolution=s.sim_resolution)
        return load_engine(
            preset,
            model_paths=s.model_paths,
            cache_dir=self.cache_dir,
            device=s.device,
            options=EngineOptions.from_settings(s),
            compile_cache=renderer_compile_cache(s, self.store, self.cache_dir),
        )

    def engine(self, preset: str | None = None) -> SDXLEngine:
        """The engine for ``preset`` (the configured default when None), loading it on first use."""
        return self.engines.get(preset or self.settings.preset)

    def warm_up(self) -> None:
        """Preload: load the default preset and, when compiling, render one batch of the default shape
        so torch.compile's first (minutes-long) compile happens before the service says SERVING, not
        inside the first RenderFrames call."""
        preset = self.settings.preset
        with using(self.engines, preset) as engine:
            if not self.settings.compile or preset == SIM:
                return
            params = resolve_options(
                RenderOptions(),
                preset=preset,
                resolution=engine.resolution,
                default_batch_size=self.settings.batch_size,
                compile_default=True,
            )
            with engine.lock:
                engine.set_style(None)
                engine.compile(self.settings.compile_mode)
                batch = params.batch_size or engine.auto_batch_size(
                    params, max_batch=self.settings.max_batch_size, cpu_batch=self.settings.cpu_batch_size
                )
                began = time.monotonic()
                warm = warm_up_params(engine, params)
                engine.render(["warm-up"] * batch, [warm.seed(i) for i in range(batch)], warm)
                log.info(
                    "warm-up batch of %d at %d steps (compile) took %.1f s",
                    batch,
                    warm.steps,
                    time.monotonic() - began,
                )

    def close(self) -> None:
        close = getattr(self.engines, "close", None)
        if close is not None:
            close()
        self._writer.shutdown(wait=True)

    # --- inputs ---------------------------------------------------------------------------------------
    def _read(self, ref: ObjectRef, field: str) -> bytes:
        if not ref.key:
            raise InvalidArgument("must name an object key", field=f"{field}.key")
        try:
            data = self.store.get_bytes(ref.key, bucket=ref.bucket or None)
        except NotFound:
            raise NotFound(
                f"no object {ref.key!r} in bucket {ref.bucket or self.store.default_bucket!r}", field=field
            ) from None
        except InvalidArgument as exc:
            raise InvalidArgument(exc.message, field=f"{field}.{exc.field or 'key'}") from None
        if ref.sha256 and sha256_bytes(data) != ref.sha256.lower():
            raise FailedPrecondition(
                f"object {ref.key!r} changed since it was referenced (sha256 differs)",
                field=f"{field}.sha256",
            )
        return data

    def _style(self, request: RenderRequest, story: Story) -> StyleEmbedding | None:
        ref = request.style_embedding
        if ref is None or not (ref.key or ref.bucket):
            if request.style_token:
                raise InvalidArgument("a style token needs its style_embedding", field="style_token")
            return None
        token = request.style_token or story.style_keyword
        if not token:
            raise InvalidArgument(
                "the embedding needs a token to bind to: set style_token (the story has no style keyword)",
                field="style_token",
            )
        data = self._read(ref, "style_embedding")
        return parse_style_embedding(data, token=token, sha256=sha256_bytes(data))

    # --- the operation --------------------------------------------------------------------------------
    def render(
        self, request: RenderRequest, should_stop: Callable[[], bool] | None = None
    ) -> Iterator[RenderEvent]:
        stop = should_stop or (lambda: False)
        keys.story_prefix(request.job_id, request.story_index)  # validates job_id and story_index
        validate_options(request.options)
        story = load_story(self._read(request.story, "story"), field="story")
        indices = select_frames(request.frames, story.frame_count)
        style = self._style(request, story)
        # In use for the whole render: an idle release never takes the weights from under it.
        with using(self.engines, preset_of(request.options, self.settings.preset)) as engine:
            yield from self._render(request, engine, indices, style, story, stop)

    def _render(
        self,
        request: RenderRequest,
        engine: SDXLEngine,
        indices: list[int],
        style: StyleEmbedding | None,
        story: Story,
        stop: Callable[[], bool],
    ) -> Iterator[RenderEvent]:
        params = resolve_options(
            request.options,
            preset=preset_of(request.options, self.settings.preset),
            resolution=engine.resolution,
            default_batch_size=self.settings.batch_size,
            compile_default=self.settings.compile,
        )
        if style is not None:
            engine.check_style(style)
        engine.step_split(params)  # both stages get steps
        prompts = frame_prompts(story, indices, style.token if style else "")
        recipes = [
            FrameRecipe(
                index=i,
                prompt=prompts[i],
                seed=params.seed(i),
                model=engine.model_id,
                settings={**params.image_settings(), **engine.recipe_settings()},
                style_token=style.token if style else "",
                style_embedding_sha256=style.sha256 if style else "",
            )
            for i in indices
        ]
        yield from self._run(request, engine, params, style, recipes, stop)

    def _run(
        self,
        request: RenderRequest,
        engine: SDXLEngine,
        params: RenderParams,
        style: StyleEmbedding | None,
        recipes: list[FrameRecipe],
        stop: Callable[[], bool],
    ) -> Iterator[RenderEvent]:
        bucket = request.story.bucket or None
        where = dict(job_id=request.job_id, story_index=request.story_index, bucket=bucket)
        # The ETA comes from the pace of the frames rendered, not of those found already done.
        clock = ProgressClock(len(recipes), "frames")
        yield RenderEvent(
            clock.progress("checking stored frames", f"{len(recipes)} frames, preset {params.preset}")
        )

        todo: list[FrameRecipe] = []
        found: list[StoredFrame] = []
        for recipe in recipes:
            done = None if params.overwrite else find_done(self.store, recipe=recipe, **where)
            if done is None:
                todo.append(recipe)
                continue
            clock.skip()
            self.frames_skipped += 1
            found.append(done)
            if len(found) == SKIPPED_PER_EVENT:
                yield RenderEvent(clock.progress(f"frame {done.index} (already done)"), frames=tuple(found))
                found = []
        if found:
            yield RenderEvent(clock.progress(f"frame {found[-1].index} (already done)"), frames=tuple(found))

        batch_size = 0
        render_seconds = 0.0
        pending: deque[list[Future[StoredFrame]]] = deque()
        extra = {"device": engine.device.type, "dtype": str(engine.dtype).removeprefix("torch.")}
        stopped = False
        try:
            if todo:
                with engine.lock:  # one render at a time per engine (it holds the loaded style)
                    engine.set_style(style)
                    if params.compile:
                        engine.compile(self.settings.compile_mode)
                    batch_size = params.batch_size or engine.auto_batch_size(
                        params, max_batch=self.settings.max_batch_size, cpu_batch=self.settings.cpu_batch_size
                    )
                    clock.begin_work()
                    for start in range(0, len(todo), batch_size):
                        if stop():
                            stopped = True
                            break
                        chunk = todo[start : start + batch_size]
                        began = time.monotonic()
                        pixels = render_batch(engine, chunk, params, batch_size)
                        render_seconds += time.monotonic() - began
                        pending.append(
                            [
                                self._writer.submit(
                                    write_frame, self.store, recipe=r, pixels=p, extra=extra, **where
                                )
                                for r, p in zip(chunk, pixels, strict=True)
                            ]
                        )
                        # The previous batch's writes ran during this batch's GPU work: report them now.
                        while len(pending) > 1:
                            yield self._report(pending.popleft(), clock)
            while pending:
                yield self._report(pending.popleft(), clock)
        finally:
            for futures in pending:  # closed early: still finish the writes of rendered frames
                for future in futures:
                    future.exception()

        seconds = clock.elapsed
        if stopped and clock.done < clock.total:
            raise Cancelled(f"stopped after {clock.done} of {clock.total} frames")
        summary = Summary(
            rendered=clock.worked,
            skipped=clock.total - len(todo),
            seconds=seconds,
            images_per_second=clock.worked / seconds if clock.worked and seconds > 0 else 0.0,
            frames_prefix=keys.frames_prefix(request.job_id, request.story_index),
            batch_size=batch_size,
            render_seconds=render_seconds,
        )
        log.info(
            "rendered %d frames, skipped %d, %.1f s (%.3f images/s, batch %d)",
            summary.rendered,
            summary.skipped,
            seconds,
            summary.images_per_second,
            batch_size,
        )
        yield RenderEvent(clock.progress("done"), summary=summary)

    def _report(self, futures: list[Future[StoredFrame]], clock: ProgressClock) -> RenderEvent:
        """One event for a whole batch, once all its frames are written."""
        frames = tuple(future.result() for future in futures)
        clock.advance(len(frames))
        self.frames_rendered += len(frames)
        return RenderEvent(clock.progress(f"frame {frames[-1].index}"), frames=frames)
