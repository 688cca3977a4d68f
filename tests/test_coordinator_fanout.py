"""Render fan-out over replicas, over real gRPC: shards spread over every replica, a replica that dies
mid-shard has its unfinished frames re-sent elsewhere, and every frame arrives exactly once.

The replicas here are scripted RenderService servers (they write a small deterministic PNG per frame,
skipping frames already stored, as the real renderer does) so a replica's death can be placed exactly;
the end-to-end tests run the real renderer."""

from __future__ import annotations

import asyncio
import io
import socket

import grpc
import pytest
from PIL import Image

from dreamframe import keys
from dreamframe.config import ClientSettings, ServerSettings
from dreamframe.errors import InvalidArgument, Unavailable
from dreamframe.serving import GrpcServer, Registration, make_channel
from dreamframe.storage import LocalStore, to_proto
from dreamframe.v1 import render_pb2, render_pb2_grpc
from services.coordinator.fanout import Endpoint, render_frames, shards_of, split_targets

JOB = "fanout-job"


class ScriptedRenderer(render_pb2_grpc.RenderServiceServicer):
    def __init__(self, store: LocalStore, *, die_after: int | None = None, delay: float = 0.005) -> None:
        self.store = store
        self.die_after = die_after
        self.delay = delay
        self.rendered: list[int] = []
        self.calls = 0
        self.open_calls = 0
        self.most_open_calls = 0
        self.server: GrpcServer | None = None

    async def RenderFrames(self, request, context):
        self.calls += 1
        self.open_calls += 1
        self.most_open_calls = max(self.most_open_calls, self.open_calls)
        try:
            async for response in self._render(request):
                yield response
        finally:
            self.open_calls -= 1

    async def _render(self, request):
        for index in request.frames.list.indices:
            if index < 0:
                raise InvalidArgument("must be >= 0", field="frames.list.indices")
            if self.die_after is not None and len(self.rendered) >= self.die_after:
                # The replica goes away mid-shard: the server stops, connections drop.
                asyncio.get_running_loop().create_task(self.server.stop(0))
                await asyncio.sleep(10)
            await asyncio.sleep(self.delay)
            key = keys.frame_key(JOB, 0, index)
            skipped = self.store.exists(key)
            if skipped:
                ref = self.store.stat(key)
            else:
                buf = io.BytesIO()
                Image.new("RGB", (8, 8), (index % 256, 0, 0)).save(buf, format="PNG")
                ref = self.store.put_bytes(key, buf.getvalue())
                self.rendered.append(index)
            yield render_pb2.RenderFramesResponse(
                frames=[
                    render_pb2.RenderedFrame(
                        index=index, image=to_proto(ref), seed=20 + index, skipped=skipped
                    )
                ]
            )


async def start(servicer: ScriptedRenderer) -> GrpcServer:
    server = GrpcServer(
        [Registration.of(render_pb2, render_pb2_grpc.add_RenderServiceServicer_to_server, servicer)],
        ServerSettings(port=0, metrics_port=-1, grace_seconds=0),
        service_name="scripted-renderer",
    )
    servicer.server = server
    await server.start()
    return server


def template() -> render_pb2.RenderFramesRequest:
    return render_pb2.RenderFramesRequest(job_id=JOB, story_index=0)


def client() -> ClientSettings:
    return ClientSettings(deadline_seconds=5, stream_deadline_seconds=30, max_attempts=1)


def test_split_targets_and_shards():
    assert split_targets("dns:///renderer-headless:50051") == ["dns:///renderer-headless:50051"]
    assert split_targets(" a:1, b:2 ,") == ["a:1", "b:2"]
    assert [s.indices for s in shards_of(list(range(5)), 2)] == [[0, 1], [2, 3], [4]]


def test_a_replica_dying_mid_shard_loses_no_frame_and_duplicates_none(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path, "bucket")
        healthy, dying = ScriptedRenderer(store), ScriptedRenderer(store, die_after=3)
        servers = [await start(healthy), await start(dying)]
        channels = [make_channel(s.address, client()) for s in servers]
        endpoints = [Endpoint(f"r{i}", render_pb2_grpc.RenderServiceStub(c)) for i, c in enumerate(channels)]
        seen: list[int] = []
        try:
            result = await render_frames(
                endpoints,
                template(),
                list(range(40)),
                shard_size=4,
                on_frames=lambda frames, _: seen.extend(f.index for f in frames),
                backoff_seconds=0.05,
            )
        finally:
            for c in channels:
                await c.close()
            for s in servers:
                await s.stop(0)
        return store, healthy, dying, result, seen

    store, healthy, dying, result, seen = asyncio.run(scenario())
    assert sorted(seen) == list(range(40)), "every frame reported exactly once"
    assert sorted(result.frames) == list(range(40))
    assert len(dying.rendered) == 3 and healthy.rendered, "both replicas did work before one died"
    assert sorted(healthy.rendered + dying.rendered) == list(range(40)), "no frame rendered twice"
    assert result.resent_shards >= 1
    assert result.by_endpoint == {"r0": len(healthy.rendered), "r1": 3}, "who delivered each frame"
    assert sum(result.by_endpoint.values()) == 40
    assert sorted(int(i.key[-10:-4]) for i in store.list(keys.frames_prefix(JOB, 0))) == list(range(40))


def test_frames_already_stored_count_once_as_skipped(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path, "bucket")
        renderer = ScriptedRenderer(store)
        server = await start(renderer)
        channel = make_channel(server.address, client())
        endpoint = [Endpoint("r", render_pb2_grpc.RenderServiceStub(channel), workers=3)]
        try:
            first = await render_frames(endpoint, template(), list(range(10)), shard_size=3)
            second = await render_frames(endpoint, template(), list(range(12)), shard_size=3)
        finally:
            await channel.close()
            await server.stop(0)
        return renderer, first, second

    renderer, first, second = asyncio.run(scenario())
    assert (first.rendered, first.skipped) == (10, 0)
    assert (second.rendered, second.skipped) == (2, 10)
    assert sorted(renderer.rendered) == list(range(12))


def test_a_bad_request_fails_at_once_and_all_replicas_down_is_unavailable(tmp_path):
    async def scenario():
        store = LocalStore(tmp_path, "bucket")
        renderer = ScriptedRenderer(store)
        server = await start(renderer)
        channel = make_channel(server.address, client())
        good = Endpoint("r", render_pb2_grpc.RenderServiceStub(channel))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await render_frames([good], template(), [3, -1], shard_size=2)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert renderer.calls == 1, "a bad request is not retried"
        await channel.close()
        await server.stop(0)

        dead = make_channel(server.address, client())  # nothing listens there any more
        with pytest.raises(Unavailable):
            await render_frames(
                [Endpoint("dead", render_pb2_grpc.RenderServiceStub(dead))],
                template(),
                [0, 1],
                shard_size=1,
                max_attempts=3,
                backoff_seconds=0.01,
            )
        await dead.close()

    asyncio.run(scenario())


def test_a_dead_replica_does_not_use_up_the_attempts_while_a_busy_one_works(tmp_path):
    """One replica is gone for good (connection refused at once), the other is slow: every shard the dead
    one grabs comes back to the queue, and the slow one ends up rendering them all."""

    async def scenario():
        store = LocalStore(tmp_path, "bucket")
        slow = ScriptedRenderer(store, delay=0.05)
        server = await start(slow)
        with socket.socket() as s:  # a port nothing listens on
            s.bind(("127.0.0.1", 0))
            dead_address = f"127.0.0.1:{s.getsockname()[1]}"
        channels = [make_channel(server.address, client()), make_channel(dead_address, client())]
        endpoints = [Endpoint(f"r{i}", render_pb2_grpc.RenderServiceStub(c)) for i, c in enumerate(channels)]
        try:
            result = await render_frames(
                endpoints, template(), list(range(24)), shard_size=2, backoff_seconds=0.01, max_attempts=2
            )
        finally:
            for c in channels:
                await c.close()
            await server.stop(0)
        return slow, result

    slow, result = asyncio.run(scenario())
    assert sorted(result.frames) == list(range(24)) and sorted(slow.rendered) == list(range(24))
    assert result.by_endpoint == {"r0": 24}
    assert result.resent_shards > 2, "the dead replica failed more shards than the attempt cap"


# --- following renderer discovery while a story renders -------------------------------------------

NS = "dreamframe"
SERVICE = "dreamframe-keyframe-renderer"


def renderer_slice(name: str, port: int, *, ready: bool = True, terminating: bool = False) -> dict:
    """The EndpointSlice of one renderer pod (each test server listens on its own port)."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS, "labels": {"kubernetes.io/service-name": SERVICE}},
        "addressType": "IPv4",
        "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["127.0.0.1"], "conditions": {"ready": ready, "terminating": terminating}}
        ],
    }


def port_of(server: GrpcServer) -> int:
    return int(server.address.rsplit(":", 1)[1])


async def watched_pool(k8s_url: str, **kw):
    """A RendererPool fed by the EndpointSlice watch over the emulator (the official client)."""
    from kubernetes import client as k8s_client

    from services.coordinator.discovery import EndpointSliceWatcher, RendererPool

    api = k8s_client.ApiClient(k8s_client.Configuration(host=k8s_url))
    pool = RendererPool(lambda address: make_channel(address, client()), **kw)
    pool.follow(EndpointSliceWatcher(api, NS, SERVICE, pool.update, retry_seconds=0.1))
    return pool, k8s_client.DiscoveryV1Api(api)


def test_a_replica_added_mid_story_gets_shards_within_seconds(tmp_path):
    """The Deployment scales up while a story renders: the new pod's EndpointSlice shows up in the watch
    and the running fan-out gives it workers (inflight_per_replica of them) at once."""
    import kmock

    async def scenario():
        store = LocalStore(tmp_path, "bucket")
        first, added = ScriptedRenderer(store, delay=0.02), ScriptedRenderer(store, delay=0.02)
        servers = [await start(first), await start(added)]
        async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as api_server:
            pool, slices = await watched_pool(str(api_server.url).rstrip("/"), inflight_per_replica=2)
            await asyncio.to_thread(
                slices.create_namespaced_endpoint_slice, NS, renderer_slice("r-1", port_of(servers[0]))
            )
            for _ in range(250):
                if len(pool):
                    break
                await asyncio.sleep(0.02)
            loop = asyncio.get_running_loop()
            timeline: dict[str, float] = {}

            def on_frames(frames, result):
                if len(result.frames) >= 10 and "added" not in timeline:
                    timeline["added"] = loop.time()
                    loop.create_task(
                        asyncio.to_thread(
                            slices.create_namespaced_endpoint_slice,
                            NS,
                            renderer_slice("r-2", port_of(servers[1])),
                        )
                    )
                if added.rendered and "first_shard" not in timeline:
                    timeline["first_shard"] = loop.time()

            try:
                result = await render_frames(
                    pool, template(), list(range(200)), shard_size=4, on_frames=on_frames
                )
            finally:
                await pool.close()
                for s in servers:
                    await s.stop(0)
        return first, added, result, timeline, {f"127.0.0.1:{port_of(s)}" for s in servers}

    first, added, result, timeline, names = asyncio.run(scenario())
    assert sorted(result.frames) == list(range(200)) and result.duplicate_reports == 0
    assert sorted(first.rendered + added.rendered) == list(range(200)), "each frame rendered once"
    assert len(added.rendered) >= 40, "the added replica took a fair share of what was left"
    assert timeline["first_shard"] - timeline["added"] < 3.0, "its first shard within seconds"
    assert set(result.by_endpoint) == names


def test_a_replica_removed_mid_shard_loses_no_frame(tmp_path):
    """Scale-down: a pod turns terminating while it renders a shard. It gets no new shard; when it stops
    answering past the drain time its channel is closed and the frames it had not reported are re-sent
    to the replica that remains. Every frame arrives exactly once."""
    import kmock

    async def scenario():
        store = LocalStore(tmp_path, "bucket")
        stays, leaves = ScriptedRenderer(store, delay=0.01), ScriptedRenderer(store, delay=0.01)
        servers = [await start(stays), await start(leaves)]
        async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as api_server:
            pool, slices = await watched_pool(str(api_server.url).rstrip("/"), drain_seconds=0.3)
            for name, server in (("r-1", servers[0]), ("r-2", servers[1])):
                await asyncio.to_thread(
                    slices.create_namespaced_endpoint_slice, NS, renderer_slice(name, port_of(server))
                )
            for _ in range(250):
                if len(pool) == 2:
                    break
                await asyncio.sleep(0.02)
            loop = asyncio.get_running_loop()
            leaving = next(e for e in pool.endpoints() if e.name.endswith(f":{port_of(servers[1])}"))
            seen: list[int] = []
            marks: dict[str, int] = {}

            async def note_retirement():
                while leaving.active:
                    await pool.wait_changed()
                marks["sent_when_retired"] = leaving.sent  # no shard can be sent to it after this

            retired = asyncio.create_task(note_retirement())

            def on_frames(frames, result):
                seen.extend(f.index for f in frames)
                if len(leaves.rendered) >= 6 and "removed" not in marks:
                    marks["removed"] = leaves.calls
                    leaves.delay = 60  # it hangs in the middle of its current shard
                    loop.create_task(
                        asyncio.to_thread(
                            slices.patch_namespaced_endpoint_slice,
                            "r-2",
                            NS,
                            renderer_slice("r-2", port_of(servers[1]), ready=False, terminating=True),
                        )
                    )

            try:
                result = await render_frames(
                    pool, template(), list(range(80)), shard_size=4, on_frames=on_frames, backoff_seconds=0.05
                )
                await asyncio.wait_for(retired, 10)
            finally:
                await pool.close()
                for s in servers:
                    await s.stop(0)
        return stays, leaves, result, seen, marks, leaving

    stays, leaves, result, seen, marks, leaving = asyncio.run(scenario())
    assert sorted(seen) == list(range(80)), "every frame reported exactly once"
    assert sorted(stays.rendered + leaves.rendered) == list(range(80)), "none lost, none rendered twice"
    assert leaving.sent == marks["sent_when_retired"], "no new shard after it turned terminating"
    assert leaves.calls <= marks["removed"] + 2, "at most the shards already on their way (2 in flight)"
    assert result.resent_shards >= 1 and stays.rendered
    assert sum(result.by_endpoint.values()) == 80


def test_a_render_waits_for_a_first_replica_and_gives_up_after_wait_seconds(tmp_path):
    """Scale-up from zero: the fan-out waits for the pool's first replica; with none for wait_seconds it
    fails Unavailable."""
    from services.coordinator.discovery import RendererPool

    async def scenario():
        store = LocalStore(tmp_path, "bucket")
        renderer = ScriptedRenderer(store)
        server = await start(renderer)
        pool = RendererPool(lambda address: make_channel(address, client()), wait_seconds=30)
        asyncio.get_running_loop().call_later(0.3, pool.update, {server.address})
        try:
            result = await render_frames(pool, template(), list(range(8)), shard_size=2)
            empty = RendererPool(lambda address: make_channel(address, client()), wait_seconds=0.2)
            with pytest.raises(Unavailable):
                await render_frames(empty, template(), [0], shard_size=1)
        finally:
            await pool.close()
            await server.stop(0)
        return result

    assert sorted(asyncio.run(scenario()).frames) == list(range(8))


def test_a_stream_older_than_max_connection_age_is_not_cut(tmp_path):
    """Servers close connections by age (GOAWAY) so round-robin clients re-resolve; a call still open on
    the old connection runs to its end (no grace limit by default), and the next call simply reconnects."""

    async def scenario():
        store = LocalStore(tmp_path, "bucket")
        renderer = ScriptedRenderer(store, delay=0.1)
        server = GrpcServer(
            [Registration.of(render_pb2, render_pb2_grpc.add_RenderServiceServicer_to_server, renderer)],
            ServerSettings(port=0, metrics_port=-1, grace_seconds=0, max_connection_age_seconds=0.3),
            service_name="aged-renderer",
        )
        renderer.server = server
        await server.start()
        channel = make_channel(server.address, client())
        endpoint = [Endpoint("r", render_pb2_grpc.RenderServiceStub(channel))]
        try:
            long = await render_frames(endpoint, template(), list(range(15)), shard_size=15)  # ~1.5 s
            again = await render_frames(endpoint, template(), [15, 16], shard_size=2)
        finally:
            await channel.close()
            await server.stop(0)
        return long, again

    long, again = asyncio.run(scenario())
    assert (long.rendered, long.resent_shards, again.rendered) == (15, 0, 2)


def test_a_replica_has_its_inflight_shards_in_all_however_many_stories_render(tmp_path):
    """Concurrency is ready replicas × inflight_per_replica for the whole coordinator: four stories
    rendering at once over one replica with 2 slots never have more than 2 calls open on it."""

    async def scenario():
        store = LocalStore(tmp_path, "bucket")
        replica = ScriptedRenderer(store, delay=0.002)
        server = await start(replica)
        channel = make_channel(server.address, client())
        endpoint = Endpoint("r0", render_pb2_grpc.RenderServiceStub(channel), workers=2)
        try:
            results = await asyncio.gather(
                *(
                    render_frames(
                        [endpoint],
                        render_pb2.RenderFramesRequest(job_id=JOB, story_index=0),
                        list(range(story * 40, story * 40 + 40)),
                        shard_size=4,
                    )
                    for story in range(4)
                )
            )
        finally:
            await channel.close()
            await server.stop(0)
        return replica, results

    replica, results = asyncio.run(scenario())
    assert [sorted(r.frames) for r in results] == [list(range(s * 40, s * 40 + 40)) for s in range(4)]
    assert replica.most_open_calls == 2, replica.most_open_calls
