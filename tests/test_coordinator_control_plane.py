"""Control-plane costs per frame stay O(1): running frame sums, coalesced WatchJob updates."""

from __future__ import annotations

import asyncio

import pytest

from dreamframe.storage import LocalStore
from dreamframe.v1 import coordinator_pb2 as pb
from services.coordinator import stages as st
from services.coordinator.clients import Clients
from services.coordinator.runner import Coordinator
from services.coordinator.settings import CoordinatorSettings


def test_frame_tally_is_a_running_sum():
    tally = st.FrameTally()
    tally.add_story(10)
    tally.add_story(5)
    tally.story_done(0, 3)
    tally.story_done(1, 5)
    tally.story_done(0, 4)  # a story's count only moves forward by what changed
    assert (tally.done, tally.total) == (9, 15)


def test_a_watcher_gets_coalesced_updates_not_one_per_frame(tmp_path, monkeypatch):
    frames = 400

    async def render(ctx, index, tally):
        tally.add_story(frames)
        for done in range(1, frames + 1):
            tally.story_done(index, done)
            await ctx.progress(pb.STAGE_RENDER, tally.done, tally.total, "frames", f"frame {done}")
            await asyncio.sleep(0.002)

    async def nothing(*args, **kwargs):
        return []

    for name in ("plot", "style"):
        monkeypatch.setattr(st, name, nothing)
    monkeypatch.setattr(st, "render", render)
    monkeypatch.setattr(st, "write_storyboard", nothing)
    monkeypatch.setattr(st, "story_storyboard", nothing)

    async def scenario() -> tuple[int, pb.Job]:
        clients = Clients(plot=None, style=None, renderers=[], qa=None, train=None, eval=None)
        settings = CoordinatorSettings(watch_interval_seconds=0.1)
        c = Coordinator(LocalStore(tmp_path / "s", "dreamframe"), clients, settings)
        await c.start()
        spec = pb.JobSpec(stories=[pb.StoryInput(theme="t")], stages=[pb.STAGE_PLOT, pb.STAGE_RENDER])
        await c.submit(pb.SubmitJobRequest(spec=spec, job_id="many-frames"))
        updates = 0
        last = None
        async for last in c.watch("many-frames"):  # noqa: B007 - the last update is the finished job
            updates += 1
        await c.stop()
        return updates, last

    updates, last = asyncio.run(scenario())
    assert last.state == pb.JOB_STATE_SUCCEEDED
    render = next(s for s in last.stages if s.stage == pb.STAGE_RENDER)
    assert (render.progress.done, render.progress.total) == (frames, frames)
    assert updates < frames / 10, updates  # ~0.8 s of frames at 10 updates/s, not 400 updates


def test_list_jobs_pages_small_summaries_from_the_index(tmp_path):
    from dreamframe.errors import InvalidArgument
    from services.coordinator.jobs import JobStore, now

    store = LocalStore(tmp_path / "s", "dreamframe")
    jobs = JobStore(store)
    for i in range(5):
        job = pb.Job(job_id=f"big-{i}", state=pb.JOB_STATE_SUCCEEDED if i % 2 else pb.JOB_STATE_RUNNING)
        job.created_at.CopyFrom(now())
        job.created_at.seconds += i
        job.spec.stories.extend(pb.StoryInput(theme=f"a long theme number {n}") for n in range(2000))
        status = job.stages.add(stage=pb.STAGE_RENDER, state=job.state)
        for n in range(2000):
            status.outputs.add(name=f"frames/{n:03d}").ref.key = f"jobs/big-{i}/stories/{n:03d}/frames.json"
        jobs.save(job)
    assert len(job.SerializeToString()) > 100_000  # a whole job is large

    async def scenario():
        clients = Clients(plot=None, style=None, renderers=[], qa=None, train=None, eval=None)
        c = Coordinator(store, clients, CoordinatorSettings())
        pages, token = [], ""
        while True:
            page, token = await c.list([], 2, token)
            pages.append(page)
            if not token:
                break
        done, _ = await c.list([pb.JOB_STATE_SUCCEEDED], 0, "")
        with pytest.raises(InvalidArgument):
            await c.list([], 2, "../../etc")
        return pages, done

    pages, done = asyncio.run(scenario())
    assert [len(p) for p in pages] == [2, 2, 1]
    listed = [j for p in pages for j in p]
    assert [j.job_id for j in listed] == [f"big-{i}" for i in (4, 3, 2, 1, 0)]  # newest first
    for j in listed:
        assert j.story_count == 2000 and len(j.SerializeToString()) < 500
    assert [j.job_id for j in done] == ["big-3", "big-1"]


def test_storyboards_can_be_switched_off(tmp_path, monkeypatch):
    called: list[str] = []

    async def nothing(*args, **kwargs):
        return []

    async def board(*args, **kwargs):
        called.append("board")
        return []

    for name in ("plot", "style", "render"):
        monkeypatch.setattr(st, name, nothing)
    monkeypatch.setattr(st, "write_storyboard", board)
    monkeypatch.setattr(st, "story_storyboard", board)

    async def scenario(storyboard: bool) -> None:
        clients = Clients(plot=None, style=None, renderers=[], qa=None, train=None, eval=None)
        settings = CoordinatorSettings(storyboard=storyboard, watch_interval_seconds=0)
        c = Coordinator(LocalStore(tmp_path / f"s{storyboard}", "dreamframe"), clients, settings)
        await c.start()
        spec = pb.JobSpec(stories=[pb.StoryInput(theme="t")], stages=[pb.STAGE_PLOT, pb.STAGE_RENDER])
        await c.submit(pb.SubmitJobRequest(spec=spec, job_id="j"))
        async for _ in c.watch("j"):
            pass
        await c.stop()

    asyncio.run(scenario(False))
    assert called == []
    asyncio.run(scenario(True))
    assert called == ["board", "board"]  # the story's page, then the job's
