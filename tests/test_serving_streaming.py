"""serving.streaming: long work run in a thread (or a task), its events streamed in order, then its result
or its error; a caller who leaves stops it without ever blocking the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from types import SimpleNamespace

import pytest

from dreamframe.serving import Done, ThreadJobs, progress_to_proto, stream_from_task, stream_from_thread


class Boom(Exception):
    pass


def run(coro, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def collect(stream) -> list:
    return [item async for item in stream]


def counting(n: int, result: str = "finished"):
    def work(emit, stop: threading.Event) -> str:
        for i in range(n):
            emit(i)
        return result

    return work


def until_stopped(started: threading.Event, ended: threading.Event):
    """Work that emits one event, then blocks (polling its stop flag) until asked to stop."""

    def work(emit, stop: threading.Event) -> str:
        try:
            emit("started")
            started.set()
            while not stop.wait(0.01):
                pass
            return "stopped"
        finally:
            ended.set()

    return work


@pytest.mark.parametrize("own_thread", [False, True])
def test_events_in_order_then_the_result(own_thread):
    keep = ThreadJobs()
    items = run(collect(stream_from_thread(counting(500), name="count", keep=keep, own_thread=own_thread)))
    assert items == [*range(500), Done("finished")]
    assert len(keep) == 0


@pytest.mark.parametrize("own_thread", [False, True])
def test_the_work_error_is_raised_with_its_type_after_its_events(own_thread):
    def work(emit, stop):
        emit("a")
        emit("b")
        raise Boom("bad field")

    seen: list = []

    async def go():
        async for item in stream_from_thread(work, name="boom", own_thread=own_thread):
            seen.append(item)

    with pytest.raises(Boom, match="bad field"):
        run(go())
    assert seen == ["a", "b"]


@pytest.mark.parametrize("own_thread", [False, True])
def test_a_caller_that_leaves_sets_stop_and_the_work_ends(own_thread):
    started, ended = threading.Event(), threading.Event()
    keep = ThreadJobs()

    async def go():
        async def consume():
            async for _ in stream_from_thread(
                until_stopped(started, ended), name="leave", keep=keep, own_thread=own_thread
            ):
                pass

        caller = asyncio.create_task(consume())
        while not started.is_set():
            await asyncio.sleep(0.01)
        assert len(keep) == 1
        caller.cancel()  # what gRPC does when the client cancels or the deadline passes
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        assert await keep.wait_idle(5)  # the thread saw stop and ended; its task is gone from keep
        return len(keep)

    assert run(go()) == 0
    assert ended.is_set()


def test_closing_the_stream_early_sets_stop():
    started, ended = threading.Event(), threading.Event()
    keep = ThreadJobs()

    async def go():
        stream = stream_from_thread(until_stopped(started, ended), name="close", keep=keep)
        assert await anext(stream) == "started"
        await stream.aclose()
        return await keep.wait_idle(5)

    assert run(go())
    assert ended.is_set()


def test_stop_all_stops_running_work_whose_caller_is_still_there():
    started, ended = threading.Event(), threading.Event()
    keep = ThreadJobs()

    async def go():
        caller = asyncio.create_task(
            collect(stream_from_thread(until_stopped(started, ended), name="shutdown", keep=keep))
        )
        while not started.is_set():
            await asyncio.sleep(0.01)
        assert not await keep.wait_idle(0.05)  # still running: the timeout passes
        keep.stop_all()
        assert await keep.wait_idle(5)
        return await caller

    assert run(go()) == ["started", Done("stopped")]


@pytest.mark.parametrize("own_thread", [False, True])
def test_the_event_loop_runs_while_the_work_blocks(own_thread):
    release = threading.Event()

    def work(emit, stop):
        emit("waiting")
        assert release.wait(10)  # blocks its thread, never the loop
        return "released"

    async def go():
        stream = stream_from_thread(work, name="block", own_thread=own_thread)
        assert await anext(stream) == "waiting"
        ticks = 0
        next_item = asyncio.create_task(anext(stream))
        started = time.monotonic()
        while time.monotonic() - started < 0.2:
            await asyncio.sleep(0.01)
            ticks += 1
        assert not next_item.done()
        release.set()
        assert await next_item == Done("released")
        return ticks

    assert run(go()) >= 10


def test_the_thread_outlives_its_caller_and_its_error_is_collected():
    """A caller that leaves before the work fails: the task stays in keep until the thread ends, and
    its error is retrieved (no "exception was never retrieved" from the loop)."""
    started, release = threading.Event(), threading.Event()
    keep = ThreadJobs()
    reported: list = []

    def work(emit, stop):
        emit("started")
        started.set()
        release.wait(10)  # ignores stop: finishes the item in flight
        raise Boom("late")

    async def go():
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        caller = asyncio.create_task(collect(stream_from_thread(work, name="late", keep=keep)))
        while not started.is_set():
            await asyncio.sleep(0.01)
        caller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await caller
        await asyncio.sleep(0.05)
        assert len(keep) == 1, "the task stays referenced while its thread runs"
        release.set()
        assert await keep.wait_idle(5)
        gc.collect()
        await asyncio.sleep(0)

    run(go())
    assert not reported


def test_own_thread_runs_on_a_named_thread_of_its_own():
    def work(emit, stop):
        return threading.current_thread().name, threading.current_thread().daemon

    (done,) = run(collect(stream_from_thread(work, name="render-job-1", own_thread=True)))
    assert done == Done(("render-job-1", False))


def test_hold_is_entered_before_the_thread_and_left_after_it():
    order: list[str] = []

    async def go():
        shared = asyncio.Lock()

        def work(tag):
            def inner(emit, stop):
                order.append(f"{tag} start")
                time.sleep(0.05)
                order.append(f"{tag} end")
                return tag

            return inner

        first = collect(stream_from_thread(work("a"), name="a", hold=(shared,)))
        second = collect(stream_from_thread(work("b"), name="b", hold=(shared,)))
        results = await asyncio.gather(first, second)
        assert not shared.locked()
        return results

    assert run(go()) == [[Done("a")], [Done("b")]]
    assert order == ["a start", "a end", "b start", "b end"]  # one at a time


def test_stream_from_task_streams_then_returns_and_raises():
    async def work(emit):
        for i in range(3):
            emit(i)
            await asyncio.sleep(0)
        return "story"

    async def failing(emit):
        emit("x")
        raise Boom("no")

    async def go():
        items = await collect(stream_from_task(work, name="ok"))
        seen = []
        with pytest.raises(Boom):
            async for item in stream_from_task(failing, name="fail"):
                seen.append(item)
        return items, seen

    assert run(go()) == ([0, 1, 2, Done("story")], ["x"])


def test_stream_from_task_cancels_the_work_when_the_caller_leaves():
    async def go():
        was_cancelled = asyncio.Event()

        async def work(emit):
            emit("started")
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                was_cancelled.set()
                raise

        stream = stream_from_task(work, name="leave")
        assert await anext(stream) == "started"
        await stream.aclose()
        await asyncio.wait_for(was_cancelled.wait(), 5)

    run(go())


def test_progress_to_proto_copies_the_common_fields():
    record = SimpleNamespace(
        unit="videos",
        done=3,
        total=7,
        current_item="a.mp4",
        elapsed_seconds=1.5,
        eta_seconds=2.0,
        message="encoding",
    )
    message = progress_to_proto(record)
    assert (message.unit, message.done, message.total, message.current_item) == ("videos", 3, 7, "a.mp4")
    assert (message.elapsed_seconds, message.eta_seconds, message.message) == (1.5, 2.0, "encoding")
    assert progress_to_proto(record, unit="frames").unit == "frames"
