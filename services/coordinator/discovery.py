"""Renderer discovery: the set of ready keyframe-renderer replicas, followed while jobs run.

``RendererPool`` holds one ``fanout.Endpoint`` (its own channel, ``inflight_per_replica`` shards in flight)
per ready replica address, and is what ``fanout.render_frames`` renders over. A source keeps it current:

- ``EndpointSliceWatcher`` (Kubernetes): lists, then watches, the EndpointSlices of the renderer Service
  (label ``kubernetes.io/service-name=<service>``) through the API with the official client; an endpoint
  counts while its ``ready`` condition is not false and it is not ``terminating``. The coordinator's Role
  grants list/watch on ``discovery.k8s.io`` endpointslices for this.
- ``DnsWatcher`` (elsewhere): re-resolves the ``dns:///name:port`` of a headless Service every
  ``discovery_interval_seconds`` (``socket.getaddrinfo`` in a thread).
- a static address list: set once.

A replica that appears gets workers in the running fan-outs at once. One that leaves (not ready,
terminating, gone) takes no new shard; the shard it is working on may finish for ``drain_seconds``, then its
channel is closed, which ends the call: the frames it had not reported go back on the queue.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc

from dreamframe.config import ClientSettings
from dreamframe.errors import FailedPrecondition
from dreamframe.v1 import render_pb2_grpc
from services.coordinator.settings import CoordinatorSettings

from .fanout import Endpoint, split_targets

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class RendererPool:
    """The renderer replicas the fan-out may use: one Endpoint, with its own channel, per address."""

    def __init__(
        self,
        connect: Callable[[str], grpc.aio.Channel],
        *,
        inflight_per_replica: int = 2,
        drain_seconds: float = 120.0,
        wait_seconds: float = 1800.0,
    ) -> None:
        self._connect = connect
        self.inflight_per_replica = inflight_per_replica
        self.drain_seconds = drain_seconds
        self.wait_seconds = wait_seconds
        self._endpoints: dict[str, Endpoint] = {}
        self._retired: dict[Endpoint, grpc.aio.Channel] = {}
        self._channels: dict[Endpoint, grpc.aio.Channel] = {}
        self._changed = asyncio.Event()
        self._closing: set[asyncio.Task[None]] = set()
        self._sources: list[Any] = []
        self.version = 0

    # --- what the fan-out reads ------------------------------------------------------------------
    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    def addresses(self) -> set[str]:
        return set(self._endpoints)

    def __len__(self) -> int:
        return len(self._endpoints)

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(self.endpoints())

    async def wait_changed(self) -> None:
        await self._changed.wait()

    # --- what sources call -----------------------------------------------------------------------
    def update(self, addresses: Iterable[str], *, workers: int | None = None) -> None:
        """Make the pool exactly ``addresses`` (``host:port`` or any gRPC target)."""
        wanted = set(addresses)
        added = sorted(wanted - self._endpoints.keys())
        removed = sorted(self._endpoints.keys() - wanted)
        for address in added:
            channel = self._connect(address)
            endpoint = Endpoint(
                address,
                render_pb2_grpc.RenderServiceStub(channel),
                workers or self.inflight_per_replica,
            )
            self._endpoints[address] = endpoint
            self._channels[endpoint] = channel
        for address in removed:
            self._retire(self._endpoints.pop(address))
        if added or removed:
            log.info(
                "renderer replicas: %d ready (+%s, -%s)",
                len(self._endpoints),
                ",".join(added) or "none",
                ",".join(removed) or "none",
            )
            self.version += 1
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

    def _retire(self, endpoint: Endpoint) -> None:
        endpoint.active = False  # no new shard
        channel = self._channels.pop(endpoint)
        self._retired[endpoint] = channel
        if endpoint.inflight == 0:
            self._close(endpoint)
        else:
            asyncio.get_running_loop().call_later(self.drain_seconds, self._close, endpoint)

    def _close(self, endpoint: Endpoint) -> None:
        channel = self._retired.pop(endpoint, None)
        if channel is None:
            return
        if endpoint.inflight:
            log.warning(
                "renderer %s left %.0f s ago with a shard unfinished; re-sending its frames",
                endpoint.name,
                self.drain_seconds,
            )
        task = asyncio.get_running_loop().create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # --- lifecycle -------------------------------------------------------------------------------
    def follow(self, source: Any) -> None:
        """Start ``source`` (it calls ``update``) and stop it on ``close``."""
        self._sources.append(source)
        source.start()

    async def close(self) -> None:
        for source in self._sources:
            source.stop()
        channels = [*self._channels.values(), *self._retired.values()]
        self._channels.clear()
        self._retired.clear()
        self._endpoints.clear()
        for channel in channels:
            await channel.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


# --- DNS -------------------------------------------------------------------------------------------


def parse_dns_target(target: str) -> tuple[str, int]:
    """``dns:///name:port`` (or ``dns://authority/name:port``, ``dns:name:port``) -> (name, port)."""
    rest = target.strip()
    if not rest.startswith("dns:"):
        raise FailedPrecondition(f"{target!r} is not a dns: target", field="coordinator.renderer_addresses")
    rest = rest[4:]
    if rest.startswith("//"):
        rest = rest[2:].partition("/")[2]
    host, port = split_host_port(rest)
    if port is None:
        raise FailedPrecondition(f"{target!r} names no port", field="coordinator.renderer_addresses")
    return host, port


def split_host_port(address: str) -> tuple[str, int | None]:
    if address.startswith("["):  # [v6]:port
        host, _, tail = address[1:].partition("]")
        return host, int(tail[1:]) if tail.startswith(":") else None
    host, sep, port = address.rpartition(":")
    if not sep or ":" in host:  # no port, or a bare IPv6 address
        return address, None
    return host, int(port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DnsWatcher:
    """Re-resolves a headless Service's name every ``interval`` seconds and publishes the addresses.

    ``resolve`` has ``socket.getaddrinfo``'s signature (tests pass a fake). A name that does not exist (no
    ready pod behind a headless Service) publishes no address; any other resolver error keeps the last
    set, so a DNS blip does not drop every replica."""

    def __init__(
        self,
        target: str,
        publish: Callable[[set[str]], None],
        *,
        interval: float = 5.0,
        resolve: Callable[..., list[tuple[Any, ...]]] = socket.getaddrinfo,
    ) -> None:
        self.target = target
        self.host, self.port = parse_dns_target(target)
        self.publish = publish
        self.interval = interval
        self.resolve = resolve
        self._task: asyncio.Task[None] | None = None

    async def resolve_once(self) -> set[str] | None:
        try:
            infos = await asyncio.to_thread(self.resolve, self.host, self.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno in _NO_SUCH_NAME:
                return set()
            log.warning("resolving %s failed (%s); keeping the last renderer set", self.host, exc)
            return None
        except OSError as exc:
            log.warning("resolving %s failed (%s); keeping the last renderer set", self.host, exc)
            return None
        return {join_host_port(str(info[4][0]), self.port) for info in infos}

    async def run(self) -> None:
        while True:
            found = await self.resolve_once()
            if found is not None:
                self.publish(found)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


# --- Kubernetes ------------------------------------------------------------------------------------


def _field(obj: Any, name: str, key: str | None = None) -> Any:
    """A field of a kubernetes client model or of the same object as a dict (camelCase ``key``)."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(key or name)
    return getattr(obj, name, None)


def slice_addresses(endpoint_slice: Any, port_name: str = "grpc") -> set[str]:
    """``address:port`` of every endpoint of one EndpointSlice that may take new work: its ``ready``
    condition not false (unset means ready) and not ``terminating``."""
    ports = _field(endpoint_slice, "ports") or []
    port = next((_field(p, "port") for p in ports if _field(p, "name") == port_name), None)
    if port is None and len(ports) == 1:
        port = _field(ports[0], "port")
    if port is None:
        return set()
    found = set()
    for endpoint in _field(endpoint_slice, "endpoints") or []:
        conditions = _field(endpoint, "conditions") or {}
        if _field(conditions, "ready") is False or _field(conditions, "terminating") is True:
            continue
        for address in _field(endpoint, "addresses") or []:
            found.add(join_host_port(address, int(port)))
    return found


class EndpointSliceWatcher:
    """Follows the EndpointSlices of one Service through the Kubernetes API (list, then watch; list again
    after the watch ends or fails) in a daemon thread (the official client blocks), and publishes the
    union of their usable addresses to the event loop that started it."""

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        service: str,
        publish: Callable[[set[str]], None],
        *,
        port_name: str = "grpc",
        retry_seconds: float = 5.0,
        watch_timeout_seconds: int = 240,
    ) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.service = service
        self.publish = publish
        self.port_name = port_name
        self.retry_seconds = retry_seconds
        self.watch_timeout_seconds = watch_timeout_seconds
        self.selector = f"{SERVICE_NAME_LABEL}={service}"
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._published: frozenset[str] | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name=f"endpointslices-{self.service}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def _ours(self, endpoint_slice: Any) -> bool:
        labels = _field(_field(endpoint_slice, "metadata"), "labels") or {}
        return labels.get(SERVICE_NAME_LABEL) == self.service

    def _send(self, slices: dict[str, set[str]]) -> None:
        addresses = frozenset().union(*slices.values()) if slices else frozenset()
        if addresses == self._published:
            return
        self._published = addresses
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self.publish, set(addresses))
        except RuntimeError:  # the loop is closed: the coordinator is gone
            self._stop.set()

    def _run(self) -> None:
        from kubernetes import client, watch
        from kubernetes.client.exceptions import ApiException

        api = client.DiscoveryV1Api(self.api_client)
        while not self._stop.is_set():
            pause = self.retry_seconds
            try:
                listing = api.list_namespaced_endpoint_slice(
                    self.namespace, label_selector=self.selector, _request_timeout=30
                )
                slices = {
                    s.metadata.name: slice_addresses(s, self.port_name)
                    for s in listing.items
                    if self._ours(s)
                }
                self._send(slices)
                self._watch = watch.Watch()
                for event in self._watch.stream(
                    api.list_namespaced_endpoint_slice,
                    self.namespace,
                    label_selector=self.selector,
                    resource_version=listing.metadata.resource_version,
                    timeout_seconds=self.watch_timeout_seconds,
                    _request_timeout=self.watch_timeout_seconds + 30,
                ):
                    if self._stop.is_set():
                        break
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR":  # e.g. 410 Gone: list again
                        pause = 0
                        break
                    name = _field(_field(obj, "metadata"), "name")
                    if kind in ("ADDED", "MODIFIED") and self._ours(obj):
                        slices[name] = slice_addresses(obj, self.port_name)
                    elif kind in ("ADDED", "MODIFIED", "DELETED"):
                        slices.pop(name, None)
                    self._send(slices)
                else:
                    pause = 0  # the server ended the watch (timeout_seconds): list and watch again
            except ApiException as exc:
                if exc.status == 410:
                    pause = 0
                elif exc.status in (401, 403):
                    log.warning(
                        "the coordinator may not list/watch endpointslices in %s (%s): grant it in its Role",
                        self.namespace,
                        exc.status,
                    )
                else:
                    log.warning("watching endpointslices of %s failed: %s", self.service, exc.status)
            except Exception as exc:  # noqa: BLE001 - connection trouble: list and watch again
                if not self._stop.is_set():
                    log.warning("watching endpointslices of %s failed: %s", self.service, exc)
            if pause:
                self._stop.wait(pause)


# --- from settings ---------------------------------------------------------------------------------


def discovery_mode(settings: CoordinatorSettings, environ: dict[str, str] | None = None) -> str:
    """``renderer_discovery`` with ``auto`` decided: kubernetes when a renderer Service is named and an API
    is at hand (in a pod, an explicit api_host, or a kubeconfig the scaler uses), dns for a dns:///
    target, else static."""
    mode = settings.renderer_discovery
    if mode != "auto":
        return mode
    env = os.environ if environ is None else environ
    k8s = settings.kubernetes
    if settings.renderer_service and (
        k8s.api_host or env.get("KUBERNETES_SERVICE_HOST") or (k8s.enabled and not k8s.in_cluster)
    ):
        return "kubernetes"
    if settings.renderer_addresses.strip().startswith("dns:"):
        return "dns"
    return "static"


def build_pool(
    settings: CoordinatorSettings,
    connect: Callable[[str], grpc.aio.Channel],
    *,
    api_client: Any = None,
    resolve: Callable[..., list[tuple[Any, ...]]] | None = None,
) -> RendererPool:
    """The coordinator's renderer pool with its discovery source started (needs a running loop for the
    dns and kubernetes modes)."""
    pool = RendererPool(
        connect,
        inflight_per_replica=settings.renderer_inflight_per_replica,
        drain_seconds=settings.renderer_drain_seconds,
        wait_seconds=settings.renderer_wait_seconds,
    )
    mode = discovery_mode(settings)
    if mode == "kubernetes":
        if not settings.renderer_service:
            raise FailedPrecondition(
                "renderer_discovery kubernetes needs renderer_service", field="coordinator.renderer_service"
            )
        if api_client is None:
            from .scaler import shared_api_client

            api_client = shared_api_client(settings.kubernetes)
        pool.follow(
            EndpointSliceWatcher(
                api_client,
                settings.kubernetes.namespace,
                settings.renderer_service,
                pool.update,
                port_name=settings.renderer_port_name,
                retry_seconds=settings.discovery_interval_seconds,
            )
        )
    elif mode == "dns":
        targets = split_targets(settings.renderer_addresses)
        if len(targets) != 1 or not targets[0].startswith("dns:"):
            raise FailedPrecondition(
                "renderer_discovery dns needs one dns:///name:port target",
                field="coordinator.renderer_addresses",
            )
        watcher = DnsWatcher(
            targets[0],
            pool.update,
            interval=settings.discovery_interval_seconds,
            **({"resolve": resolve} if resolve is not None else {}),
        )
        pool.follow(watcher)
    else:
        for target in split_targets(settings.renderer_addresses):
            # A dns:/// target here stands for every replica behind it: one round-robin channel that
            # render_parallelism shards share (the behaviour before discovery).
            workers = settings.render_parallelism if target.startswith("dns:") else None
            pool.update({*pool.addresses(), target}, workers=workers)
        pool.wait_seconds = 0.0  # a fixed list does not grow: no replica is a configuration error
    log.info("renderer discovery: %s", mode)
    return pool


def connector(client: ClientSettings) -> Callable[[str], grpc.aio.Channel]:
    """``connect(address)`` for a pool: ``make_channel`` with the coordinator's client settings."""
    from dreamframe.serving.client import make_channel

    def connect(address: str) -> grpc.aio.Channel:
        return make_channel(address, client)

    return connect
