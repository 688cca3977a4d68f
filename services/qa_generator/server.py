"""QaService over gRPC: request → ``builder.build_dataset`` (in a worker thread) → progress + result.

The build is blocking work (storage I/O, video encoding), so it runs in a thread and reports progress
through a queue the RPC drains. When the caller goes away (cancel, deadline, server shutdown after the
grace period) the build is asked to stop at its next frame; what it finished stays reusable.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

from dreamframe.config import Settings
from dreamframe.enums import enum_name
from dreamframe.progress import Progress
from dreamframe.serving import (
    Done,
    Registration,
    ThreadJobs,
    progress_to_proto,
    run_service,
    serve,
    stream_from_thread,
)
from dreamframe.serving.readiness import StorageReadiness
from dreamframe.storage import open_store, to_proto
from dreamframe.storage.base import ObjectStore
from dreamframe.v1 import common_pb2, qa_pb2, qa_pb2_grpc
from services.qa_generator.settings import QaSettings

from .builder import BuildRequest, BuildResult, build_dataset, dataset_name_for
from .inputs import StorySource
from .options import FRAME_LIST, LLAVA_JSON, MVBENCH_MC, VIDEO_MP4, make_options
from .profiles import LLAMA_VID, LLAVA_NEXT_VIDEO

SERVICE = "qa-generator"

FORMAT_NAMES = {
    qa_pb2.DATASET_FORMAT_LLAVA_JSON: LLAVA_JSON,
    qa_pb2.DATASET_FORMAT_VIDEO_MP4: VIDEO_MP4,
    qa_pb2.DATASET_FORMAT_FRAME_LIST: FRAME_LIST,
    qa_pb2.DATASET_FORMAT_MVBENCH_MC: MVBENCH_MC,
}
PROFILE_NAMES = {
    qa_pb2.DATASET_PROFILE_UNSPECIFIED: "",
    qa_pb2.DATASET_PROFILE_LLAMA_VID: LLAMA_VID,
    qa_pb2.DATASET_PROFILE_LLAVA_NEXT_VIDEO: LLAVA_NEXT_VIDEO,
}


def build_request_from_proto(request: qa_pb2.BuildDatasetRequest, settings: QaSettings) -> BuildRequest:
    """Proto → domain request; unknown or unspecified formats pass through by name for the domain to
    refuse (naming ``options.formats.<i>``)."""
    o = request.options
    formats = [FORMAT_NAMES.get(f, enum_name(qa_pb2.DatasetFormat, f)) for f in o.formats]
    options = make_options(
        formats=formats,
        fps=o.fps,
        validation_fraction=o.validation_fraction,
        test_fraction=o.test_fraction,
        seed=o.seed,
        include_subtitles=o.include_subtitles,
        num_choices=o.num_choices,
        video_size=o.video_size,
        # An unknown number passes through by name for the domain to refuse (options.profile).
        profile=PROFILE_NAMES.get(o.profile, enum_name(qa_pb2.DatasetProfile, o.profile)),
        max_video_seconds=o.max_video_seconds,
        settings=settings,
    )
    stories = [
        StorySource(
            key=s.story.key,
            frames_prefix=s.frames_prefix,
            bucket=s.story.bucket or None,
            sha256=s.story.sha256,
        )
        for s in request.stories
    ]
    return BuildRequest(request.job_id, request.dataset_name, stories, options)


def result_to_proto(result: BuildResult) -> qa_pb2.BuildDatasetResult:
    return qa_pb2.BuildDatasetResult(
        manifest=to_proto(result.manifest),
        files=[common_pb2.NamedRef(name=name, ref=to_proto(ref)) for name, ref in result.files],
        counts=result.counts,
        prefix=result.prefix,
    )


class QaServicer(qa_pb2_grpc.QaServiceServicer):
    def __init__(self, store: ObjectStore, settings: QaSettings) -> None:
        self.store = store
        self.settings = settings
        # One build per dataset at a time (a retried call waits for the first to stop), and a bound on
        # concurrent builds, which are CPU-heavy.
        self._dataset_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._slots = asyncio.Semaphore(settings.max_concurrent_builds)
        # Builds outlive their RPC when the caller leaves, until they stop at their next frame.
        self._running = ThreadJobs()

    async def BuildDataset(
        self, request: qa_pb2.BuildDatasetRequest, context: object
    ) -> AsyncIterator[qa_pb2.BuildDatasetResponse]:
        build_request = build_request_from_proto(request, self.settings)
        name = dataset_name_for(build_request)

        def build(on_progress: Callable[[Progress], None], stop: threading.Event) -> BuildResult:
            return build_dataset(self.store, build_request, on_progress=on_progress, is_cancelled=stop.is_set)

        async for item in stream_from_thread(
            build,
            name=f"build-dataset-{name}",
            keep=self._running,
            hold=(self._dataset_locks[name], self._slots),
        ):
            if isinstance(item, Done):
                yield qa_pb2.BuildDatasetResponse(result=result_to_proto(item.result))
            else:
                yield qa_pb2.BuildDatasetResponse(progress=progress_to_proto(item))


def build_servicer(settings: Settings) -> QaServicer:
    return QaServicer(open_store(settings.storage), settings.qa)


async def amain(settings: Settings) -> None:
    servicer = build_servicer(settings)

    # Everything the service reads and writes is in storage: it must answer.
    ready = StorageReadiness(servicer.store, "datasets/")
    registration = Registration.of(qa_pb2, qa_pb2_grpc.add_QaServiceServicer_to_server, servicer)
    try:
        await serve([registration], settings.server, service_name=SERVICE, readiness=ready)
    finally:
        servicer.store.close()


def main() -> None:
    run_service(amain)


if __name__ == "__main__":
    main()
