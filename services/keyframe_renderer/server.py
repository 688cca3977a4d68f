"""RenderService over gRPC: request → ``Renderer.render`` (in a worker thread) → one message per event
(a batch of frames, progress, the summary).

The render is blocking GPU work, so it runs in its own thread and hands events to the RPC through a
queue. When the caller goes away (cancel, deadline, or server shutdown after the grace period) the
render is asked to stop: it finishes the batch in flight and writes those frames, then ends. Shutdown
asks every render to stop the same way, so a SIGTERM loses no finished frame.

Scale-down (a SIGTERM from Kubernetes) is a drain: health answers NOT_SERVING at once and the server
takes no new call (GrpcServer), a RenderFrames that still reaches the servicer gets UNAVAILABLE, and each
running render finishes its batch in flight, writes and reports those frames, then ends (CANCELLED, with
the frames it did not reach unreported): the coordinator re-sends those to another replica. The pod's
termination grace period must cover one batch (the chart's ``terminationGracePeriodSeconds``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from dreamframe import storyboard
from dreamframe.config import Settings
from dreamframe.errors import Unavailable
from dreamframe.models.device import apply_memory_budget
from dreamframe.serving import (
    Done,
    GrpcServer,
    Registration,
    ThreadJobs,
    progress_to_proto,
    run_service,
    stream_from_thread,
)
from dreamframe.serving.readiness import StorageReadiness
from dreamframe.storage import from_proto, open_store, to_proto
from dreamframe.v1 import common_pb2, render_pb2, render_pb2_grpc

from .options import FrameSelection, RenderOptions
from .renderer import Renderer, RenderEvent, RenderRequest

SERVICE = "keyframe-renderer"
STORYBOARDS_AT_ONCE = 2


# --- proto ↔ domain ----------------------------------------------------------------------------------
def selection_from_proto(selection: common_pb2.FrameSelection) -> FrameSelection:
    which = selection.WhichOneof("selection")
    if which == "range":
        return FrameSelection("range", start=selection.range.start, end=selection.range.end)
    if which == "list":
        return FrameSelection("list", indices=tuple(selection.list.indices))
    return FrameSelection("all")  # "all", or nothing set


def options_from_proto(o: render_pb2.RenderOptions) -> RenderOptions:
    return RenderOptions(
        preset=o.preset,
        steps=o.steps,
        high_noise_fraction=o.high_noise_fraction,
        width=o.width,
        height=o.height,
        guidance_scale=o.guidance_scale,
        negative_prompt=o.negative_prompt,
        seed_offset=o.seed_offset,
        batch_size=o.batch_size,
        compile=o.compile,
        disable_refiner=o.disable_refiner,
        overwrite=o.overwrite,
    )


def request_from_proto(request: render_pb2.RenderFramesRequest) -> RenderRequest:
    return RenderRequest(
        job_id=request.job_id,
        story=from_proto(request.story, field="story"),
        style_embedding=(
            from_proto(request.style_embedding, field="style_embedding")
            if request.HasField("style_embedding")
            else None
        ),
        style_token=request.style_token,
        frames=selection_from_proto(request.frames),
        options=options_from_proto(request.options),
        story_index=request.story_index,
    )


def event_to_proto(event: RenderEvent) -> render_pb2.RenderFramesResponse:
    response = render_pb2.RenderFramesResponse(progress=progress_to_proto(event.progress))
    for f in event.frames:
        response.frames.append(
            render_pb2.RenderedFrame(
                index=f.index,
                image=to_proto(f.image),
                sidecar=to_proto(f.sidecar),
                seed=f.seed,
                skipped=f.skipped,
            )
        )
    if event.summary is not None:
        s = event.summary
        response.summary.CopyFrom(
            render_pb2.RenderSummary(
                rendered=s.rendered,
                skipped=s.skipped,
                seconds=s.seconds,
                images_per_second=s.images_per_second,
                frames_prefix=s.frames_prefix,
            )
        )
    return response


# --- metrics -----------------------------------------------------------------------------------------
class RendererMetrics:
    """The renderer's own Prometheus metrics (created unregistered; ``register`` adds them to a registry)."""

    def __init__(self) -> None:
        r = None  # unregistered until register(): several servers in one process never collide
        self.frames = Counter(
            "dreamframe_render_frames", "Frames reported, by outcome.", ["outcome"], registry=r
        )
        self.render_seconds = Counter(
            "dreamframe_render_seconds", "Seconds spent rendering batches (GPU work).", registry=r
        )
        self.images_per_second = Gauge(
            "dreamframe_render_images_per_second", "Throughput of the last finished request.", registry=r
        )
        self.active = Gauge(
            "dreamframe_render_active_requests", "Renders running or waiting now.", registry=r
        )

    def register(self, registry: CollectorRegistry) -> None:
        for collector in (self.frames, self.render_seconds, self.images_per_second, self.active):
            registry.register(collector)

    def observe(self, event: RenderEvent) -> None:
        for frame in event.frames:
            self.frames.labels("skipped" if frame.skipped else "rendered").inc()
        if event.summary is not None:
            self.render_seconds.inc(event.summary.render_seconds)
            if event.summary.rendered:
                self.images_per_second.set(event.summary.images_per_second)


# --- the servicer ------------------------------------------------------------------------------------
class RenderServicer(render_pb2_grpc.RenderServiceServicer):
    def __init__(self, renderer: Renderer, metrics: RendererMetrics | None = None) -> None:
        self.renderer = renderer
        self.metrics = metrics or RendererMetrics()
        self._running = ThreadJobs()
        self.draining = False
        # Story boards built at once on this replica (each loads thumbnails with its own threads).
        self._boards = asyncio.Semaphore(STORYBOARDS_AT_ONCE)

    async def RenderFrames(  # noqa: N802
        self, request: render_pb2.RenderFramesRequest, context: object
    ) -> AsyncIterator[render_pb2.RenderFramesResponse]:
        if self.draining:
            raise Unavailable("this renderer replica is shutting down: send the frames to another one")
        render_request = request_from_proto(request)

        def render(emit: Callable[[RenderEvent], None], stop: threading.Event) -> None:
            self.metrics.active.inc()
            try:
                for event in self.renderer.render(render_request, should_stop=stop.is_set):
                    self.metrics.observe(event)
                    emit(event)
            finally:
                self.metrics.active.dec()

        # A thread of its own (not one of the server's handler threads): it outlives a cancelled RPC to
        # finish the batch in flight. Errors are raised here; serving maps domain errors to status codes.
        async for event in stream_from_thread(
            render, name=f"render-{request.job_id}", keep=self._running, own_thread=True
        ):
            if not isinstance(event, Done):
                yield event_to_proto(event)

    async def BuildStoryBoard(  # noqa: N802
        self, request: render_pb2.BuildStoryBoardRequest, context: object
    ) -> render_pb2.BuildStoryBoardResponse:
        if self.draining:
            raise Unavailable("this renderer replica is shutting down: ask another one")
        story = from_proto(request.story, field="story")
        listing = (
            from_proto(request.frames_listing, field="frames_listing")
            if request.HasField("frames_listing")
            else None
        )
        # CPU work (thumbnail reads, decodes, JPEG encodes) on a worker thread; the GPU renders meanwhile.
        async with self._boards:
            board = await asyncio.to_thread(
                storyboard.ensure_story_board,
                self.renderer.store,
                request.job_id,
                request.story_index,
                story,
                listing,
            )
        return render_pb2.BuildStoryBoardResponse(
            page=to_proto(board.page), built=board.built, thumbnails_made=board.thumbnails_made
        )

    def stop_all(self) -> None:
        """Ask every running render to stop after its batch in flight."""
        self._running.stop_all()

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no render thread is left (True) or ``timeout`` passes (False)."""
        return await self._running.wait_idle(timeout)

    async def drain(self, timeout: float | None = None) -> bool:
        """Shutdown: refuse new renders (UNAVAILABLE), ask each running one to stop after its batch in
        flight (those frames are written and reported), and wait for them up to ``timeout`` (True: all
        ended)."""
        self.draining = True
        self.stop_all()
        return await self.wait_idle(timeout)


def build_servicer(settings: Settings) -> RenderServicer:
    renderer = Renderer(
        open_store(settings.storage),
        settings.renderer,
        cache_dir=settings.models.cache_dir,
        idle_release_s=settings.models.idle_release_s,
    )
    return RenderServicer(renderer)


async def amain(settings: Settings) -> None:
    # This process's share of a GPU that other services use too (0: the whole card).
    apply_memory_budget(settings.models.gpu_memory_fraction, settings.renderer.device)
    servicer = build_servicer(settings)
    # Frames are read from and written to storage: it must answer; and the weights must be loaded.
    ready = StorageReadiness(servicer.renderer.store, "jobs/")

    async def on_shutdown() -> None:
        await servicer.drain(settings.server.grace_seconds)

    server = GrpcServer(
        [Registration.of(render_pb2, render_pb2_grpc.add_RenderServiceServicer_to_server, servicer)],
        settings.server,
        service_name=SERVICE,
        readiness=ready,
        shutdown_hooks=[on_shutdown],
        readiness_interval=1.0,  # SERVING soon after the weights are loaded
    )
    servicer.metrics.register(server.metrics.registry)
    if settings.renderer.preload:
        # Weights load (and, with compile on, the first batch compiles) before the service says SERVING.
        ready.track(asyncio.create_task(asyncio.to_thread(servicer.renderer.warm_up), name="preload-model"))
    try:
        await server.run_forever()
    finally:
        servicer.renderer.close()
        servicer.renderer.store.close()


def main() -> None:
    run_service(amain)


if __name__ == "__main__":
    main()
