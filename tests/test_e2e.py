"""End to end: every service as its own process on 127.0.0.1, storage on a real S3 server, tiny models.

One job runs theme → story → style → keyframes → dataset → checkpoint → report while one of the two
renderer replicas is killed mid-render and the coordinator is killed and restarted mid-job; the job still
completes, every frame exactly once, and finished stages are not redone. Then cancellation and bad
submissions. This is `make run` under fire."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from dreamframe import job_watch, keys
from dreamframe.cli import local
from dreamframe.config import ClientSettings
from dreamframe.serving import error_detail_from, make_sync_channel
from dreamframe.storage import S3Store, from_proto
from dreamframe.story import load_story
from dreamframe.v1 import coordinator_pb2 as pb
from dreamframe.v1 import coordinator_pb2_grpc

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Cluster:
    state: Path
    env: dict[str, str]
    base_port: int
    store: S3Store
    processes: list[local.Process]

    @property
    def coordinator(self) -> coordinator_pb2_grpc.CoordinatorServiceStub:
        channel = make_sync_channel(f"127.0.0.1:{self.base_port}", ClientSettings(deadline_seconds=30))
        return coordinator_pb2_grpc.CoordinatorServiceStub(channel)

    def process(self, name: str) -> local.Process:
        return next(p for p in self.processes if p.name == name)

    def finished_rpcs(self, name: str, method: str) -> int:
        """How many calls of ``method`` the service's access log recorded (JSON lines)."""
        count = 0
        for line in Path(self.process(name).log).read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            count += entry.get("event") == "rpc finished" and entry.get("method", "").endswith(method)
        return count


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    state = tmp_path_factory.mktemp("dreamframe")
    bucket = f"e2e-{random.randrange(1 << 30):x}"
    env = {
        "DREAMFRAME_STORAGE__BACKEND": "s3",
        "DREAMFRAME_STORAGE__ENDPOINT": s3_server.endpoint,
        "DREAMFRAME_STORAGE__ACCESS_KEY": s3_server.access_key,
        "DREAMFRAME_STORAGE__SECRET_KEY": s3_server.secret_key,
        "DREAMFRAME_STORAGE__BUCKET": bucket,
        "DREAMFRAME_MODELS__CACHE_DIR": str(state / "models"),
        "DREAMFRAME_LOG__JSON": "true",
        "DREAMFRAME_COORDINATOR__RENDER_SHARD_SIZE": "2",
        "DREAMFRAME_COORDINATOR__PERSIST_INTERVAL_SECONDS": "0.2",
        "DREAMFRAME_SERVER__GRACE_SECONDS": "5",
        "DREAMFRAME_CLIENT__MAX_ATTEMPTS": "2",
        "HF_HUB_OFFLINE": "1",
    }
    for section in ("STYLE", "RENDERER", "TRAINER"):
        env[f"DREAMFRAME_{section}__PRESET"] = "tiny"
    env["DREAMFRAME_PLOT__MODEL"] = "tiny"
    base_port = random.randrange(21000, 40000, 100)
    processes = local.start_services(state, env=env, renderers=2, base_port=base_port)
    try:
        local.wait_healthy(processes, timeout=600)
    except Exception:
        local.stop_services(state, grace=5)
        raise
    store = S3Store(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, bucket)
    yield Cluster(state, env, base_port, store, processes)
    local.stop_services(state, grace=10)


def job_spec(**render) -> pb.JobSpec:
    spec = json_format.Parse((ROOT / "deploy/local/tiny-job.json").read_text(), pb.JobSpec())
    spec.stories.add(theme="a lighthouse keeper befriends a lost robot")
    spec.plot.substories, spec.plot.tiny_stories, spec.plot.frames_per_tiny_story = 2, 2, 6
    for key, value in render.items():
        setattr(spec.render, key, value)
    return spec


def watch_until(cluster: Cluster, job_id: str, predicate, timeout: float = 900) -> pb.Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            updates = cluster.coordinator.WatchJob(pb.WatchJobRequest(job_id=job_id), timeout=timeout)
            for job in job_watch.follow(updates):
                if predicate(job):
                    return job
            job = cluster.coordinator.GetJob(pb.GetJobRequest(job_id=job_id)).job
            if predicate(job):
                return job
        except grpc.RpcError as exc:  # the coordinator is restarting
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} did not reach the expected state")


def stage(job: pb.Job, which: int) -> pb.StageStatus:
    return next(s for s in job.stages if s.stage == which)


def restart_coordinator(cluster: Cluster) -> None:
    old = cluster.process("coordinator")
    os.kill(old.pid, signal.SIGKILL)
    os.waitpid(old.pid, 0)
    plan, addresses = local.service_plan(renderers=2, base_port=cluster.base_port)
    coordinator = next(p for p in plan if p.name == "coordinator")
    restarted = local.spawn(coordinator, {**cluster.env, **addresses}, Path(old.log))
    cluster.processes[cluster.processes.index(old)] = restarted
    local.write_state(cluster.state, cluster.processes)  # so the fixture's teardown stops this one too
    local.wait_healthy([restarted], timeout=120)


def test_whole_job_survives_a_dead_renderer_and_a_coordinator_restart(cluster):
    job = cluster.coordinator.SubmitJob(pb.SubmitJobRequest(spec=job_spec(steps=30), job_id="e2e-main")).job
    assert [s.stage for s in job.stages] == [1, 2, 3, 4, 5, 6]

    # Kill the second renderer replica once rendering is under way.
    during = watch_until(cluster, job.job_id, lambda j: stage(j, pb.STAGE_RENDER).progress.done >= 2)
    render = stage(during, pb.STAGE_RENDER)
    assert render.state == pb.JOB_STATE_RUNNING and render.progress.done < render.progress.total
    victim = cluster.process("keyframe-renderer-1")
    os.kill(victim.pid, signal.SIGKILL)

    # Kill the coordinator while the job is training, restart it: it must resume, not redo.
    watch_until(cluster, job.job_id, lambda j: stage(j, pb.STAGE_TRAIN).state == pb.JOB_STATE_RUNNING)
    restart_coordinator(cluster)
    done = watch_until(cluster, job.job_id, lambda j: j.state in (3, 4, 5))
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert all(s.state == pb.JOB_STATE_SUCCEEDED for s in done.stages)

    store = cluster.store
    story = load_story(store.get_bytes(keys.story_key(job.job_id)))
    assert story.frame_count == 2 * 2 * 6
    listing = json.loads(store.get_bytes(f"{keys.story_prefix(job.job_id, 0)}frames.json"))
    assert [int(f["key"][-10:-4]) for f in listing["frames"]] == list(range(story.frame_count))
    pngs = sorted(i.key for i in store.list(keys.frames_prefix(job.job_id, 0)) if i.key.endswith(".png"))
    assert pngs == [keys.frame_key(job.job_id, 0, i) for i in range(story.frame_count)]
    for frame in listing["frames"]:
        assert store.stat(frame["key"]).sha256 == frame["sha256"], "frame file changed after it was reported"
    # The restarted coordinator picked the job up from storage...
    coordinator_log = Path(cluster.process("coordinator").log).read_text(errors="replace")
    assert f"resuming job {job.job_id}" in coordinator_log
    # ...and finished stages were not redone.
    plot_calls = cluster.finished_rpcs("plot-llm", "PlotService/GenerateStory")
    style_calls = cluster.finished_rpcs("style-trainer", "StyleService/TrainStyle")
    assert plot_calls == 1 and style_calls == 1, (plot_calls, style_calls)
    # Every output the job names is there.
    outputs = {n.name for s in done.stages for n in s.outputs} | {n.name for n in done.outputs}
    assert {
        "story/000",
        "style/000",
        "frames/000",
        "manifest",
        "model",
        "report_json",
        "storyboard",
    } <= outputs
    assert store.exists(f"{keys.job_prefix(job.job_id)}storyboard/index.html")
    # The story's page and first contact sheet, from the thumbnail the renderer wrote beside each frame.
    for name in ("story_000.html", "contact_sheet_000_00.jpg"):
        assert store.exists(f"{keys.job_prefix(job.job_id)}storyboard/{name}"), name
    assert store.exists(keys.frame_thumb_key(job.job_id, 0, 0))
    report = json.loads(
        store.get_bytes(
            next(n.ref.key for n in stage(done, pb.STAGE_EVAL).outputs if n.name == "report_json")
        )
    )
    # The fine-tuned model and its base were shown the frames per video training used (the manifest's).
    frames = {m["name"]: m["num_frames"] for m in report["models"]}
    assert frames == {"base": 4, "dreamframe": 4}, frames
    # A finished run keeps its final model and adapter, not its resume checkpoints.
    run_prefix = next(n.ref.key for n in stage(done, pb.STAGE_TRAIN).outputs if n.name == "model")
    run_prefix = run_prefix.split("final/")[0]
    assert not list(store.list(f"{run_prefix}checkpoints/")) and store.exists(f"{run_prefix}metrics.json")


def test_cancel_stops_every_stage(cluster):
    job = cluster.coordinator.SubmitJob(pb.SubmitJobRequest(spec=job_spec(steps=40), job_id="e2e-cancel")).job
    watch_until(cluster, job.job_id, lambda j: stage(j, pb.STAGE_RENDER).state == pb.JOB_STATE_RUNNING)
    cancelled = cluster.coordinator.CancelJob(pb.CancelJobRequest(job_id=job.job_id)).job
    assert cancelled.state == pb.JOB_STATE_CANCELLED
    assert all(s.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_CANCELLED) for s in cancelled.stages)
    assert stage(cancelled, pb.STAGE_RENDER).state == pb.JOB_STATE_CANCELLED
    assert stage(cancelled, pb.STAGE_TRAIN).state == pb.JOB_STATE_CANCELLED
    prefix = keys.frames_prefix(job.job_id, 0)
    time.sleep(3)  # a renderer finishes at most the batch in flight
    before = len(list(cluster.store.list(prefix)))
    time.sleep(3)
    assert len(list(cluster.store.list(prefix))) == before, "frames kept coming after the cancel"
    assert cluster.coordinator.GetJob(pb.GetJobRequest(job_id=job.job_id)).job.state == pb.JOB_STATE_CANCELLED


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.spec.stories.add(theme="   "), "spec.stories.0.theme"),
        (lambda r: (r.spec.stories.add(theme="x"), r.spec.stages.append(42)), "spec.stages.0"),
        (lambda r: None, "spec.stories"),
        (
            lambda r: r.spec.stories.add(story={"bucket": "", "key": "uploads/bad.json"}),
            "spec.stories.0.story",
        ),
        (lambda r: (r.spec.stories.add(theme="x"), setattr(r, "job_id", "../etc")), "job_id"),
    ],
    ids=["empty-theme", "unknown-stage", "no-stories", "malformed-story-file", "bad-job-id"],
)
def test_bad_submissions_are_invalid_argument_naming_the_field(cluster, mutate, field):
    cluster.store.put_bytes("uploads/bad.json", b'{"overview": "o", "img_diag": [["frme", "x"]]}')
    request = pb.SubmitJobRequest()
    mutate(request)
    with pytest.raises(grpc.RpcError) as info:
        cluster.coordinator.SubmitJob(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field), info.value.details()
    assert error_detail_from(info.value).field.startswith(field)


def test_several_jobs_with_several_stories_run_at_once(cluster):
    def data_only(job_id: str) -> pb.Job:
        spec = job_spec(steps=8)
        spec.stories.add(theme="a heist in a floating market")
        del spec.stages[:]
        spec.stages.extend([pb.STAGE_PLOT, pb.STAGE_STYLE, pb.STAGE_RENDER, pb.STAGE_DATASET])
        return cluster.coordinator.SubmitJob(pb.SubmitJobRequest(spec=spec, job_id=job_id)).job

    jobs = [data_only("e2e-multi-a"), data_only("e2e-multi-b")]
    assert all(len(j.spec.stories) == 2 for j in jobs)
    # resubmitting the same id is idempotent: the same job, not a second one
    assert data_only("e2e-multi-a").created_at == jobs[0].created_at
    finished = [watch_until(cluster, j.job_id, lambda j: j.state in (3, 4, 5)) for j in jobs]
    for job in finished:
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        assert [s.stage for s in job.stages] == [1, 2, 3, 4]
        for story in (0, 1):
            frames = [
                i for i in cluster.store.list(keys.frames_prefix(job.job_id, story)) if i.key.endswith(".png")
            ]
            assert len(frames) == 2 * 2 * 6
        manifest = next(n.ref for n in stage(job, pb.STAGE_DATASET).outputs if n.name == "manifest")
        assert cluster.store.verify(from_proto(manifest))
    listed = {j.job_id for j in cluster.coordinator.ListJobs(pb.ListJobsRequest()).jobs}
    assert {"e2e-multi-a", "e2e-multi-b"} <= listed
