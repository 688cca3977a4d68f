"""PlotService over real gRPC on 127.0.0.1 (port 0), with the standard serving stack, backed by the
scripted OpenAI-protocol server: progress streams, then the stored story's refs; bad requests come back
as INVALID_ARGUMENT naming the field; a caller that leaves stops the generation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from dreamframe.config import ServerSettings
from dreamframe.keys import reference_story_key, story_key
from dreamframe.serving import GrpcServer, Registration, error_detail_from
from dreamframe.storage.local import LocalStore
from dreamframe.story import Story
from dreamframe.v1 import plot_pb2, plot_pb2_grpc
from services.plot_llm.options import REFERENCE_COUNTS
from services.plot_llm.scripted_server import ScriptedChatServer
from services.plot_llm.server import PlotServicer, options_from_proto
from services.plot_llm.service import PlotService
from services.plot_llm.settings import PlotSettings

THEME = "a lighthouse keeper finds a message in a bottle"
OPTIONS = plot_pb2.PlotOptions(
    substories=2, tiny_stories=2, frames_per_tiny_story=3, dialogues_per_tiny_story=2, min_locations=3, seed=5
)
TOTAL = 1 + 2 + 4


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store", "dreamframe")


@contextlib.asynccontextmanager
async def plot_server(store, llm: ScriptedChatServer) -> AsyncIterator[plot_pb2_grpc.PlotServiceStub]:
    settings = PlotSettings(backend="openai", model="scripted", base_url=llm.base_url)
    async with serve_plot(PlotService(settings, store)) as stub:
        yield stub


@contextlib.asynccontextmanager
async def serve_plot(service: PlotService) -> AsyncIterator[plot_pb2_grpc.PlotServiceStub]:
    """``service`` over gRPC on 127.0.0.1; closed afterwards."""
    registration = Registration.of(
        plot_pb2, plot_pb2_grpc.add_PlotServiceServicer_to_server, PlotServicer(service)
    )
    settings = ServerSettings(host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=1.0)
    try:
        async with GrpcServer([registration], settings, service_name="plot-llm") as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                yield plot_pb2_grpc.PlotServiceStub(channel)
    finally:
        await service.aclose()


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_generate_story_streams_progress_then_the_stored_refs(store):
    async def scenario():
        with ScriptedChatServer() as llm:
            async with plot_server(store, llm) as stub:
                request = plot_pb2.GenerateStoryRequest(job_id="job-1", theme=THEME, options=OPTIONS)
                first = [r async for r in stub.GenerateStory(request, timeout=20)]
                again = [r async for r in stub.GenerateStory(request, timeout=20)]
                return first, again

    first, again = run(scenario())
    *progress, final = first
    assert all(not r.HasField("result") for r in progress) and final.HasField("result")
    assert all(r.progress.unit == "llm_calls" and r.progress.total == TOTAL for r in first)
    assert [r.level for r in progress][0] == 1 and {r.level for r in progress} == {1, 2, 3}
    done = [r.progress.done for r in progress]
    assert done == sorted(done) and done[-1] == TOTAL
    assert sum(1 for r in progress if r.progress.message == "done") == TOTAL

    result = final.result
    assert (result.story.key, result.reference_story.key) == (
        story_key("job-1"),
        reference_story_key("job-1"),
    )
    for ref in (result.story, result.reference_story):
        stored = store.stat(ref.key, bucket=ref.bucket)
        assert (stored.size, stored.sha256) == (ref.size, ref.sha256)
    story = Story.from_json(store.get_bytes(result.story.key))
    assert store.get_json(result.reference_story.key) == story.to_reference()
    assert (
        (result.title, result.style_keyword)
        == (story.title, story.style_keyword)
        == ("The Last Letter", "Dramatic")
    )
    assert result.frame_count == 12 and (result.llm_calls, result.cached_calls) == (TOTAL, 0)

    # asking again: the story is there and verifies, nothing is generated
    assert [r.progress.message for r in again] == ["story already generated"] * 2
    assert again[-1].result.story == result.story and again[-1].result.llm_calls == 0


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"theme": ""}, "theme"),
        ({"theme": "   "}, "theme"),
        ({"theme": "x" * 501}, "theme"),
        ({"options": plot_pb2.PlotOptions(substories=0)}, "options.substories"),
        ({"options": plot_pb2.PlotOptions(frames_per_tiny_story=-3)}, "options.frames_per_tiny_story"),
        ({"options": plot_pb2.PlotOptions(model="gpt-unknown")}, "options.model"),
        ({"job_id": "../etc"}, "job_id"),
        ({"story_index": -1}, "story_index"),
    ],
)
def test_bad_requests_are_invalid_arguments_naming_the_field(store, request_fields, field):
    async def scenario():
        with ScriptedChatServer() as llm:
            async with plot_server(store, llm) as stub:
                request = plot_pb2.GenerateStoryRequest(
                    **{"job_id": "job-1", "theme": THEME, **request_fields}
                )
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    [r async for r in stub.GenerateStory(request, timeout=10)]
                return info.value, len(llm.requests)

    error, llm_requests = run(scenario())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_detail_from(error).field == field and field in error.details()
    assert llm_requests == 0  # refused before any LLM call


def test_unset_options_mean_the_reference_counts():
    options = options_from_proto(plot_pb2.PlotOptions())
    assert options.counts() == REFERENCE_COUNTS and options.temperature is None
    assert options_from_proto(plot_pb2.PlotOptions(temperature=0.0)).temperature == 0.0


def test_a_caller_that_leaves_stops_the_generation(store):
    async def scenario():
        with ScriptedChatServer(latency=0.1) as llm:
            async with plot_server(store, llm) as stub:
                options = plot_pb2.PlotOptions(
                    substories=4, tiny_stories=4, min_locations=2, max_parallel_calls=1
                )
                call = stub.GenerateStory(
                    plot_pb2.GenerateStoryRequest(job_id="job-1", theme=THEME, options=options)
                )
                async for response in call:
                    if response.progress.done >= 3:
                        break
                call.cancel()
                await asyncio.sleep(0.4)
                settled = len(llm.requests)
                await asyncio.sleep(0.4)
                return settled, len(llm.requests)

    settled, later = run(scenario())
    assert settled == later < 1 + 4 + 16  # no more LLM calls once the caller is gone
    assert not store.exists(story_key("job-1"))


def test_the_scripted_backend_writes_a_story_through_the_openai_client_path(store):
    """Backend "scripted" (the random-weights presets' plot): plot-llm starts the scripted server inside
    itself and calls it with the OpenAI client; no endpoint is configured."""

    async def scenario():
        service = PlotService(PlotSettings(backend="scripted", model="scripted"), store)
        async with serve_plot(service) as stub:
            request = plot_pb2.GenerateStoryRequest(job_id="job-s", theme=THEME, options=OPTIONS)
            replies = [r async for r in stub.GenerateStory(request, timeout=20)]
            return replies, service._scripted.answered()

    replies, answered = run(scenario())
    assert replies[-1].HasField("result") and answered == TOTAL
    story = Story.from_json(store.get_bytes(story_key("job-s")).decode())
    assert story.substories
