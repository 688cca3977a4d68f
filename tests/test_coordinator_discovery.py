"""Renderer discovery: the EndpointSlice watch against a local server that speaks the Kubernetes API
(kmock's emulator over HTTP) driven by the official `kubernetes` client; DNS re-resolution with a fake
resolver; the choice of source from settings; the servers' max_connection_age option.

The fan-out following the pool while a story renders (a replica added mid-story, one removed mid-shard)
is in test_coordinator_fanout.py."""

from __future__ import annotations

import asyncio
import socket

import grpc
import kmock
import pytest
from kubernetes import client

from dreamframe.config import ClientSettings, ServerSettings
from dreamframe.errors import FailedPrecondition
from dreamframe.serving.server import server_options
from services.coordinator.discovery import (
    DnsWatcher,
    EndpointSliceWatcher,
    RendererPool,
    build_pool,
    connector,
    discovery_mode,
    parse_dns_target,
    slice_addresses,
)
from services.coordinator.settings import CoordinatorSettings, KubernetesSettings

NS = "dreamframe"
SERVICE = "dreamframe-keyframe-renderer"


def endpoint_slice(
    name: str, endpoints: list[tuple[str, bool, bool]], *, port=50051, service=SERVICE
) -> dict:
    """An EndpointSlice as the EndpointSlice controller writes it: (address, ready, terminating) each."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": NS, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [
            {"name": "metrics", "port": 9090, "protocol": "TCP"},
            {"name": "grpc", "port": port, "protocol": "TCP"},
        ],
        "endpoints": [endpoint(*e) for e in endpoints],
    }


def endpoint(address: str, ready: bool = True, terminating: bool = False) -> dict:
    return {
        "addresses": [address],
        "conditions": {"ready": ready, "serving": ready or terminating, "terminating": terminating},
        "targetRef": {"kind": "Pod", "name": f"pod-{address}", "namespace": NS},
    }


def lazy_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address)  # connects on first call only: none is made here


async def until(predicate, what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.02)


def test_slice_addresses_keep_ready_endpoints_on_the_grpc_port():
    s = endpoint_slice(
        "s", [("10.0.0.1", True, False), ("10.0.0.2", False, False), ("10.0.0.3", False, True)], port=7
    )
    assert slice_addresses(s) == {"10.0.0.1:7"}
    s["endpoints"].append({"addresses": ["10.0.0.4"], "conditions": {}})  # unset ready means ready
    assert slice_addresses(s) == {"10.0.0.1:7", "10.0.0.4:7"}
    s["ports"] = [{"name": "other", "port": 8}]  # one port, whatever its name
    assert slice_addresses(s) == {"10.0.0.1:8", "10.0.0.4:8"}
    s["ports"] = []
    assert slice_addresses(s) == set()
    v6 = endpoint_slice("v6", [("fd00::1", True, False)])
    assert slice_addresses(v6) == {"[fd00::1]:50051"}


def test_the_endpointslice_watch_follows_the_renderer_service():
    """Slices added, changed to not-ready / terminating, removed: the pool follows through one list and a
    watch (the official client's, against the emulator), ignoring other Services' slices."""

    async def scenario():
        async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
            url = str(server.url).rstrip("/")
            api = client.ApiClient(client.Configuration(host=url))
            slices = client.DiscoveryV1Api(api)

            def create(body):
                return asyncio.to_thread(slices.create_namespaced_endpoint_slice, NS, body)

            def patch(name, endpoints):
                body = {"endpoints": [endpoint(*e) for e in endpoints]}
                return asyncio.to_thread(slices.patch_namespaced_endpoint_slice, name, NS, body)

            await create(endpoint_slice("r-a", [("10.0.0.1", True, False), ("10.0.0.2", True, False)]))
            await create(endpoint_slice("other", [("10.9.9.9", True, False)], service="plot-llm"))
            pool = RendererPool(lazy_channel, inflight_per_replica=2, drain_seconds=0)
            pool.follow(EndpointSliceWatcher(api, NS, SERVICE, pool.update, retry_seconds=0.1))
            try:
                await until(lambda: pool.addresses() == {"10.0.0.1:50051", "10.0.0.2:50051"}, "listed")
                first = {e.name: e for e in pool.endpoints()}
                assert all(e.workers == 2 and e.active for e in first.values())

                # scale-up: the controller adds a slice (a new pod) and a ready endpoint to the first
                await create(endpoint_slice("r-b", [("10.0.1.1", True, False)]))
                await until(lambda: "10.0.1.1:50051" in pool.addresses(), "new slice seen")
                await patch(
                    "r-a", [("10.0.0.1", True, False), ("10.0.0.2", True, False), ("10.0.0.3", True, False)]
                )
                await until(lambda: len(pool) == 4, "new endpoint seen")
                assert pool.endpoints()[0] is first["10.0.0.1:50051"], "a kept replica keeps its channel"

                # a pod fails its readiness probe; another is terminating (scale-down)
                await patch(
                    "r-a", [("10.0.0.1", True, False), ("10.0.0.2", False, False), ("10.0.0.3", False, True)]
                )
                await until(
                    lambda: pool.addresses() == {"10.0.0.1:50051", "10.0.1.1:50051"}, "not ready dropped"
                )
                assert not first["10.0.0.2:50051"].active, "a retired endpoint takes no new shard"

                # ready again: back in the pool
                await patch("r-a", [("10.0.0.1", True, False), ("10.0.0.2", True, False)])
                await until(lambda: "10.0.0.2:50051" in pool.addresses(), "ready again")

                # the slice goes away (its pods are gone)
                await asyncio.to_thread(slices.delete_namespaced_endpoint_slice, "r-b", NS)
                await until(lambda: pool.addresses() == {"10.0.0.1:50051", "10.0.0.2:50051"}, "slice deleted")
                assert "10.9.9.9:50051" not in pool.addresses()
                # followed by a watch, not by polling the list
                assert len(k8s["list"]) == 1 and len(k8s["watch"]) >= 1
                assert pool.version >= 5
            finally:
                await pool.close()

    asyncio.run(scenario())


def test_the_watch_says_so_when_the_role_is_missing_and_retries(caplog):
    async def scenario():
        async with kmock.KubernetesEmulator() as k8s, kmock.Server(k8s) as server:
            url = str(server.url).rstrip("/")
            k8s["list"] << 403
            api = client.ApiClient(client.Configuration(host=url))
            pool = RendererPool(lazy_channel)
            pool.follow(EndpointSliceWatcher(api, NS, SERVICE, pool.update, retry_seconds=0.05))
            try:
                await until(lambda: len(k8s["list"]) >= 2, "retried")
                assert len(pool) == 0
            finally:
                await pool.close()

    with caplog.at_level("WARNING"):
        asyncio.run(scenario())
    assert "may not list/watch endpointslices" in caplog.text


def fake_resolver(answers: list):
    """``socket.getaddrinfo`` that returns (or raises) the next scripted answer, then the last one."""
    calls = []

    def resolve(host, port, family=0, type=0, proto=0, flags=0):
        calls.append((host, port, type))
        answer = answers[min(len(calls) - 1, len(answers) - 1)]
        if isinstance(answer, BaseException):
            raise answer
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answer]

    resolve.calls = calls
    return resolve


def test_parse_dns_targets():
    assert parse_dns_target("dns:///renderer-headless.ns.svc.cluster.local:50051") == (
        "renderer-headless.ns.svc.cluster.local",
        50051,
    )
    assert parse_dns_target("dns://8.8.8.8/renderer:7") == ("renderer", 7)
    assert parse_dns_target("dns:renderer:7") == ("renderer", 7)
    with pytest.raises(FailedPrecondition):
        parse_dns_target("dns:///renderer")
    with pytest.raises(FailedPrecondition):
        parse_dns_target("10.0.0.1:50051")


def test_dns_re_resolution_follows_the_headless_name():
    """Every interval the name is resolved again: new addresses join, missing ones leave; a name that does
    not exist (no ready pod) empties the pool, a resolver failure keeps the last set."""
    resolve = fake_resolver(
        [
            ["10.0.0.1"],
            ["10.0.0.1", "10.0.0.2"],
            socket.gaierror(socket.EAI_AGAIN, "temporary failure"),
            ["10.0.0.2"],
            socket.gaierror(socket.EAI_NONAME, "no such name"),
        ]
    )

    async def scenario():
        pool = RendererPool(lazy_channel, drain_seconds=0)
        seen: list[set[str]] = []

        def publish(addresses):
            seen.append(set(addresses))
            pool.update(addresses)

        pool.follow(DnsWatcher("dns:///renderer:50051", publish, interval=0.02, resolve=resolve))
        try:
            await until(lambda: len(resolve.calls) >= 6, "resolved six times")
        finally:
            await pool.close()
        return seen

    seen = asyncio.run(scenario())
    assert resolve.calls[0] == ("renderer", 50051, socket.SOCK_STREAM)
    # the failure published nothing: the set stayed as it was until the next answer
    assert seen[:4] == [{"10.0.0.1:50051"}, {"10.0.0.1:50051", "10.0.0.2:50051"}, {"10.0.0.2:50051"}, set()]


def test_the_source_follows_the_settings(monkeypatch):
    s = CoordinatorSettings
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert discovery_mode(s(renderer_addresses="a:1,b:2")) == "static"
    assert discovery_mode(s(renderer_addresses="dns:///r:1")) == "dns"
    assert discovery_mode(s(renderer_addresses="dns:///r:1", renderer_service="r")) == "dns"  # no API here
    in_pod = {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    assert discovery_mode(s(renderer_addresses="dns:///r:1", renderer_service="r"), in_pod) == "kubernetes"
    assert discovery_mode(s(renderer_addresses="dns:///r:1"), in_pod) == "dns"  # no Service named
    explicit = s(renderer_service="r", kubernetes=KubernetesSettings(api_host="http://127.0.0.1:1"))
    assert discovery_mode(explicit) == "kubernetes"
    assert discovery_mode(s(renderer_discovery="static", renderer_addresses="dns:///r:1"), in_pod) == "static"

    async def pools():
        connect = connector(ClientSettings())
        static = build_pool(s(renderer_addresses="127.0.0.1:1, 127.0.0.1:2"), connect)
        assert static.addresses() == {"127.0.0.1:1", "127.0.0.1:2"}
        assert [e.workers for e in static] == [2, 2] and static.wait_seconds == 0
        assert len(static) == 2  # what job status reports as renderer_replicas
        # the behaviour before discovery, kept on request: one round-robin channel, render_parallelism
        legacy = build_pool(
            s(renderer_discovery="static", renderer_addresses="dns:///r:1", render_parallelism=5), connect
        )
        assert [(e.name, e.workers) for e in legacy] == [("dns:///r:1", 5)]
        with pytest.raises(FailedPrecondition):
            build_pool(s(renderer_discovery="kubernetes"), connect)
        with pytest.raises(FailedPrecondition):
            build_pool(s(renderer_discovery="dns", renderer_addresses="a:1"), connect)
        dns = build_pool(
            s(
                renderer_addresses="dns:///r:9",
                renderer_inflight_per_replica=3,
                discovery_interval_seconds=0.02,
            ),
            connect,
            resolve=fake_resolver([["10.0.0.7", "10.0.0.8"]]),
        )
        await until(lambda: len(dns) == 2, "resolved")
        assert [e.workers for e in dns] == [3, 3]
        for pool in (static, legacy, dns):
            await pool.close()

    asyncio.run(pools())


def test_servers_close_connections_by_age_so_round_robin_clients_re_resolve():
    options = dict(server_options(ServerSettings()))
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert "grpc.max_connection_age_grace_ms" not in options, "open calls (training streams) are not cut"
    options = dict(
        server_options(ServerSettings(max_connection_age_seconds=60, max_connection_age_grace_seconds=30))
    )
    assert (options["grpc.max_connection_age_ms"], options["grpc.max_connection_age_grace_ms"]) == (
        60_000,
        30_000,
    )
    assert "grpc.max_connection_age_ms" not in dict(
        server_options(ServerSettings(max_connection_age_seconds=0))
    )
