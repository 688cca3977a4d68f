"""Render fan-out: a story's frames split into shards, sent concurrently to every renderer replica.

The replicas are either a fixed list of endpoints or a ``discovery.RendererPool`` that follows the renderer
Deployment (EndpointSlices, DNS re-resolution): one channel per ready replica, each with ``workers`` shards
in flight. Workers pull shards from one queue, so a fast replica takes more of them. The fan-out follows the
pool while it runs: a replica that appears gets workers at once; one that leaves gets no new shard, and when
its channel is closed (after the pool's drain time) or it dies mid-shard, the frames it had not reported go
back on the queue and another worker takes them. Frames are counted by index, so a frame reported twice (a
re-sent shard whose frame the renderer had already written; it reports it as skipped) is still counted once
— and because renderers write each frame atomically to a key derived from its index, deterministically, no
frame ends up in two files.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from dreamframe.errors import Unavailable
from dreamframe.v1 import common_pb2, render_pb2, render_pb2_grpc

from .metrics import RenderMeter

log = logging.getLogger(__name__)

# Codes that mean "this replica could not finish", not "this request is wrong".
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

MAX_BACKOFF_SECONDS = 30.0


@dataclass(eq=False)
class Endpoint:
    name: str
    stub: render_pb2_grpc.RenderServiceStub
    # Concurrent shards this endpoint takes (a dns:/// target stands for many replicas), in total over
    # every story and job the coordinator renders at once: each fan-out's workers share these slots.
    workers: int = 1
    consecutive_failures: int = 0
    # False once discovery has seen the replica leave: it takes no new shard.
    active: bool = True
    # Shards being sent to it right now, and so far.
    inflight: int = 0
    sent: int = 0
    _slots: asyncio.Semaphore | None = field(default=None, repr=False)

    @property
    def slots(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(max(1, self.workers))
        return self._slots


class EndpointSource(Protocol):
    """What the fan-out renders over: a fixed list (``FixedEndpoints``) or a ``discovery.RendererPool``."""

    # How long a render with no endpoint at all waits for one (0: fail at once).
    wait_seconds: float

    def endpoints(self) -> list[Endpoint]: ...

    async def wait_changed(self) -> None: ...


class FixedEndpoints:
    wait_seconds = 0.0

    def __init__(self, endpoints: list[Endpoint]) -> None:
        self._endpoints = list(endpoints)

    def endpoints(self) -> list[Endpoint]:
        return self._endpoints

    async def wait_changed(self) -> None:
        await asyncio.Event().wait()  # never


@dataclass
class Shard:
    indices: list[int]
    attempts: int = 0


@dataclass
class FanoutResult:
    rendered: int = 0
    skipped: int = 0
    resent_shards: int = 0
    # Reports of a frame already counted (a re-sent shard's frame the renderer had finished).
    duplicate_reports: int = 0
    # Frames counted per endpoint name (who delivered each frame first).
    by_endpoint: dict[str, int] = field(default_factory=dict)
    frames: dict[int, render_pb2.RenderedFrame] = field(default_factory=dict)


def split_targets(targets: str) -> list[str]:
    """``dns:///svc:port`` stays one target; ``a:1, b:2`` becomes two."""
    targets = targets.strip()
    if targets.startswith("dns:"):
        return [targets]
    return [t.strip() for t in targets.split(",") if t.strip()]


def shards_of(indices: list[int], size: int) -> list[Shard]:
    return [Shard(indices[i : i + size]) for i in range(0, len(indices), size)]


async def render_frames(
    endpoints: list[Endpoint] | EndpointSource,
    template: render_pb2.RenderFramesRequest,
    indices: list[int],
    *,
    shard_size: int,
    on_frames: Callable[[list[render_pb2.RenderedFrame], FanoutResult], Awaitable[None] | None] | None = None,
    max_attempts: int | None = None,
    backoff_seconds: float = 0.5,
    deadline_seconds: float | None = None,
    meter: RenderMeter | None = None,
) -> FanoutResult:
    """Render ``indices`` of the story in ``template`` over ``endpoints``; returns when every frame is done.

    ``endpoints`` may change while this runs (a ``discovery.RendererPool``): new endpoints get workers
    within moments, retired ones finish or lose their current shard and take no other.

    Raises the first non-retryable error (bad request), or Unavailable when a shard failed on
    ``max_attempts`` replicas in a row, or when there was no endpoint at all for ``wait_seconds``.

    ``on_frames`` is called once per stream message that brings new frames (a renderer batch), with the
    frames counted for the first time: per-message work, not per-frame, is what the coordinator's CPU
    goes to at 1.3 M frames.

    ``meter`` (the coordinator's metrics) sees the frames move: pending while not done, in flight while
    sent to a replica; both are given back whatever way this ends."""
    meter = meter or RenderMeter()
    source: EndpointSource = FixedEndpoints(endpoints) if isinstance(endpoints, list) else endpoints
    if not source.endpoints() and source.wait_seconds <= 0:
        raise Unavailable("no renderer replicas configured", field="coordinator.renderer_addresses")
    loop = asyncio.get_running_loop()
    result = FanoutResult()
    pending: set[int] = set(indices)
    queue: asyncio.Queue[Shard] = asyncio.Queue()
    for shard in shards_of(sorted(pending), shard_size):
        queue.put_nowait(shard)
    failure: list[BaseException] = []
    all_done = asyncio.Event()
    if not pending:
        all_done.set()

    def fail(exc: BaseException) -> None:
        failure.append(exc)
        all_done.set()

    async def record(frames: list[render_pb2.RenderedFrame], endpoint: str) -> None:
        new: list[render_pb2.RenderedFrame] = []
        for frame in frames:
            if frame.index not in pending:
                result.duplicate_reports += 1  # already counted (re-sent shard)
                continue
            pending.discard(frame.index)
            result.frames[frame.index] = frame
            new.append(frame)
        if not new:
            return
        skipped = sum(1 for frame in new if frame.skipped)
        meter.add(pending=-len(new))
        meter.delivered(rendered=len(new) - skipped, skipped=skipped)
        result.by_endpoint[endpoint] = result.by_endpoint.get(endpoint, 0) + len(new)
        result.skipped += skipped
        result.rendered += len(new) - skipped
        if on_frames is not None:
            maybe = on_frames(new, result)
            if asyncio.iscoroutine(maybe):
                await maybe
        if not pending:
            all_done.set()

    async def send(endpoint: Endpoint, todo: list[int]) -> None:
        request = render_pb2.RenderFramesRequest()
        request.CopyFrom(template)
        request.frames.CopyFrom(common_pb2.FrameSelection(list=common_pb2.FrameList(indices=todo)))
        endpoint.inflight += 1
        endpoint.sent += 1
        outstanding = set(todo)
        meter.add(inflight=len(todo))
        try:
            call = endpoint.stub.RenderFrames(request, timeout=deadline_seconds)
            async for response in call:
                if response.frames:
                    reported = len(outstanding)
                    outstanding.difference_update(frame.index for frame in response.frames)
                    meter.add(inflight=len(outstanding) - reported)
                    await record(list(response.frames), endpoint.name)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this worker is being stopped
            # The call was cancelled under us: discovery closed a retired replica's channel.
            raise _IncompleteShard([i for i in todo if i in pending], drained=True) from None
        finally:
            endpoint.inflight -= 1
            meter.add(inflight=-len(outstanding))

    async def worker(endpoint: Endpoint) -> None:
        while not all_done.is_set() and not failure and endpoint.active:
            try:
                shard = await asyncio.wait_for(queue.get(), timeout=0.2)
            except TimeoutError:
                continue
            todo = [i for i in shard.indices if i in pending]
            if not todo:
                continue
            if not endpoint.active:  # left while this worker waited for the shard
                queue.put_nowait(shard)
                return
            try:
                # One of the replica's slots, shared with every other story's fan-out: a replica has
                # `workers` shards in flight in all, however many stories render at once.
                async with endpoint.slots:
                    if not endpoint.active:  # left while this worker waited for the slot
                        raise _IncompleteShard(todo, drained=True)
                    todo = [i for i in todo if i in pending]
                    if todo:
                        await send(endpoint, todo)
                endpoint.consecutive_failures = 0
                left = [i for i in todo if i in pending]
                if left:  # the replica ended the stream without these frames: treat as a failure
                    raise _IncompleteShard(left)
            except (grpc.aio.AioRpcError, _IncompleteShard) as exc:
                code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else grpc.StatusCode.ABORTED
                if code not in RETRYABLE:
                    fail(exc)
                    return
                left = [i for i in todo if i in pending]
                if isinstance(exc, _IncompleteShard) and exc.drained or not endpoint.active:
                    # The replica left (discovery): not the shard's fault and not a failure to back
                    # off from; the frames go back for the replicas that remain.
                    log.info("renderer %s left mid-shard; re-sending %d frames", endpoint.name, len(left))
                    if left:
                        result.resent_shards += 1
                        meter.resent()
                        queue.put_nowait(Shard(left, shard.attempts))
                    return
                shard = Shard(left, shard.attempts + 1)
                endpoint.consecutive_failures += 1
                log.warning(
                    "renderer %s failed a shard (%s); re-sending %d frames (attempt %d)",
                    endpoint.name,
                    code.name,
                    len(left),
                    shard.attempts,
                )
                # Give up on a shard once it has failed often and no replica is known to be healthy
                # (a dead replica alone must not use up the attempts while a busy one could take it),
                # or after far too many attempts either way.
                current = [e for e in source.endpoints() if e.active]
                attempts_cap = max_attempts or 3 + sum(e.workers for e in current)
                healthy = any(e.consecutive_failures == 0 for e in current)
                if shard.attempts >= attempts_cap and (not healthy or shard.attempts >= 4 * attempts_cap):
                    fail(
                        Unavailable(
                            f"frames {left[:5]}... failed {shard.attempts} times; last error {code.name}"
                        )
                    )
                    return
                result.resent_shards += 1
                meter.resent()
                queue.put_nowait(shard)
                # Step back, longer each time, so a healthy replica picks the shard up first.
                pause = backoff_seconds * 2 ** (endpoint.consecutive_failures - 1)
                await asyncio.sleep(min(pause, MAX_BACKOFF_SECONDS))

    workers: dict[Endpoint, list[asyncio.Task[None]]] = {}

    def staff() -> int:
        """One worker per ``workers`` slot of every active endpoint; returns the active endpoints."""
        active = 0
        for endpoint in source.endpoints():
            if not endpoint.active:
                continue
            active += 1
            alive = [t for t in workers.get(endpoint, []) if not t.done()]
            while len(alive) < max(1, endpoint.workers):
                alive.append(asyncio.create_task(worker(endpoint)))
            workers[endpoint] = alive
        return active

    finished = asyncio.create_task(all_done.wait())
    changed: asyncio.Task[None] | None = None
    empty_since: float | None = None
    meter.add(pending=len(pending))
    try:
        while not finished.done():
            if staff():
                empty_since = None
            elif empty_since is None:
                empty_since = loop.time()
                log.warning("no renderer replica ready; waiting up to %.0f s", source.wait_seconds)
            else:
                busy = any(not t.done() for tasks in workers.values() for t in tasks)
                if not busy and loop.time() - empty_since >= source.wait_seconds:
                    fail(
                        Unavailable(
                            f"no renderer replica for {source.wait_seconds:.0f} s",
                            field="coordinator.renderer_addresses",
                        )
                    )
                    break
            changed = asyncio.create_task(source.wait_changed())
            await asyncio.wait({finished, changed}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            changed.cancel()
    finally:
        tasks = [finished, *([changed] if changed else []), *(t for ts in workers.values() for t in ts)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        meter.add(pending=-len(pending))  # frames left undone (a failure, a cancelled job)
    if failure:
        raise failure[0]
    return result


class _IncompleteShard(Exception):
    def __init__(self, left: list[int], *, drained: bool = False) -> None:
        super().__init__(f"stream ended with {len(left)} frames unreported")
        self.left = left
        self.drained = drained
