"""Render fan-out: a story's frames split into shards, sent concurrently to every renderer replica.

Replicas are reached either through one ``dns:///<headless-service>:<port>`` target (gRPC resolves every
pod address and balances calls round robin) or through an explicit comma-separated address list (one
channel per replica). Workers pull shards from one queue, so a fast replica takes more of them. When a
replica dies mid-shard, the frames it had not reported go back on the queue and another worker takes
them. Frames are counted by index, so a frame reported twice (a re-sent shard whose frame the renderer
had already written; it reports it as skipped) is still counted once — and because renderers write each
frame atomically to a key derived from its index, deterministically, no frame ends up in two files.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

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


@dataclass
class Endpoint:
    name: str
    stub: render_pb2_grpc.RenderServiceStub
    # Concurrent shards this endpoint takes (a dns:/// target stands for many replicas).
    workers: int = 1
    consecutive_failures: int = 0


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
    endpoints: list[Endpoint],
    template: render_pb2.RenderFramesRequest,
    indices: list[int],
    *,
    shard_size: int,
    on_frame: Callable[[render_pb2.RenderedFrame, FanoutResult], Awaitable[None] | None] | None = None,
    max_attempts: int | None = None,
    backoff_seconds: float = 0.5,
    deadline_seconds: float | None = None,
    meter: RenderMeter | None = None,
) -> FanoutResult:
    """Render ``indices`` of the story in ``template`` over ``endpoints``; returns when every frame is done.

    Raises the first non-retryable error (bad request), or Unavailable when a shard failed on
    ``max_attempts`` replicas in a row.

    ``meter`` (the coordinator's metrics) sees the frames move: pending while not done, in flight while
    sent to a replica; both are given back whatever way this ends."""
    meter = meter or RenderMeter()
    if not endpoints:
        raise Unavailable("no renderer replicas configured", field="coordinator.renderer_addresses")
    result = FanoutResult()
    pending: set[int] = set(indices)
    queue: asyncio.Queue[Shard] = asyncio.Queue()
    for shard in shards_of(sorted(pending), shard_size):
        queue.put_nowait(shard)
    attempts_cap = max_attempts or 3 + sum(e.workers for e in endpoints)
    failure: list[BaseException] = []
    all_done = asyncio.Event()
    if not pending:
        all_done.set()

    async def record(frame: render_pb2.RenderedFrame, endpoint: str) -> None:
        if frame.index not in pending:
            result.duplicate_reports += 1  # already counted (re-sent shard)
            return
        pending.discard(frame.index)
        meter.add(pending=-1)
        meter.delivered(skipped=frame.skipped)
        result.frames[frame.index] = frame
        result.by_endpoint[endpoint] = result.by_endpoint.get(endpoint, 0) + 1
        if frame.skipped:
            result.skipped += 1
        else:
            result.rendered += 1
        if on_frame is not None:
            maybe = on_frame(frame, result)
            if asyncio.iscoroutine(maybe):
                await maybe
        if not pending:
            all_done.set()

    async def worker(endpoint: Endpoint) -> None:
        while not all_done.is_set() and not failure:
            try:
                shard = await asyncio.wait_for(queue.get(), timeout=0.2)
            except TimeoutError:
                continue
            todo = [i for i in shard.indices if i in pending]
            if not todo:
                continue
            request = render_pb2.RenderFramesRequest()
            request.CopyFrom(template)
            request.frames.CopyFrom(common_pb2.FrameSelection(list=common_pb2.FrameList(indices=todo)))
            outstanding = set(todo)
            meter.add(inflight=len(todo))
            try:
                try:
                    call = endpoint.stub.RenderFrames(request, timeout=deadline_seconds)
                    async for response in call:
                        if response.HasField("frame"):
                            if response.frame.index in outstanding:
                                outstanding.discard(response.frame.index)
                                meter.add(inflight=-1)
                            await record(response.frame, endpoint.name)
                finally:
                    meter.add(inflight=-len(outstanding))
                endpoint.consecutive_failures = 0
                left = [i for i in todo if i in pending]
                if left:  # the replica ended the stream without these frames: treat as a failure
                    raise _IncompleteShard(left)
            except (grpc.aio.AioRpcError, _IncompleteShard) as exc:
                code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else grpc.StatusCode.ABORTED
                if code not in RETRYABLE:
                    failure.append(exc)
                    all_done.set()
                    return
                left = [i for i in todo if i in pending]
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
                healthy = any(e.consecutive_failures == 0 for e in endpoints)
                if shard.attempts >= attempts_cap and (not healthy or shard.attempts >= 4 * attempts_cap):
                    failure.append(
                        Unavailable(
                            f"frames {left[:5]}... failed {shard.attempts} times; last error {code.name}"
                        )
                    )
                    all_done.set()
                    return
                result.resent_shards += 1
                meter.resent()
                queue.put_nowait(shard)
                # Step back, longer each time, so a healthy replica picks the shard up first.
                pause = backoff_seconds * 2 ** (endpoint.consecutive_failures - 1)
                await asyncio.sleep(min(pause, MAX_BACKOFF_SECONDS))

    meter.add(pending=len(pending))
    tasks = [asyncio.create_task(worker(e)) for e in endpoints for _ in range(max(1, e.workers))]
    try:
        await all_done.wait()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        meter.add(pending=-len(pending))  # frames left undone (a failure, a cancelled job)
    if failure:
        raise failure[0]
    return result


class _IncompleteShard(Exception):
    def __init__(self, left: list[int]) -> None:
        super().__init__(f"stream ended with {len(left)} frames unreported")
        self.left = left
