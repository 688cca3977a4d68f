"""What each stage of a job does: one call to the service that owns it, recorded in the job.

A stage's outputs are recorded as NamedRefs in its StageStatus (``story/000``, ``style/000``, ...). On
resume a recorded output that still verifies in storage is not recomputed; anything else is asked of the
service again, which itself skips the work already stored (every service is idempotent).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc

from dreamframe import keys, storyboard
from dreamframe.errors import FailedPrecondition, InvalidArgument
from dreamframe.progress import ProgressClock
from dreamframe.serving.streaming import progress_to_proto
from dreamframe.storage import from_proto, to_proto
from dreamframe.storage.base import ObjectRef, ObjectStore
from dreamframe.story import load_story
from dreamframe.v1 import common_pb2, eval_pb2, plot_pb2, qa_pb2, render_pb2, style_pb2, train_pb2
from dreamframe.v1 import coordinator_pb2 as pb
from services.coordinator.settings import CoordinatorSettings

from .clients import Clients
from .fanout import render_frames
from .metrics import RenderMeter

log = logging.getLogger(__name__)

STORYBOARD_PARALLELISM = 2


@dataclass
class JobContext:
    job: pb.Job
    store: ObjectStore
    clients: Clients
    settings: CoordinatorSettings
    # Called after every change; persist=True for transitions that must reach storage now.
    changed: Callable[[bool], Awaitable[None]]
    clocks: dict[int, ProgressClock] = field(default_factory=dict)
    # Stories whose storyboard is being built at once (each on a worker thread, off the event loop).
    storyboard_slots: asyncio.Semaphore = field(
        default_factory=lambda: asyncio.Semaphore(STORYBOARD_PARALLELISM)
    )
    # The coordinator's metrics: render frames pending and in flight (metrics.py).
    meter: RenderMeter | None = None
    # Frames per story, noted when the story is read: the render stage needs only the count, and
    # parsing a 1,331-frame story again costs ~30 ms of coordinator CPU (0.02 ms per frame).
    frame_counts: dict[int, int] = field(default_factory=dict)

    def stage(self, stage: int) -> pb.StageStatus:
        for status in self.job.stages:
            if status.stage == stage:
                return status
        raise KeyError(stage)

    def output(self, stage: int, name: str) -> common_pb2.ObjectRef | None:
        """A recorded output that still verifies in storage, else None."""
        for named in self.stage(stage).outputs:
            if named.name == name and self.store.verify(from_proto(named.ref)):
                return named.ref
        return None

    def record(self, stage: int, name: str, ref: common_pb2.ObjectRef) -> None:
        status = self.stage(stage)
        for named in status.outputs:
            if named.name == name:
                named.ref.CopyFrom(ref)
                return
        status.outputs.add(name=name, ref=ref)

    async def progress(self, stage: int, done: int, total: int, unit: str, item: str = "") -> None:
        clock = self.clocks.setdefault(stage, ProgressClock(total, unit))
        clock.reach(done, total)
        self.stage(stage).progress.CopyFrom(progress_to_proto(clock.progress(item)))
        await self.changed(False)

    @property
    def stories(self) -> int:
        return len(self.job.spec.stories)


async def final_result(call, on_update, *, service: str, field: str):
    """Drain a stage's server stream: every message but the last reports progress (``on_update``);
    the last carries the result. A stream that ends without one is the service's failure, named."""
    result = None
    async for response in call:
        if response.HasField("result"):
            result = response.result
        else:
            await on_update(response)
    if result is None:
        raise FailedPrecondition(f"{service} ended without a result", field=field)
    return result


def story_name(kind: str, index: int) -> str:
    return f"{kind}/{index:03d}"


# --- per-story stages ----------------------------------------------------------------------------


async def plot(ctx: JobContext, index: int) -> None:
    """The story: expanded from a theme by plot-llm, or an uploaded file normalised into both formats."""
    name = story_name("story", index)
    if ctx.output(pb.STAGE_PLOT, name) is not None:
        return
    source = ctx.job.spec.stories[index]
    job_id = ctx.job.job_id
    if source.WhichOneof("source") == "theme":
        request = plot_pb2.GenerateStoryRequest(
            job_id=job_id, theme=source.theme, options=ctx.job.spec.plot, story_index=index
        )

        async def on_update(response) -> None:
            p = response.progress
            await _story_progress(
                ctx, pb.STAGE_PLOT, f"story {index} level {response.level}: {p.done}/{p.total} {p.unit}"
            )

        await ctx.clients.ready("plot-llm")
        result = await final_result(
            ctx.clients.plot.GenerateStory(request),
            on_update,
            service="plot-llm",
            field=f"spec.stories.{index}",
        )
        ctx.record(pb.STAGE_PLOT, name, result.story)
        ctx.record(pb.STAGE_PLOT, story_name("reference_story", index), result.reference_story)
    else:
        uploaded = from_proto(source.story, field=f"spec.stories.{index}.story")
        # Parsing and writing a large story is CPU and I/O: on a worker thread, off the event loop.
        frame_count, ref, native = await asyncio.to_thread(import_story, ctx.store, uploaded, job_id, index)
        ctx.frame_counts[index] = frame_count
        ctx.record(pb.STAGE_PLOT, story_name("reference_story", index), to_proto(ref))
        ctx.record(pb.STAGE_PLOT, name, to_proto(native))
    await _story_progress(ctx, pb.STAGE_PLOT, f"story {index} done")


def import_story(
    store: ObjectStore, uploaded: ObjectRef, job_id: str, index: int
) -> tuple[int, ObjectRef, ObjectRef]:
    """An uploaded story file, normalised into the job's native and reference files: (frames, reference
    ref, native ref)."""
    story = load_story(
        store.get_bytes(uploaded.key, bucket=uploaded.bucket), field=f"spec.stories.{index}.story"
    )
    ref = store.put_bytes(
        keys.reference_story_key(job_id, index),
        json.dumps(story.to_reference(), indent=2, ensure_ascii=False).encode(),
        content_type="application/json",
    )
    native = store.put_bytes(
        keys.story_key(job_id, index), story.to_json().encode(), content_type="application/json"
    )
    return story.frame_count, ref, native


def story_ref(ctx: JobContext, index: int) -> common_pb2.ObjectRef:
    """The story written by the plot stage (or already in place from an earlier run)."""
    ref = ctx.output(pb.STAGE_PLOT, story_name("story", index))
    if ref is not None:
        return ref
    key = keys.story_key(ctx.job.job_id, index)
    if not ctx.store.exists(key):
        raise FailedPrecondition(
            f"story {index} has not been written; run the plot stage", field="spec.stages"
        )
    return to_proto(ctx.store.stat(key))


async def style(ctx: JobContext, index: int) -> None:
    """The style embedding, recorded with its token: textual inversion on the story's style, or on the
    StoryInput's style description or images (they replace the story's; a reference-format story has
    none), or an existing embedding (StoryInput.style_embedding) that style-trainer imports and checks
    without training."""
    name = story_name("style", index)
    if ctx.output(pb.STAGE_STYLE, name) is not None:
        return
    source = ctx.job.spec.stories[index]
    request = style_pb2.TrainStyleRequest(
        job_id=ctx.job.job_id,
        story=story_ref(ctx, index),
        options=ctx.job.spec.style,
        story_index=index,
        style_keyword=source.style_token,
        style_description=source.style_description,
        style_images=source.style_images,
    )
    for ref in request.style_images:  # an empty bucket in the spec means the store's default one
        ref.bucket = ref.bucket or ctx.store.default_bucket
    imported = source.HasField("style_embedding")
    if imported:
        request.embedding.CopyFrom(source.style_embedding)
        request.embedding.bucket = request.embedding.bucket or ctx.store.default_bucket
        # The rows must fit the renderer's text encoders: its preset, when the job names one.
        if ctx.job.spec.render.preset:
            request.options.preset = ctx.job.spec.render.preset

    async def on_update(response) -> None:
        p = response.progress
        message = f"story {index} {_phase(response.phase)} {p.done}/{p.total}"
        await _story_progress(ctx, pb.STAGE_STYLE, message)

    await ctx.clients.ready("style-trainer")
    try:
        result = await final_result(
            ctx.clients.style.TrainStyle(request),
            on_update,
            service="style-trainer",
            field=f"spec.stories.{index}",
        )
    except grpc.aio.AioRpcError as exc:
        if imported and exc.code() == grpc.StatusCode.INVALID_ARGUMENT:  # name the job's own field
            field = f"spec.stories.{index}.style_embedding"
            raise InvalidArgument(f"refused by style-trainer: {exc.details()}", field=field) from None
        raise
    info = {"token": result.token, "embedding": _ref_dict(result.embedding)}
    ref = ctx.store.put_json(f"{keys.style_prefix(ctx.job.job_id, index)}style.json", info)
    ctx.record(pb.STAGE_STYLE, name, to_proto(ref))
    await _story_progress(ctx, pb.STAGE_STYLE, f"story {index} done")


def style_of(ctx: JobContext, index: int) -> tuple[common_pb2.ObjectRef | None, str]:
    """(embedding, token) when the style stage ran for this story."""
    if pb.STAGE_STYLE not in [s.stage for s in ctx.job.stages]:
        return None, ""
    ref = ctx.output(pb.STAGE_STYLE, story_name("style", index))
    if ref is None:
        return None, ""
    info = json.loads(ctx.store.get_bytes(ref.key, bucket=ref.bucket or None))
    return common_pb2.ObjectRef(**info["embedding"]), info["token"]


@dataclass
class FrameTally:
    """A job's frames, kept as running sums: each reported frame costs O(1), not a sum over stories."""

    total: int = 0
    done: int = 0
    by_story: dict[int, int] = field(default_factory=dict)

    def add_story(self, total: int) -> None:
        self.total += total

    def story_done(self, index: int, done: int) -> None:
        self.done += done - self.by_story.get(index, 0)
        self.by_story[index] = done


async def render(ctx: JobContext, index: int, tally: FrameTally) -> None:
    """Every keyframe of the story, sharded over the renderer replicas."""
    name = story_name("frames", index)
    if ctx.output(pb.STAGE_RENDER, name) is not None:
        return
    story = story_ref(ctx, index)
    embedding, token = style_of(ctx, index)
    template = render_pb2.RenderFramesRequest(
        job_id=ctx.job.job_id,
        story=story,
        style_token=token,
        options=ctx.job.spec.render,
        story_index=index,
    )
    if embedding is not None:
        template.style_embedding.CopyFrom(embedding)
    total = ctx.frame_counts.get(index)
    if total is None:  # a story from plot-llm, or the job resumed after a restart
        store, ref = ctx.store, story
        total = await asyncio.to_thread(
            lambda: load_story(store.get_bytes(ref.key, bucket=ref.bucket or None)).frame_count
        )
        ctx.frame_counts[index] = total
    tally.add_story(total)

    async def on_frames(frames: list[render_pb2.RenderedFrame], result) -> None:
        tally.story_done(index, len(result.frames))
        await ctx.progress(
            pb.STAGE_RENDER, tally.done, tally.total, "frames", f"story {index} frame {frames[-1].index}"
        )

    await ctx.clients.ready("keyframe-renderer")
    result = await render_frames(
        ctx.clients.renderers,
        template,
        list(range(total)),
        shard_size=ctx.settings.render_shard_size,
        on_frames=on_frames,
        meter=ctx.meter,
    )
    listing = {
        "story_index": index,
        "frames_prefix": keys.frames_prefix(ctx.job.job_id, index),
        "frames": [_ref_dict(result.frames[i].image) for i in range(total)],
        "rendered": result.rendered,
        "skipped": result.skipped,
        "resent_shards": result.resent_shards,
        "duplicate_reports": result.duplicate_reports,
        "by_replica": result.by_endpoint,
    }
    ref = ctx.store.put_json(frames_listing_key(ctx.job.job_id, index), listing)
    ctx.record(pb.STAGE_RENDER, name, to_proto(ref))
    tally.story_done(index, total)


def frames_listing_key(job_id: str, index: int) -> str:
    return f"{keys.story_prefix(job_id, index)}frames.json"


async def story_storyboard(ctx: JobContext, index: int) -> None:
    """The story's storyboard page and contact sheets, made as soon as its frames are rendered, from the
    renderer's thumbnails: by a renderer replica (BuildStoryBoard), else here on a worker thread
    (STORYBOARD_PARALLELISM stories at a time); a board already stored from the same story and frames is
    kept. Recorded as the render stage's ``storyboard/<sss>``."""
    job_id = ctx.job.job_id
    bucket = ctx.store.default_bucket
    story = _recorded(ctx, pb.STAGE_PLOT, story_name("story", index)) or common_pb2.ObjectRef(
        bucket=bucket, key=keys.story_key(job_id, index)
    )
    listing = _recorded(ctx, pb.STAGE_RENDER, story_name("frames", index)) or common_pb2.ObjectRef(
        bucket=bucket, key=frames_listing_key(job_id, index)
    )
    async with ctx.storyboard_slots:
        page = await _board_on_a_renderer(ctx, index, story, listing)
        if page is None:
            board = await asyncio.to_thread(
                storyboard.ensure_story_board,
                ctx.store,
                job_id,
                index,
                from_proto(story, field="story"),
                from_proto(listing, field="frames_listing"),
            )
            page = to_proto(board.page)
    ctx.record(pb.STAGE_RENDER, story_name("storyboard", index), page)
    await ctx.changed(False)


async def _board_on_a_renderer(
    ctx: JobContext, index: int, story: common_pb2.ObjectRef, listing: common_pb2.ObjectRef
) -> common_pb2.ObjectRef | None:
    """The page a ready renderer replica built (stories spread over replicas by index), None when none
    could (the caller builds it)."""
    if not ctx.settings.storyboard_on_renderers:
        return None
    replicas = [e for e in ctx.clients.renderers if e.active]
    if not replicas:
        return None
    replica = replicas[index % len(replicas)]
    request = render_pb2.BuildStoryBoardRequest(
        job_id=ctx.job.job_id, story_index=index, story=story, frames_listing=listing
    )
    try:
        reply = await replica.stub.BuildStoryBoard(request, timeout=ctx.settings.storyboard_timeout_seconds)
    except grpc.aio.AioRpcError as exc:
        log.warning(
            "job %s story %d: %s could not build the storyboard (%s: %s); building it here",
            ctx.job.job_id,
            index,
            replica.name,
            exc.code().name,
            exc.details(),
        )
        return None
    return reply.page


def _recorded(ctx: JobContext, stage: int, name: str) -> common_pb2.ObjectRef | None:
    """A copy of an output's recorded ref (not verified: no storage call), None when not recorded."""
    for status in ctx.job.stages:
        if status.stage == stage:
            for named in status.outputs:
                if named.name == name:
                    return common_pb2.ObjectRef(
                        bucket=named.ref.bucket,
                        key=named.ref.key,
                        size=named.ref.size,
                        sha256=named.ref.sha256,
                    )
    return None


# --- whole-job stages ----------------------------------------------------------------------------


async def dataset(ctx: JobContext) -> None:
    if ctx.output(pb.STAGE_DATASET, "manifest") is not None:
        return
    job_id = ctx.job.job_id
    request = qa_pb2.BuildDatasetRequest(job_id=job_id, dataset_name=job_id, options=ctx.job.spec.dataset)
    for i in range(ctx.stories):
        request.stories.add(story=story_ref(ctx, i), frames_prefix=keys.frames_prefix(job_id, i))

    async def on_update(response) -> None:
        p = response.progress
        await ctx.progress(pb.STAGE_DATASET, p.done, p.total, p.unit or "samples", p.current_item)

    await ctx.clients.ready("qa-generator")
    result = await final_result(
        ctx.clients.qa.BuildDataset(request), on_update, service="qa-generator", field="spec.dataset"
    )
    ctx.record(pb.STAGE_DATASET, "manifest", result.manifest)
    for named in result.files:
        ctx.record(pb.STAGE_DATASET, named.name, named.ref)


async def train(ctx: JobContext) -> None:
    if ctx.output(pb.STAGE_TRAIN, "model") is not None:
        return
    spec = ctx.job.spec.train
    request = train_pb2.StartRunRequest()
    request.CopyFrom(spec)
    request.run_id = request.run_id or f"{ctx.job.job_id}-train"
    request.job_id = ctx.job.job_id
    request.base_model = request.base_model or ctx.settings.train_base_model
    manifest = ctx.output(pb.STAGE_DATASET, "manifest")
    if manifest is not None:
        request.datasets.insert(0, train_pb2.DatasetMix(dataset=manifest, weight=1.0))
    if not request.datasets:
        raise FailedPrecondition("no dataset to train on", field="spec.train.datasets")
    await ctx.clients.ready("trainer")
    run_id = (await ctx.clients.train.StartRun(request)).run_id
    run = None
    while True:
        try:
            async for response in ctx.clients.train.WatchRun(train_pb2.WatchRunRequest(run_id=run_id)):
                run = response.run
                await ctx.progress(
                    pb.STAGE_TRAIN,
                    run.step,
                    run.total_steps,
                    "steps",
                    f"run {run_id} loss {run.loss:.4f} lr {run.learning_rate:.2e}",
                )
            break
        except grpc.aio.AioRpcError as exc:
            # The run goes on in the trainer whatever happens to this watch: a watch that outlived its
            # deadline (a days-long run) or a trainer restart is watched again once the trainer is ready.
            if exc.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                raise
            await asyncio.sleep(1.0)
            await ctx.clients.ready("trainer")
    if run is None or run.state != train_pb2.RUN_STATE_SUCCEEDED:
        state = train_pb2.RunState.Name(run.state) if run else "unknown"
        raise FailedPrecondition(
            f"training run {run_id} ended {state}: {run.error if run else ''}", field="spec.train"
        )
    ctx.record(pb.STAGE_TRAIN, "model", run.final_model)
    if run.metrics.key:
        ctx.record(pb.STAGE_TRAIN, "metrics", run.metrics)
    ctx.stage(pb.STAGE_TRAIN).progress.current_item = run.final_model_prefix


async def evaluate(ctx: JobContext) -> None:
    if ctx.output(pb.STAGE_EVAL, "report_json") is not None:
        return
    job_id = ctx.job.job_id
    request = eval_pb2.EvaluateRequest()
    request.CopyFrom(ctx.job.spec.eval)
    request.job_id = job_id
    request.report_name = request.report_name or job_id
    model = ctx.output(pb.STAGE_TRAIN, "model") if _has_stage(ctx, pb.STAGE_TRAIN) else None
    if model is not None:
        prefix = model.key.rsplit("/", 1)[0] + "/"
        # The paper's comparison: the fine-tuned model side by side with the model it started from, both
        # shown as many frames as training showed (8 frames of 576 tokens overflow LLaVA-1.5's 4,096).
        base = ctx.job.spec.train.base_model or ctx.settings.train_base_model
        frames = await asyncio.to_thread(trained_frames, ctx.store, model)
        request.models.insert(
            0, eval_pb2.ModelSpec(name="dreamframe", checkpoint_prefix=prefix, num_frames=frames)
        )
        request.models.insert(0, eval_pb2.ModelSpec(name="base", preset=base, num_frames=frames))  # baseline
    if not request.benchmarks:
        manifest = ctx.output(pb.STAGE_DATASET, "manifest") if _has_stage(ctx, pb.STAGE_DATASET) else None
        if manifest is not None and request.models:
            request.benchmarks.add(
                kind=eval_pb2.BENCHMARK_KIND_DREAMFRAME_MC,
                name="dreamframe-mc",
                data_prefix=keys.dataset_prefix(job_id),
            )
        request.benchmarks.add(
            kind=eval_pb2.BENCHMARK_KIND_STYLE_CONSISTENCY,
            name="style-consistency",
            frame_prefixes=[keys.frames_prefix(job_id, i) for i in range(ctx.stories)],
        )

    async def on_update(response) -> None:
        p = response.progress
        await ctx.progress(pb.STAGE_EVAL, p.done, p.total, p.unit or "items", p.current_item)

    await ctx.clients.ready("evaluator")
    result = await final_result(
        ctx.clients.eval.Evaluate(request), on_update, service="evaluator", field="spec.eval"
    )
    ctx.record(pb.STAGE_EVAL, "report_json", result.report_json)
    ctx.record(pb.STAGE_EVAL, "report_markdown", result.report_markdown)


def trained_frames(store: ObjectStore, manifest: common_pb2.ObjectRef) -> int:
    """Frames per video the trained model saw (its manifest's ``num_frames``); 0, the evaluator's
    default, when the manifest does not say or says something out of range."""
    try:
        frames = store.get_json(manifest.key, bucket=manifest.bucket or None).get("num_frames")
    except (ValueError, AttributeError):
        return 0
    return frames if type(frames) is int and 1 <= frames <= 256 else 0


async def write_storyboard(ctx: JobContext) -> list[common_pb2.NamedRef]:
    """The job page (``storyboard/index.html``) linking every story's page, from the stories' board
    manifests (a few hundred bytes each; the stories' boards were built as each render finished)."""
    ref = await asyncio.to_thread(storyboard.write_index, ctx.store, ctx.job.job_id, ctx.stories)
    return [common_pb2.NamedRef(name="storyboard", ref=to_proto(ref))]


def _phase(phase: int) -> str:
    return style_pb2.StylePhase.Name(phase).removeprefix("STYLE_PHASE_").lower()


def _has_stage(ctx: JobContext, stage: int) -> bool:
    return any(s.stage == stage for s in ctx.job.stages)


async def _story_progress(ctx: JobContext, stage: int, message: str) -> None:
    """A per-story stage's progress: stories with their output recorded, out of the job's stories."""
    await ctx.progress(stage, _done_stories(ctx, stage), ctx.stories, "stories", message)


def _done_stories(ctx: JobContext, stage: int) -> int:
    prefix = {pb.STAGE_PLOT: "story/", pb.STAGE_STYLE: "style/", pb.STAGE_RENDER: "frames/"}[stage]
    return sum(1 for n in ctx.stage(stage).outputs if n.name.startswith(prefix))


def _ref_dict(ref: common_pb2.ObjectRef) -> dict:
    return {"bucket": ref.bucket, "key": ref.key, "size": ref.size, "sha256": ref.sha256}
