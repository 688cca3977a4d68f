"""WatchJob sends the whole job once, then only what changed; clients merge the updates back."""

from __future__ import annotations

import asyncio
import random

import grpc

from dreamframe import job_watch
from dreamframe.config import ServerSettings
from dreamframe.serving import GrpcServer, Registration
from dreamframe.storage import LocalStore
from dreamframe.v1 import coordinator_pb2 as pb
from dreamframe.v1 import coordinator_pb2_grpc
from services.coordinator import stages as st
from services.coordinator.clients import Clients
from services.coordinator.runner import Coordinator
from services.coordinator.server import CoordinatorServicer
from services.coordinator.settings import CoordinatorSettings

STAGES = [pb.STAGE_PLOT, pb.STAGE_STYLE, pb.STAGE_RENDER, pb.STAGE_DATASET]


def mutate(job: pb.Job, rng: random.Random) -> None:
    """One random change of the kinds a running job goes through."""
    kind = rng.randrange(8)
    if kind == 7 and job.stages:
        status = rng.choice(job.stages)
        if status.outputs and rng.random() < 0.3:
            status.outputs[0].ref.size += 1  # an output replaced in place
        else:
            status.outputs.add(name=f"frames/{len(status.outputs):03d}").ref.key = "k"
        return
    if kind == 0:
        job.state = rng.choice([pb.JOB_STATE_RUNNING, pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED])
    elif kind == 1 and job.stages:
        status = rng.choice(job.stages)
        status.progress.done += rng.randrange(1, 50)
        status.progress.current_item = f"frame {status.progress.done}"
    elif kind == 2:
        missing = [s for s in STAGES if s not in {x.stage for x in job.stages}]
        if missing:
            job.stages.add(stage=rng.choice(missing), state=pb.JOB_STATE_RUNNING)
    elif kind == 3:
        job.outputs.add(name=f"storyboard/{len(job.outputs)}").ref.key = f"k/{len(job.outputs)}"
    elif kind == 4 and job.outputs:
        del job.outputs[-1]  # a repeated field that shrinks is replaced whole
    elif kind == 5:
        if job.HasField("updated_at") and rng.random() < 0.3:
            job.ClearField("updated_at")  # a message field that goes away
        else:
            job.updated_at.seconds += 1
    else:
        job.error = rng.choice(["", "renderer r-2 failed a shard"])
        job.renderer_replicas = rng.randrange(5)


def test_updates_merge_back_into_exactly_the_job():
    rng = random.Random(7)
    job = pb.Job(job_id="j", state=pb.JOB_STATE_QUEUED)
    job.spec.stories.extend(pb.StoryInput(theme=f"theme {n}") for n in range(50))
    sent = [job_watch.first(job)]
    previous = pb.Job()
    previous.CopyFrom(job)
    for _ in range(400):
        mutate(job, rng)
        update = job_watch.changes(previous, job)
        if update is not None:
            assert update.changed.paths and "spec" not in update.changed.paths
            assert not update.job.spec.stories, "the spec is never sent again"
            sent.append(update)
        previous.CopyFrom(job)
        merged = list(job_watch.follow(sent))[-1]
        assert merged == job
    assert job_watch.changes(job, job) is None, "nothing changed, nothing sent"


def test_a_progress_tick_does_not_resend_a_stages_outputs():
    before = pb.Job(job_id="j")
    render = before.stages.add(stage=pb.STAGE_RENDER, state=pb.JOB_STATE_RUNNING)
    for n in range(1000):
        render.outputs.add(name=f"frames/{n:03d}").ref.key = f"jobs/j/stories/{n:03d}/frames.json"
    after = pb.Job()
    after.CopyFrom(before)
    after.stages[0].progress.done = 64
    tick = job_watch.changes(before, after)
    assert list(tick.changed.paths) == ["stages"] and tick.ByteSize() < 100
    merged = job_watch.apply(job_watch.apply(None, job_watch.first(before)), tick)
    assert merged == after
    after.stages[0].outputs.add(name="frames/1000").ref.key = "k"
    grew = job_watch.changes(before, after)
    assert list(grew.changed.paths) == ["stages", "stages.outputs"]
    assert job_watch.apply(merged, grew) == after


def test_an_update_sends_only_the_stages_that_changed():
    before = pb.Job(job_id="j")
    for stage in STAGES:
        before.stages.add(stage=stage, state=pb.JOB_STATE_RUNNING)
    after = pb.Job()
    after.CopyFrom(before)
    after.stages[2].progress.done = 64
    update = job_watch.changes(before, after)
    assert list(update.changed.paths) == ["stages"]
    assert [s.stage for s in update.job.stages] == [pb.STAGE_RENDER]


def test_a_watcher_of_a_large_job_gets_small_updates_over_grpc(tmp_path, monkeypatch):
    """2,000 stories (a ~100 kB job): the first message is the whole job, every later one is small, and
    the merged stream ends equal to GetJob's job."""
    frames = 300

    async def render(ctx, index, tally):
        tally.add_story(frames)
        for done in range(16, frames + 1, 16):
            tally.story_done(index, done)
            await ctx.progress(pb.STAGE_RENDER, tally.done, tally.total, "frames", f"frame {done}")
            await asyncio.sleep(0.01)
        tally.story_done(index, frames)

    async def nothing(*args, **kwargs):
        return []

    for name in ("plot", "style", "write_storyboard", "story_storyboard"):
        monkeypatch.setattr(st, name, nothing)
    monkeypatch.setattr(st, "render", render)

    async def scenario():
        clients = Clients(plot=None, style=None, renderers=[], qa=None, train=None, eval=None)
        settings = CoordinatorSettings(watch_interval_seconds=0.05, story_parallelism=64)
        coordinator = Coordinator(LocalStore(tmp_path / "s", "dreamframe"), clients, settings)
        await coordinator.start()
        servicer = CoordinatorServicer(coordinator)
        registration = Registration.of(
            pb, coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server, servicer
        )
        server_settings = ServerSettings(host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=0)
        async with GrpcServer([registration], server_settings, service_name="coordinator") as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = coordinator_pb2_grpc.CoordinatorServiceStub(channel)
                spec = pb.JobSpec(
                    stories=[pb.StoryInput(theme=f"a story about the number {n}") for n in range(2000)],
                    stages=[pb.STAGE_PLOT, pb.STAGE_RENDER],
                )
                await stub.SubmitJob(pb.SubmitJobRequest(spec=spec, job_id="large"))
                sizes, job = [], None
                async for update in stub.WatchJob(pb.WatchJobRequest(job_id="large")):
                    sizes.append(update.ByteSize())
                    job = job_watch.apply(job, update)
                stored = (await stub.GetJob(pb.GetJobRequest(job_id="large"))).job
        await coordinator.stop()
        return sizes, job, stored

    sizes, job, stored = asyncio.run(scenario())
    assert sizes[0] > 50_000, "the first message is the whole job"
    assert len(sizes) > 3 and max(sizes[1:]) < 1_000, sizes[:10]
    assert job.state == pb.JOB_STATE_SUCCEEDED
    job.ClearField("renderer_replicas")
    stored.ClearField("renderer_replicas")
    assert job == stored
