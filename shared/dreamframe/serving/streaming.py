"""Server-streaming RPCs over long work: run it, stream what it reports, stop it when the caller leaves.

Every long RPC (build a dataset, evaluate, render, train a style, write a story) has one shape: the
domain call reports progress through a callback and ends with a result or an error; the RPC streams the
progress, then the result, and turns the error into a status. When the caller goes away (cancel,
deadline, server shutdown after the grace period) the work is asked to stop, and what it finished stays.
The details are easy to get subtly wrong once per servicer, so they are written once here:

- ``stream_from_thread`` for blocking work (GPU, storage, video encoding): it runs in a worker thread,
  emits events across threads without blocking the event loop, polls a ``threading.Event`` to stop,
  and may outlive its RPC to finish the item in flight; its task stays referenced (in ``ThreadJobs``)
  until the thread ends, and its outcome is collected even when nobody is left to read it.
- ``stream_from_task`` for work that is a coroutine already: a caller who leaves cancels it.
- ``progress_to_proto``: the domain progress records share the fields of ``common.Progress``.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from dreamframe.v1 import common_pb2

E = TypeVar("E")
R = TypeVar("R")

Emit = Callable[[E], None]


@dataclass(frozen=True)
class Done(Generic[R]):
    """The last item of a stream: the work's return value (after every event it emitted)."""

    result: R


class ThreadJobs:
    """The thread work a servicer has running, each with its stop flag.

    A job's task stays referenced here until its thread ends, also when its caller left long before, and
    its outcome is collected then (the caller raised it, or nobody is left to). ``stop_all`` and
    ``wait_idle`` are what a shutdown hook needs; ``len()`` is how many jobs are running or waiting.
    """

    def __init__(self) -> None:
        self._stops: dict[asyncio.Task[Any], threading.Event] = {}

    def __len__(self) -> int:
        return len(self._stops)

    def track(self, task: asyncio.Task[Any], stop: threading.Event) -> None:
        self._stops[task] = stop
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._stops.pop(task, None)
        if not task.cancelled():
            task.exception()  # marks it retrieved: no "exception was never retrieved" at collection

    def stop_all(self) -> None:
        """Ask every job to stop (each finishes or checkpoints the item in flight)."""
        for stop in list(self._stops.values()):
            stop.set()

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until the jobs running now have ended (True) or ``timeout`` passes (False)."""
        tasks = list(self._stops)
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending


# Jobs of callers that keep none of their own: referenced somewhere all the same.
_UNOWNED = ThreadJobs()


class _End:
    """The queue's last item: the work's task is done."""


_END = _End()


async def _events_then_result(task: asyncio.Task[R], events: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    # The task's done callback runs after every event the work emitted is queued (the thread's
    # call_soon_threadsafe calls run in order, its result's last), so _END comes after all of them.
    task.add_done_callback(lambda _: events.put_nowait(_END))
    while (event := await events.get()) is not _END:
        yield event
    yield Done(task.result())  # the work's error, re-raised for serving to map to a status


async def stream_from_thread(
    work: Callable[[Emit[E], threading.Event], R],
    *,
    name: str,
    keep: ThreadJobs | None = None,
    hold: Sequence[AbstractAsyncContextManager[Any]] = (),
    own_thread: bool = False,
) -> AsyncIterator[E | Done[R]]:
    """Run blocking ``work(emit, stop)`` in a worker thread; yield what it emits, then ``Done(result)``.

    ``emit`` may be called from the worker thread (it never blocks); ``work`` polls ``stop`` and ends
    early once it is set. The work's exception is raised here, with its type. When the iteration ends
    for any reason (done, cancelled, closed) ``stop`` is set; the thread is never waited for on the
    event loop, and its task stays in ``keep`` until the thread ends.

    ``hold``: async context managers (per-key locks, concurrency semaphores) entered in order before
    the thread starts and exited after it ends. ``own_thread``: a new (non-daemon) thread named
    ``name`` instead of the event loop's default executor, for work that must not take one of the
    server's bounded handler threads (``ServerSettings.max_workers``) for hours.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Any] = asyncio.Queue()
    stop = threading.Event()

    def emit(event: E) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:
            pass  # the loop is closed (the process is exiting): nobody is left to tell

    async def run() -> R:
        async with AsyncExitStack() as held:
            for manager in hold:
                await held.enter_async_context(manager)
            if own_thread:
                return await _in_new_thread(work, emit, stop, name=name)
            return await asyncio.to_thread(work, emit, stop)

    task = loop.create_task(run(), name=name)
    (keep if keep is not None else _UNOWNED).track(task, stop)
    try:
        async for item in _events_then_result(task, events):
            yield item
    finally:
        stop.set()  # the caller left (or all is done): the work stops at its next check


async def stream_from_task(
    work: Callable[[Emit[E]], Awaitable[R]], *, name: str
) -> AsyncIterator[E | Done[R]]:
    """Run the coroutine ``work(emit)`` as a task; yield what it emits, then ``Done(result)``.

    ``emit`` must be called on the event loop. The work's exception is raised here; when the iteration
    ends before the work does (the caller left), the task is cancelled.
    """
    events: asyncio.Queue[Any] = asyncio.Queue()
    task = asyncio.create_task(work(events.put_nowait), name=name)  # type: ignore[arg-type]
    try:
        async for item in _events_then_result(task, events):
            yield item
    finally:
        if not task.done():
            task.cancel()


async def _in_new_thread(fn: Callable[..., R], *args: Any, name: str) -> R:
    """``asyncio.to_thread`` on a thread of its own: awaiting never blocks the loop; if the loop is gone
    when the thread ends, the outcome is dropped (nobody is left to tell)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[R] = loop.create_future()
    context = contextvars.copy_context()

    def settle(set_outcome: Callable[[Any], None], outcome: Any) -> None:
        if not future.cancelled():
            set_outcome(outcome)

    def target() -> None:
        try:
            result = context.run(fn, *args)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task, which raises it
            outcome: tuple[Callable[[Any], None], Any] = (future.set_exception, exc)
        else:
            outcome = (future.set_result, result)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:
            pass

    threading.Thread(target=target, name=name, daemon=False).start()
    return await future


def progress_to_proto(progress: Any, *, unit: str | None = None) -> common_pb2.Progress:
    """A domain progress record (``done``, ``total``, ``current_item``, ``elapsed_seconds``,
    ``eta_seconds``, ``message`` and ``unit``) as ``common.Progress``; ``unit`` for records without one."""
    return common_pb2.Progress(
        unit=progress.unit if unit is None else unit,
        done=progress.done,
        total=progress.total,
        current_item=progress.current_item,
        elapsed_seconds=progress.elapsed_seconds,
        eta_seconds=progress.eta_seconds,
        message=progress.message,
    )
