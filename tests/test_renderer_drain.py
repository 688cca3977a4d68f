"""Scale-down loses no work: a renderer that gets SIGTERM (a real signal, to a GrpcServer running the real
RenderServicer in this process, as ``amain`` wires it) answers NOT_SERVING at once, refuses new
RenderFrames with UNAVAILABLE, finishes the batch in flight and reports every frame it stored; and the
coordinator's fan-out gives what it did not reach to another replica."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dreamframe import keys
from dreamframe.config import ClientSettings, ServerSettings
from dreamframe.errors import Unavailable
from dreamframe.serving import GrpcServer, Registration, make_channel
from dreamframe.storage import LocalStore, to_proto
from dreamframe.story import Story, StoryItem, Substory, TinyStory
from dreamframe.v1 import render_pb2, render_pb2_grpc
from services.coordinator.fanout import Endpoint, render_frames
from services.coordinator.metrics import CoordinatorMetrics
from services.keyframe_renderer.engine import EngineCache, load_engine
from services.keyframe_renderer.renderer import Renderer
from services.keyframe_renderer.server import RenderServicer
from services.keyframe_renderer.settings import RendererSettings

pytestmark = pytest.mark.usefixtures("one_thread")

FRAMES = 12
BATCH = 2
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store", "dreamframe")


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> EngineCache:
    cache_dir = tmp_path_factory.getbasetemp() / "drain-models"
    return EngineCache(lambda preset: load_engine(preset, model_paths={}, cache_dir=cache_dir, device="cpu"))


def make_servicer(store: LocalStore, engines: EngineCache) -> RenderServicer:
    return RenderServicer(Renderer(store, RendererSettings(device="cpu"), engines=engines))


@pytest.fixture
def servicer(store, engines) -> RenderServicer:
    servicer = make_servicer(store, engines)
    yield servicer
    servicer.renderer.close()


def story_ref(store: LocalStore, job: str, batch: int = BATCH) -> render_pb2.RenderFramesRequest:
    items = [StoryItem(kind="frame", text=f"scene {i}: a heron on a pier") for i in range(FRAMES)]
    story = Story(
        overview="heron", style_keyword="Ink", substories=[Substory(tiny_stories=[TinyStory(items=items)])]
    )
    ref = to_proto(store.put_bytes(keys.story_key(job), story.to_json().encode()))
    return render_pb2.RenderFramesRequest(
        job_id=job, story=ref, options=render_pb2.RenderOptions(steps=20, batch_size=batch)
    )


def test_sigterm_drains_the_batch_in_flight_and_refuses_new_renders(store, servicer):
    request = story_ref(store, "drain")
    late = story_ref(store, "late")
    grace = 60.0

    async def go():
        settings = ServerSettings(host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=grace)
        server = GrpcServer(
            [Registration.of(render_pb2, render_pb2_grpc.add_RenderServiceServicer_to_server, servicer)],
            settings,
            service_name="keyframe-renderer",
            shutdown_hooks=[lambda: servicer.drain(grace)],  # what amain installs
        )
        running = asyncio.create_task(server.run_forever())  # handles SIGTERM like the real process
        while server.port is None:
            await asyncio.sleep(0.01)
        async with grpc.aio.insecure_channel(server.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == SERVING
            stub = render_pb2_grpc.RenderServiceStub(channel)
            call = stub.RenderFrames(request)
            reported: list[int] = []
            while not (message := await call.read()).frames:
                pass
            reported.extend(f.index for f in message.frames)

            os.kill(os.getpid(), signal.SIGTERM)
            # NOT_SERVING at once (the render is still running).
            assert (await asyncio.wait_for(watch.read(), 2)).status == NOT_SERVING
            assert server.health.status("") == NOT_SERVING and servicer.draining
            # A new shard sent now is refused with UNAVAILABLE: the coordinator re-queues it elsewhere.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.RenderFrames(late, timeout=10):
                    pass
            # And one that reaches the servicer during the drain (a race with the server's stop) too.
            with pytest.raises(Unavailable):
                async for _ in servicer.RenderFrames(late, None):
                    pass
            # The running render finishes its batch in flight and reports it before ending.
            try:
                while (message := await call.read()) is not grpc.aio.EOF:
                    reported.extend(f.index for f in message.frames)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
        await asyncio.wait_for(running, grace)  # run_forever returns: a clean exit
        return refused.value.code(), code, reported

    refused, code, reported = asyncio.run(asyncio.wait_for(go(), 180))
    assert refused == grpc.StatusCode.UNAVAILABLE
    stored = {info.key for info in store.list(keys.frames_prefix("drain"))}
    pngs = [i for i in range(FRAMES) if keys.frame_key("drain", 0, i) in stored]
    # Stopped early, after whole batches: nothing half done, and every stored frame was reported.
    assert code == grpc.StatusCode.CANCELLED, code
    assert BATCH <= len(pngs) < FRAMES and len(pngs) % BATCH == 0, pngs
    assert sorted(reported) == pngs == list(range(len(pngs)))
    assert all(keys.frame_sidecar_key("drain", 0, i) in stored for i in pngs)
    assert not list(store.list(keys.frames_prefix("late"))), "nothing rendered for the refused call"


def test_a_replica_drained_mid_job_loses_no_frame(store, engines):
    """Two real renderers; one is stopped (the path SIGTERM takes) while it renders a shard: the fan-out
    stores every frame once, the stopped replica's unreached frames rendered by the other."""
    request = story_ref(store, "fleet", batch=1)  # "a" stops one frame after the first it reports
    grace = 60.0
    servicers = {"a": make_servicer(store, engines), "b": make_servicer(store, engines)}

    async def go():
        servers = {}
        for name, servicer in servicers.items():
            servers[name] = GrpcServer(
                [Registration.of(render_pb2, render_pb2_grpc.add_RenderServiceServicer_to_server, servicer)],
                ServerSettings(host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=grace),
                service_name=f"keyframe-renderer-{name}",
                shutdown_hooks=[lambda s=servicer: s.drain(grace)],
            )
            await servers[name].start()
        client = ClientSettings(deadline_seconds=10, stream_deadline_seconds=120, max_attempts=1)
        channels = {name: make_channel(server.address, client) for name, server in servers.items()}
        endpoints = [Endpoint(n, render_pb2_grpc.RenderServiceStub(c)) for n, c in channels.items()]
        metrics = CoordinatorMetrics()
        stopping: list[asyncio.Task] = []

        def on_frames(frames, result) -> None:
            if result.by_endpoint.get("a") and not stopping:  # "a" is mid-shard: scale it down
                stopping.append(asyncio.create_task(servers["a"].stop()))

        try:
            result = await render_frames(
                endpoints,
                request,
                list(range(FRAMES)),
                shard_size=FRAMES // 2,
                on_frames=on_frames,
                backoff_seconds=0.2,
                meter=metrics,
            )
            await asyncio.gather(*stopping)
        finally:
            for channel in channels.values():
                await channel.close()
            for server in servers.values():
                await server.stop(0)
        return result, metrics

    try:
        result, metrics = asyncio.run(asyncio.wait_for(go(), 240))
    finally:
        for servicer in servicers.values():
            servicer.renderer.close()
    assert sorted(result.frames) == list(range(FRAMES)), "every frame delivered"
    assert 0 < result.by_endpoint["a"] < FRAMES // 2 < result.by_endpoint["b"], result.by_endpoint
    assert result.resent_shards >= 1
    stored = {info.key for info in store.list(keys.frames_prefix("fleet"))}
    assert all(keys.frame_key("fleet", 0, i) in stored for i in range(FRAMES))
    rendered = sum(s.renderer.frames_rendered for s in servicers.values())
    assert rendered == FRAMES, "no frame rendered twice"
    assert (metrics.pending, metrics.inflight) == (0, 0)
