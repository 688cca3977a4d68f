"""PlotService over gRPC: request → ``PlotService.generate`` → a progress message per LLM call, then the
stored story's refs. When the caller goes away the generation is cancelled; its finished calls are in
the cache, so the next call for the same story resumes from there."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

from dreamframe.config import Settings
from dreamframe.models.device import apply_memory_budget
from dreamframe.serving import Done, Registration, run_service, serve, stream_from_task
from dreamframe.serving import progress_to_proto as common_progress_to_proto
from dreamframe.serving.readiness import StorageReadiness
from dreamframe.storage import open_store, to_proto
from dreamframe.v1 import plot_pb2, plot_pb2_grpc

from .generator import ProgressEvent, StoryResult
from .options import COUNT_RANGES, StoryOptions
from .service import PlotService

SERVICE = "plot-llm"


def options_from_proto(options: plot_pb2.PlotOptions) -> StoryOptions:
    """Unset fields take the defaults; set ones are checked by StoryOptions (naming options.<field>)."""
    given = {name: getattr(options, name) for name in COUNT_RANGES if options.HasField(name)}
    for name in ("temperature", "max_parallel_calls"):
        if options.HasField(name):
            given[name] = getattr(options, name)
    return StoryOptions(model=options.model, seed=options.seed, **given)


def progress_to_proto(event: ProgressEvent) -> plot_pb2.GenerateStoryResponse:
    return plot_pb2.GenerateStoryResponse(level=event.level, progress=common_progress_to_proto(event))


def result_to_proto(result: StoryResult) -> plot_pb2.GenerateStoryResult:
    return plot_pb2.GenerateStoryResult(
        story=to_proto(result.story_ref),
        reference_story=to_proto(result.reference_ref),
        title=result.story.title,
        style_keyword=result.story.style_keyword,
        frame_count=result.story.frame_count,
        llm_calls=result.llm_calls,
        cached_calls=result.cached_calls,
    )


class PlotServicer(plot_pb2_grpc.PlotServiceServicer):
    def __init__(self, service: PlotService) -> None:
        self.service = service
        # One generation per story at a time; a second call waits, then finds the story written.
        self._story_locks: defaultdict[tuple[str, int], asyncio.Lock] = defaultdict(asyncio.Lock)

    async def GenerateStory(
        self, request: plot_pb2.GenerateStoryRequest, context: object
    ) -> AsyncIterator[plot_pb2.GenerateStoryResponse]:
        options = options_from_proto(request.options)

        async def generate(on_progress: Callable[[ProgressEvent], None]) -> StoryResult:
            async with self._story_locks[(request.job_id, request.story_index)]:
                return await self.service.generate(
                    request.job_id,
                    request.theme,
                    options,
                    story_index=request.story_index,
                    on_progress=on_progress,
                )

        # When the caller leaves the generation is cancelled: no more LLM calls; finished ones stay cached.
        # Its error is raised here, mapped to a status by serving.
        elapsed = 0.0
        async for item in stream_from_task(
            generate, name=f"generate-story-{request.job_id}-{request.story_index}"
        ):
            if isinstance(item, Done):
                message = "story already generated" if item.result.skipped else "story written"
                final = progress_to_proto(
                    ProgressEvent.finished(options.total_calls, message, elapsed_seconds=elapsed)
                )
                final.result.CopyFrom(result_to_proto(item.result))
                yield final
            else:
                elapsed = item.elapsed_seconds
                yield progress_to_proto(item)


def build_service(settings: Settings) -> PlotService:
    return PlotService(settings.plot, open_store(settings.storage), model_cache_dir=settings.models.cache_dir)


async def amain(settings: Settings) -> None:
    if settings.plot.backend == "local":  # its share of a GPU other services use too (0: all of it)
        apply_memory_budget(settings.models.gpu_memory_fraction, settings.plot.device)
    service = build_service(settings)

    async def default_model_loaded() -> bool:
        await service.backend(service.resolve_model(""))  # local weights load here, once
        return True

    # Serving means: storage answers and the default model is loaded.
    ready = StorageReadiness(service.store, "jobs/", default_model_loaded)
    registration = Registration.of(
        plot_pb2, plot_pb2_grpc.add_PlotServiceServicer_to_server, PlotServicer(service)
    )
    try:
        await serve([registration], settings.server, service_name=SERVICE, readiness=ready)
    finally:
        await service.aclose()
        service.store.close()


def main() -> None:
    run_service(amain)


if __name__ == "__main__":
    main()
