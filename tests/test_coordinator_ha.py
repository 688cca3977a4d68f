"""Two coordinators on one store never both run a job: the lease holder runs jobs, the other accepts
submissions and answers reads; a deposed leader's late write is refused; when the leader dies the other
takes over and finishes the job. The real Coordinator and StorageLease over a local store; each stage's
service call is replaced by a short sleep that records which coordinator ran it."""

from __future__ import annotations

import asyncio

import pytest

from dreamframe.errors import Aborted
from dreamframe.storage import LocalStore
from dreamframe.v1 import coordinator_pb2 as pb
from services.coordinator import stages as st
from services.coordinator.clients import Clients
from services.coordinator.jobs import JobStore
from services.coordinator.leader import Leadership, StorageLease
from services.coordinator.runner import Coordinator
from services.coordinator.settings import CoordinatorSettings

LEASE = 0.8


@pytest.fixture
def ran(monkeypatch) -> list[tuple[str, str, int]]:
    """(coordinator, stage, story) for every stage call; render calls take long enough to kill mid-job."""
    calls: list[tuple[str, str, int]] = []

    def fake(name: str, seconds: float):
        async def call(ctx, *args, **kwargs):
            calls.append((ctx.settings.identity, name, args[0] if args else -1))
            await asyncio.sleep(seconds)

        return call

    monkeypatch.setattr(st, "plot", fake("plot", 0.01))
    monkeypatch.setattr(st, "render", fake("render", 0.3))

    async def nothing(*args, **kwargs):
        return []

    monkeypatch.setattr(st, "write_storyboard", nothing)
    monkeypatch.setattr(st, "story_storyboard", nothing)
    return calls


def replica(store: LocalStore, name: str) -> Coordinator:
    settings = CoordinatorSettings(story_parallelism=1, identity=name, pickup_interval_seconds=0.1)
    clients = Clients(plot=None, style=None, renderers=[], qa=None, train=None, eval=None)
    leadership = Leadership(StorageLease(store), name, duration=LEASE)
    return Coordinator(store, clients, settings, leadership=leadership)


def spec(stories: int) -> pb.JobSpec:
    return pb.JobSpec(
        stories=[pb.StoryInput(theme=f"t{i}") for i in range(stories)],
        stages=[pb.STAGE_PLOT, pb.STAGE_RENDER],
    )


async def finished(c: Coordinator, job_id: str) -> pb.Job:
    last = None
    async for last in c.watch(job_id):  # noqa: B007 - the last update is the finished job
        pass
    return last


def test_only_the_leader_runs_jobs_submitted_anywhere(tmp_path, ran):
    async def scenario() -> None:
        store = LocalStore(tmp_path / "store", "dreamframe")
        a, b = replica(store, "a"), replica(store, "b")
        await a.start()
        await b.start()
        assert a.leads and not b.leads
        submitted = await b.submit(pb.SubmitJobRequest(spec=spec(2), job_id="via-b"))
        assert submitted.state == pb.JOB_STATE_QUEUED
        job = await asyncio.wait_for(finished(b, "via-b"), 30)  # b follows the stored state
        assert job.state == pb.JOB_STATE_SUCCEEDED
        assert {who for who, _, _ in ran} == {"a"}  # only the leader ran stages
        assert (await b.get("via-b")).state == pb.JOB_STATE_SUCCEEDED

        async def forgotten() -> None:
            while a._jobs or b._jobs:
                await asyncio.sleep(0.02)

        await asyncio.wait_for(forgotten(), 5)  # finished jobs leave memory
        await b.stop()
        await a.stop()

    asyncio.run(scenario())


def test_the_other_replica_takes_over_a_dead_leaders_job(tmp_path, ran):
    async def scenario() -> None:
        store = LocalStore(tmp_path / "store", "dreamframe")
        a, b = replica(store, "a"), replica(store, "b")
        await a.start()
        await b.start()
        await a.submit(pb.SubmitJobRequest(spec=spec(4), job_id="long"))
        while sum(1 for who, stage, _ in ran if stage == "render") < 2:
            await asyncio.sleep(0.05)
        # a dies (kill -9): its tasks and lease renewals stop, nothing is released
        a.leadership._task.cancel()
        a._pickup_task.cancel()
        for task in list(a._tasks.values()):
            task.cancel()
        started = asyncio.get_running_loop().time()
        while not b.leads:
            await asyncio.sleep(0.05)
        assert asyncio.get_running_loop().time() - started < 3 * LEASE
        assert b.leadership.generation == 2
        job = await asyncio.wait_for(finished(b, "long"), 30)
        assert job.state == pb.JOB_STATE_SUCCEEDED
        assert any(who == "b" for who, _, _ in ran)
        while JobStore(store).load("long").state != pb.JOB_STATE_SUCCEEDED:  # watchers see it first
            await asyncio.sleep(0.02)
        # a's late write (it comes back and persists its stale copy) is refused, b's state stays
        with pytest.raises(Aborted):
            a.jobs_store.save(a._jobs["long"])
        assert JobStore(store).load("long").state == pb.JOB_STATE_SUCCEEDED
        await b.stop()

    asyncio.run(scenario())


def test_cancel_through_a_follower_reaches_the_leader(tmp_path, monkeypatch, ran):
    async def scenario() -> None:
        store = LocalStore(tmp_path / "store", "dreamframe")
        a, b = replica(store, "a"), replica(store, "b")
        await a.start()
        await b.start()
        await a.submit(pb.SubmitJobRequest(spec=spec(6), job_id="stop-me"))
        while not any(stage == "render" for _, stage, _ in ran):
            await asyncio.sleep(0.05)
        await b.cancel("stop-me")
        job = await asyncio.wait_for(finished(b, "stop-me"), 10)
        assert job.state == pb.JOB_STATE_CANCELLED
        assert sum(1 for _, stage, _ in ran if stage == "render") < 6
        await b.stop()
        await a.stop()

    asyncio.run(scenario())
