"""The coordinator's render metrics (what KEDA, an HPA or the built-in scaler scale the renderer on) move
with a real fan-out over real gRPC: pending drops by one per frame delivered, in-flight counts the frames
at a replica and returns to 0, also when a replica dies mid-shard or the render is cancelled; they are
served on the GrpcServer's /metrics."""

from __future__ import annotations

import asyncio
import urllib.request

from dreamframe.config import ClientSettings, ServerSettings
from dreamframe.serving import GrpcServer, Registration, make_channel
from dreamframe.v1 import render_pb2, render_pb2_grpc
from services.coordinator.fanout import Endpoint, render_frames
from services.coordinator.metrics import CoordinatorMetrics

FRAMES = 40
SHARD = 4


class Replica(render_pb2_grpc.RenderServiceServicer):
    """Reports each frame of a shard after a short delay; ``die_after`` frames, it stops its server."""

    def __init__(self, *, die_after: int | None = None, delay: float = 0.005) -> None:
        self.die_after = die_after
        self.delay = delay
        self.reported = 0
        self.server: GrpcServer | None = None
        self.started = asyncio.Event()

    async def RenderFrames(self, request, context):  # noqa: N802
        self.started.set()
        for index in request.frames.list.indices:
            if self.die_after is not None and self.reported >= self.die_after:
                asyncio.get_running_loop().create_task(self.server.stop(0))
                await asyncio.sleep(10)
            await asyncio.sleep(self.delay)
            self.reported += 1
            yield render_pb2.RenderFramesResponse(frames=[render_pb2.RenderedFrame(index=index)])


async def serve(replica: Replica) -> GrpcServer:
    replica.server = GrpcServer(
        [Registration.of(render_pb2, render_pb2_grpc.add_RenderServiceServicer_to_server, replica)],
        ServerSettings(host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=0),
        service_name="replica",
    )
    await replica.server.start()
    return replica.server


async def fan_out(replicas: list[Replica], metrics: CoordinatorMetrics, samples: list, **kw):
    servers = [await serve(r) for r in replicas]
    client = ClientSettings(deadline_seconds=5, stream_deadline_seconds=30, max_attempts=1)
    channels = [make_channel(s.address, client) for s in servers]
    endpoints = [
        Endpoint(f"r{i}", render_pb2_grpc.RenderServiceStub(c), workers=2) for i, c in enumerate(channels)
    ]
    try:
        return await render_frames(
            endpoints,
            render_pb2.RenderFramesRequest(job_id="metrics"),
            list(range(FRAMES)),
            shard_size=SHARD,
            on_frames=lambda frames, result: samples.append(
                (len(result.frames), metrics.pending, metrics.inflight)
            ),
            backoff_seconds=0.05,
            meter=metrics,
            **kw,
        )
    finally:
        for c in channels:
            await c.close()
        for s in servers:
            await s.stop(0)


def test_pending_drops_per_frame_and_in_flight_returns_to_zero():
    metrics = CoordinatorMetrics()
    samples: list[tuple[int, int, int]] = []
    result = asyncio.run(fan_out([Replica(), Replica()], metrics, samples))
    assert sorted(result.frames) == list(range(FRAMES))
    # After the k-th frame: FRAMES - k pending, of which at most 2 replicas × 2 workers × a shard in flight.
    assert (
        [p for _, p, _ in samples] == [FRAMES - k for k, _, _ in samples] == list(range(FRAMES - 1, -1, -1))
    )
    assert all(0 <= f <= min(p, 2 * 2 * SHARD) for _, p, f in samples), samples
    assert max(f for _, _, f in samples) > 0, "frames were seen in flight"
    assert (metrics.pending, metrics.inflight) == (0, 0)
    assert metrics.frames.labels("rendered")._value.get() == FRAMES  # each frame counted once


def test_a_replica_dying_mid_shard_gives_its_frames_back():
    metrics = CoordinatorMetrics()
    samples: list[tuple[int, int, int]] = []
    result = asyncio.run(fan_out([Replica(), Replica(die_after=3)], metrics, samples))
    assert sorted(result.frames) == list(range(FRAMES)) and result.resent_shards >= 1
    assert [p for _, p, _ in samples] == list(range(FRAMES - 1, -1, -1))
    assert (metrics.pending, metrics.inflight) == (0, 0)
    assert metrics.shards_resent._value.get() == result.resent_shards


def test_a_cancelled_render_gives_every_frame_back():
    metrics = CoordinatorMetrics()

    async def scenario():
        slow = [Replica(delay=0.5), Replica(delay=0.5)]
        task = asyncio.create_task(fan_out(slow, metrics, []))
        await slow[0].started.wait()
        await asyncio.sleep(0.1)
        during = (metrics.pending, metrics.inflight)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return during

    pending, inflight = asyncio.run(scenario())
    assert pending == FRAMES and 0 < inflight <= 2 * 2 * SHARD, (pending, inflight)
    assert (metrics.pending, metrics.inflight) == (0, 0)


def test_the_metrics_are_served_on_the_servers_metrics_port():
    metrics = CoordinatorMetrics()
    metrics.add(pending=120, inflight=16)

    async def scrape() -> str:
        server = GrpcServer(
            [], ServerSettings(host="127.0.0.1", port=0, metrics_port=0), service_name="coordinator"
        )
        metrics.register(server.metrics.registry)  # as services/coordinator/server.py does
        async with server:
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())

    text = asyncio.run(scrape())
    assert "dreamframe_render_frames_pending 120.0" in text
    assert "dreamframe_render_frames_inflight 16.0" in text
