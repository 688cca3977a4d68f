"""The coordinator records when each stage started and finished, and lists jobs newest first by submit
time. The real Coordinator over a local store; each stage's service call is replaced by a short sleep."""

from __future__ import annotations

import asyncio

import pytest

from dreamframe.errors import InvalidArgument
from dreamframe.storage import LocalStore
from dreamframe.v1 import coordinator_pb2 as pb
from services.coordinator import stages as st
from services.coordinator.clients import Clients
from services.coordinator.jobs import JobStore
from services.coordinator.runner import Coordinator
from services.coordinator.settings import CoordinatorSettings

STAGE_SECONDS = 0.05


@pytest.fixture
def fake_stages(monkeypatch):
    """Every stage takes STAGE_SECONDS per call; ``fail`` names stages that raise instead."""
    fail: set[str] = set()

    def fake(name: str):
        async def call(*args, **kwargs):
            await asyncio.sleep(STAGE_SECONDS)
            if name in fail:
                raise RuntimeError(f"{name} broke")

        return call

    for name in ("plot", "style", "render", "dataset", "train", "evaluate"):
        monkeypatch.setattr(st, name, fake(name))

    async def no_storyboard(ctx):
        return []

    async def no_story_storyboard(ctx, index):
        return None

    monkeypatch.setattr(st, "write_storyboard", no_storyboard)
    monkeypatch.setattr(st, "story_storyboard", no_story_storyboard, raising=False)
    return fail


def coordinator(tmp_path) -> Coordinator:
    clients = Clients(plot=None, style=None, renderers=[], qa=None, train=None, eval=None)
    return Coordinator(LocalStore(tmp_path, "bucket"), clients, CoordinatorSettings(story_parallelism=1))


async def run_job(c: Coordinator, job_id: str, stories: int = 2) -> pb.Job:
    spec = pb.JobSpec(stories=[pb.StoryInput(theme=f"theme {i}") for i in range(stories)])
    submitted = await c.submit(pb.SubmitJobRequest(spec=spec, job_id=job_id))
    last = submitted
    async for last in c.watch(submitted.job_id):  # noqa: B007 - the last update is the finished job
        pass
    return last


def one_job(tmp_path, job_id: str, stories: int = 2) -> pb.Job:
    """A coordinator started, one job run to its end, the coordinator stopped."""

    async def scenario():
        c = coordinator(tmp_path)
        await c.start()
        job = await run_job(c, job_id, stories)
        await c.stop()
        return job

    return asyncio.run(scenario())


def seconds(ts) -> float:
    return ts.seconds + ts.nanos / 1e9


def span(job: pb.Job, stage: int) -> tuple[float, float]:
    status = next(s for s in job.stages if s.stage == stage)
    assert status.HasField("started_at") and status.HasField("finished_at"), pb.Stage.Name(stage)
    return seconds(status.started_at), seconds(status.finished_at)


def test_every_stage_records_when_it_started_and_finished(tmp_path, fake_stages):
    job = one_job(tmp_path, "timed")
    assert job.state == pb.JOB_STATE_SUCCEEDED
    plot, style, render = (span(job, s) for s in (pb.STAGE_PLOT, pb.STAGE_STYLE, pb.STAGE_RENDER))
    dataset, train, evaluate = (span(job, s) for s in (pb.STAGE_DATASET, pb.STAGE_TRAIN, pb.STAGE_EVAL))
    slack = 0.01  # timestamps are wall-clock; sleeps are at least as long
    # A per-story stage runs from its first story entering it to its last story leaving it: two stories one
    # after the other (story_parallelism=1) take at least two calls.
    for start, end in (plot, style, render):
        assert end - start >= 2 * STAGE_SECONDS - slack
    # story 0 goes plot → style → render before story 1 starts, so the stages overlap but start in order
    assert plot[0] <= style[0] <= render[0] and plot[1] <= style[1] <= render[1]
    assert style[0] - plot[0] >= STAGE_SECONDS - slack
    # the job-wide stages run one after another, after the per-story ones
    assert render[1] <= dataset[0] and dataset[1] <= train[0] and train[1] <= evaluate[0]
    for start, end in (dataset, train, evaluate):
        assert end - start >= STAGE_SECONDS - slack
    # and it is what storage holds (what GetJob answers after a restart)
    stored = JobStore(LocalStore(tmp_path, "bucket")).load("timed")
    assert [(s.started_at, s.finished_at) for s in stored.stages] == [
        (s.started_at, s.finished_at) for s in job.stages
    ]


def test_a_failed_stage_has_an_end_and_a_stage_never_reached_has_no_times(tmp_path, fake_stages):
    fake_stages.add("train")

    job = one_job(tmp_path, "broken", stories=1)
    assert job.state == pb.JOB_STATE_FAILED
    start, end = span(job, pb.STAGE_TRAIN)
    assert end - start >= STAGE_SECONDS - 0.01
    evaluate = next(s for s in job.stages if s.stage == pb.STAGE_EVAL)
    assert not evaluate.HasField("started_at") and not evaluate.HasField("finished_at")


def test_a_per_story_stage_done_for_every_story_succeeds_when_a_later_one_fails(tmp_path, fake_stages):
    fake_stages.add("style")

    job = one_job(tmp_path, "late-failure", stories=1)
    states = {pb.Stage.Name(s.stage): pb.JobState.Name(s.state) for s in job.stages}
    assert job.state == pb.JOB_STATE_FAILED
    assert states["STAGE_PLOT"] == "JOB_STATE_SUCCEEDED" and states["STAGE_STYLE"] == "JOB_STATE_FAILED"
    assert states["STAGE_RENDER"] == "JOB_STATE_FAILED"  # running (waiting on style) when the job failed
    start, end = span(job, pb.STAGE_PLOT)
    assert end - start >= STAGE_SECONDS - 0.01


def test_jobs_are_listed_newest_first_by_submit_time_whatever_their_ids(tmp_path, fake_stages):
    async def scenario():
        c = coordinator(tmp_path)
        await c.start()
        # caller-chosen ids that sort the other way round from their submit order
        for job_id in ("zz-first", "mm-second", "aa-third"):
            await run_job(c, job_id, stories=1)
        everything, token = await c.list([], 0, "")
        assert token == ""
        pages, token = [], ""
        while True:
            page, token = await c.list([], 1, token)
            pages += [j.job_id for j in page]
            if not token:
                break
        with pytest.raises(InvalidArgument) as info:
            await c.list([], 1, "not-a-token")
        assert info.value.field == "page_token"
        await c.stop()
        # a coordinator that knows them only from storage orders them the same way
        fresh = coordinator(tmp_path)
        stored, _ = await fresh.list([], 0, "")
        return [j.job_id for j in everything], pages, [j.job_id for j in stored]

    listed, paged, stored = asyncio.run(scenario())
    assert listed == ["aa-third", "mm-second", "zz-first"]
    assert paged == listed
    assert stored == listed
