"""Story boards built by a renderer replica (RenderService.BuildStoryBoard over real gRPC on 127.0.0.1),
so the coordinator decodes no thumbnail itself; the coordinator builds a board only when no replica can."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from test_coordinator_storyboard import png, story
from test_renderer_server import serving

from dreamframe import keys, storyboard
from dreamframe.storage import LocalStore, to_proto
from dreamframe.v1 import common_pb2, render_pb2
from dreamframe.v1 import coordinator_pb2 as pb
from services.coordinator import stages
from services.coordinator.clients import Clients
from services.coordinator.fanout import Endpoint
from services.coordinator.settings import CoordinatorSettings
from services.keyframe_renderer.renderer import Renderer
from services.keyframe_renderer.server import RenderServicer
from services.keyframe_renderer.settings import RendererSettings

JOB = "boards"


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store", "dreamframe")


@pytest.fixture
def servicer(store, tmp_path) -> RenderServicer:
    settings = RendererSettings(preset="sim", sim_resolution=16, preload=False)
    renderer = Renderer(store, settings, cache_dir=tmp_path / "models")
    yield RenderServicer(renderer)
    renderer.close()


def put_story_and_frames(store: LocalStore) -> common_pb2.ObjectRef:
    the_story = story()
    ref = to_proto(store.put_bytes(keys.story_key(JOB, 0), the_story.to_json().encode()))
    for i in range(the_story.frame_count):
        store.put_bytes(keys.frame_key(JOB, 0, i), png((40 * i, 90, 160)))
    return ref


def test_a_renderer_builds_the_board_once_and_refuses_bad_requests(store, servicer):
    ref = put_story_and_frames(store)

    async def go():
        async with serving(servicer) as stub:
            request = render_pb2.BuildStoryBoardRequest(job_id=JOB, story_index=0, story=ref)
            first = await stub.BuildStoryBoard(request)
            again = await stub.BuildStoryBoard(request)
            errors = []
            for bad in (
                render_pb2.BuildStoryBoardRequest(job_id="../x", story_index=0, story=ref),
                render_pb2.BuildStoryBoardRequest(job_id=JOB, story_index=0),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as failure:
                    await stub.BuildStoryBoard(bad)
                errors.append((failure.value.code(), failure.value.details()))
            servicer.draining = True
            with pytest.raises(grpc.aio.AioRpcError) as draining:
                await stub.BuildStoryBoard(request)
            return first, again, errors, draining.value.code()

    first, again, errors, draining = asyncio.run(asyncio.wait_for(go(), 60))
    assert first.built and not again.built and first.page == again.page
    assert first.page.key == storyboard.story_page_key(JOB, 0)
    assert first.thumbnails_made == story().frame_count  # no renderer thumbnails: made from the PNGs
    page = store.get_bytes(first.page.key).decode()
    assert storyboard.contact_sheet_name(0, 0) in page
    assert [code for code, _ in errors] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    assert "story" in errors[1][1]
    assert draining == grpc.StatusCode.UNAVAILABLE


class RecordingStub:
    """A renderer stub whose BuildStoryBoard answers from a real servicer, or fails with ``code``."""

    def __init__(self, servicer: RenderServicer | None, code: grpc.StatusCode | None = None) -> None:
        self.servicer, self.code, self.calls = servicer, code, 0
        self.serving = False  # inside the "renderer" right now (its builds are not the coordinator's)

    async def BuildStoryBoard(self, request, timeout=None):  # noqa: N802
        self.calls += 1
        if self.code is not None:
            raise grpc.aio.AioRpcError(self.code, grpc.aio.Metadata(), grpc.aio.Metadata(), "no such method")
        self.serving = True
        try:
            return await self.servicer.BuildStoryBoard(request, None)
        finally:
            self.serving = False


def context(store: LocalStore, stub: RecordingStub | None, **settings) -> stages.JobContext:
    renderers = [Endpoint("replica-0", stub, 2)] if stub is not None else []
    clients = Clients(plot=None, style=None, renderers=renderers, qa=None, train=None, eval=None)
    job = pb.Job(
        job_id=JOB, stages=[pb.StageStatus(stage=pb.STAGE_PLOT), pb.StageStatus(stage=pb.STAGE_RENDER)]
    )

    async def changed(persist: bool) -> None:
        return None

    return stages.JobContext(job, store, clients, CoordinatorSettings(**settings), changed)


def recorded_page(ctx: stages.JobContext) -> common_pb2.ObjectRef:
    return next(o.ref for o in ctx.stage(pb.STAGE_RENDER).outputs if o.name == "storyboard/000")


@pytest.mark.parametrize("how", ["renderer", "unimplemented", "no replica", "switched off"])
def test_the_coordinator_asks_a_renderer_and_builds_it_itself_only_when_none_can(
    store, servicer, how, monkeypatch
):
    put_story_and_frames(store)
    stub = {
        "renderer": RecordingStub(servicer),
        "unimplemented": RecordingStub(None, grpc.StatusCode.UNIMPLEMENTED),
        "no replica": None,
        "switched off": RecordingStub(servicer),
    }[how]
    ctx = context(store, stub, storyboard_on_renderers=how != "switched off")
    built_here = []
    original = storyboard.ensure_story_board

    def local(*args, **kwargs):
        if not (stub is not None and stub.serving):
            built_here.append(args[2])
        return original(*args, **kwargs)

    monkeypatch.setattr(storyboard, "ensure_story_board", local)
    asyncio.run(stages.story_storyboard(ctx, 0))
    assert recorded_page(ctx).key == storyboard.story_page_key(JOB, 0)
    assert store.exists(storyboard.story_page_key(JOB, 0))
    asked = stub.calls if stub is not None else 0
    if how == "renderer":
        assert asked == 1 and built_here == []
    else:
        assert built_here == [0]
        assert asked == (1 if how == "unimplemented" else 0)
