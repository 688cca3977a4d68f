"""RenderService over real gRPC on 127.0.0.1: streams every frame once, maps errors, stops on cancel."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from dreamframe import keys
from dreamframe.config import ServerSettings
from dreamframe.serving import GrpcServer, Registration, error_detail_from
from dreamframe.storage import LocalStore, to_proto
from dreamframe.story import Story, StoryItem, Substory, TinyStory
from dreamframe.v1 import common_pb2, render_pb2, render_pb2_grpc
from services.keyframe_renderer.engine import EngineCache, load_engine
from services.keyframe_renderer.renderer import Renderer
from services.keyframe_renderer.server import RenderServicer
from services.keyframe_renderer.settings import RendererSettings

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> EngineCache:
    cache_dir = tmp_path_factory.getbasetemp() / "renderer-models"
    return EngineCache(lambda preset: load_engine(preset, model_paths={}, cache_dir=cache_dir, device="cpu"))


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store", "dreamframe")


@pytest.fixture
def servicer(store, engines) -> RenderServicer:
    renderer = Renderer(store, RendererSettings(device="cpu"), engines=engines)
    yield RenderServicer(renderer)
    renderer.close()


def story_ref(store: LocalStore, job: str, frames: int) -> common_pb2.ObjectRef:
    items = [StoryItem(kind="frame", text=f"scene {i}: a cat sits on a roof") for i in range(frames)]
    story = Story(
        overview="cats", style_keyword="Noir", substories=[Substory(tiny_stories=[TinyStory(items=items)])]
    )
    return to_proto(store.put_bytes(keys.story_key(job), story.to_json().encode()))


@contextlib.asynccontextmanager
async def serving(servicer: RenderServicer) -> AsyncIterator[render_pb2_grpc.RenderServiceStub]:
    settings = ServerSettings(host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=5.0)
    registration = Registration.of(render_pb2, render_pb2_grpc.add_RenderServiceServicer_to_server, servicer)
    async with GrpcServer([registration], settings, service_name="keyframe-renderer") as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield render_pb2_grpc.RenderServiceStub(channel)


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_stream_reports_every_frame_once_with_a_summary(store, servicer):
    ref = story_ref(store, "grpc", 5)

    async def go():
        async with serving(servicer) as stub:
            request = render_pb2.RenderFramesRequest(
                job_id="grpc", story=ref, options=render_pb2.RenderOptions(steps=8, batch_size=2)
            )
            first = [m async for m in stub.RenderFrames(request)]
            again = [m async for m in stub.RenderFrames(request)]
            return first, again

    first, again = run(go())
    indices = [f.index for m in first for f in m.frames]
    assert sorted(indices) == [0, 1, 2, 3, 4] and len(indices) == 5
    # One message per batch of 2 (the last batch holds one frame), not one per frame.
    assert [len(m.frames) for m in first if m.frames] == [2, 2, 1]
    assert not any(m.HasField("frame") for m in first), "the deprecated single-frame field stays unset"
    assert all(m.progress.total == 5 and m.progress.unit == "frames" for m in first)
    assert first[-1].HasField("summary") and not any(m.HasField("summary") for m in first[:-1])
    assert (first[-1].summary.rendered, first[-1].summary.skipped) == (5, 0)
    for f in (f for m in first for f in m.frames):
        assert f.seed == 20 + f.index and not f.skipped
        assert f.image.key == keys.frame_key("grpc", 0, f.index)
        assert store.stat(f.image.key).sha256 == f.image.sha256
        assert f.sidecar.key == keys.frame_sidecar_key("grpc", 0, f.index)
    # Second call: everything skipped, each frame still reported exactly once (in one message).
    assert [len(m.frames) for m in again if m.frames] == [5]
    skipped = [f for m in again for f in m.frames]
    assert sorted(f.index for f in skipped) == [0, 1, 2, 3, 4] and all(f.skipped for f in skipped)
    assert again[-1].summary.rendered == 0
    assert servicer.renderer.engines.loads == 1, "weights loaded once per process"


def test_bad_request_is_invalid_argument_naming_the_field(store, servicer):
    ref = story_ref(store, "bad", 3)

    async def go():
        async with serving(servicer) as stub:
            request = render_pb2.RenderFramesRequest(
                job_id="bad",
                story=ref,
                frames=common_pb2.FrameSelection(list=common_pb2.FrameList(indices=[1, 3])),
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in stub.RenderFrames(request):
                    pass
            missing = render_pb2.RenderFramesRequest(
                job_id="bad", story=common_pb2.ObjectRef(bucket="dreamframe", key="jobs/bad/nothing.json")
            )
            with pytest.raises(grpc.aio.AioRpcError) as not_found:
                async for _ in stub.RenderFrames(missing):
                    pass
            return info.value, not_found.value

    invalid, not_found = run(go())
    assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_detail_from(invalid).field == "frames.list.indices.1"
    assert not_found.code() == grpc.StatusCode.NOT_FOUND and error_detail_from(not_found).field == "story"
    assert not list(store.list(keys.frames_prefix("bad")))


def test_cancelling_the_call_stops_after_the_batch_in_flight(store, servicer):
    frames = 12
    ref = story_ref(store, "cancel", frames)

    async def go():
        async with serving(servicer) as stub:
            request = render_pb2.RenderFramesRequest(
                job_id="cancel", story=ref, options=render_pb2.RenderOptions(steps=20, batch_size=1)
            )
            call = stub.RenderFrames(request)
            while not (await call.read()).frames:
                pass
            call.cancel()
            assert await servicer.wait_idle(30)
            return await call.code()

    assert run(go()) == grpc.StatusCode.CANCELLED
    stored = {info.key for info in store.list(keys.frames_prefix("cancel"))}
    pngs = [i for i in range(frames) if keys.frame_key("cancel", 0, i) in stored]
    assert 2 <= len(pngs) < frames, f"stopped early, after the batch in flight: {pngs}"
    assert pngs == list(range(len(pngs)))
    # Every written frame is complete: PNG and sidecar, nothing half-done.
    assert all(keys.frame_sidecar_key("cancel", 0, i) in stored for i in pngs)
