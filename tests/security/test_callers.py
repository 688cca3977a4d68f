"""Callers, roles, teams and job ownership (issue 19).

Tokens map to a caller {name, team, role}; each RPC needs a role (read ⊂ submit ⊂ admin); a job belongs to
its submitter's team, and another team's job looks exactly like one that does not exist. A real
Coordinator (each stage replaced by a long sleep, so jobs stay running) behind the real GrpcServer on
127.0.0.1; every service of the API behind the same server wiring its main() uses; real gRPC clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import structlog
from google.protobuf import descriptor_pool

from dreamframe.config import CallerConfigError, ClientSettings, LogSettings, ServerSettings
from dreamframe.logging import configure_logging
from dreamframe.serving import (
    METHOD_ROLES,
    GrpcServer,
    Registration,
    current_caller,
    error_detail_from,
)
from dreamframe.storage import LocalStore
from dreamframe.v1 import (
    coordinator_pb2,
    coordinator_pb2_grpc,
    eval_pb2,
    eval_pb2_grpc,
    plot_pb2,
    plot_pb2_grpc,
    qa_pb2,
    qa_pb2_grpc,
    render_pb2,
    render_pb2_grpc,
    style_pb2,
    style_pb2_grpc,
    train_pb2,
    train_pb2_grpc,
)
from services.coordinator import stages as st
from services.coordinator.clients import Clients
from services.coordinator.runner import Coordinator
from services.coordinator.server import CoordinatorServicer
from services.coordinator.settings import CoordinatorSettings

pb = coordinator_pb2
Code = grpc.StatusCode

TOKENS = {
    "red-bot": "red-submit-token-0001",
    "red-viewer": "red-read-token-000002",
    "blue-bot": "blue-submit-token-003",
    "ops": "ops-admin-token-000004",
    "coordinator": "coordinator-token-0005",
}
CALLERS = [
    {"name": "red-bot", "team": "red", "role": "submit", "token": TOKENS["red-bot"]},
    {"name": "red-viewer", "team": "red", "role": "read", "token": TOKENS["red-viewer"]},
    {"name": "blue-bot", "team": "blue", "role": "submit", "token": TOKENS["blue-bot"]},
    {"name": "ops", "team": "platform", "role": "admin", "token": TOKENS["ops"]},
    {"name": "coordinator", "team": "dreamframe", "role": "submit", "token": TOKENS["coordinator"]},
]


def as_(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[name]}"),)


def server_settings(**overrides) -> ServerSettings:
    values = {"host": "127.0.0.1", "port": 0, "metrics_port": -1, "grace_seconds": 1.0, "callers": CALLERS}
    return ServerSettings(**{**values, **overrides})


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def rpc_error(awaitable) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value


async def stream_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    return info.value


# --- a coordinator whose jobs keep running ---------------------------------------------------------


@pytest.fixture
def slow_stages(monkeypatch):
    """Every stage call sleeps far longer than a test: jobs stay RUNNING until cancelled."""

    async def forever(*args, **kwargs):
        await asyncio.sleep(3600)

    for name in ("plot", "style", "render", "dataset", "train", "evaluate"):
        monkeypatch.setattr(st, name, forever)

    async def nothing(*args, **kwargs):
        return []

    monkeypatch.setattr(st, "write_storyboard", nothing)
    monkeypatch.setattr(st, "story_storyboard", nothing, raising=False)


@contextlib.asynccontextmanager
async def coordinator_server(tmp_path: Path, **overrides) -> AsyncIterator[grpc.aio.Channel]:
    clients = Clients(plot=None, style=None, renderers=[], qa=None, train=None, eval=None)
    coordinator = Coordinator(
        LocalStore(tmp_path / "store", "dreamframe"), clients, CoordinatorSettings(story_parallelism=1)
    )
    await coordinator.start()
    registration = Registration.of(
        pb, coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server, CoordinatorServicer(coordinator)
    )
    try:
        async with (
            GrpcServer([registration], server_settings(**overrides), service_name="coordinator") as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            yield channel
    finally:
        await coordinator.stop()


def spec(name: str) -> pb.JobSpec:
    return pb.JobSpec(name=name, stories=[pb.StoryInput(theme="a lighthouse keeper")], stages=[pb.STAGE_PLOT])


def test_a_team_cannot_get_watch_cancel_or_list_another_teams_job_but_an_admin_can(tmp_path, slow_stages):
    async def scenario():
        async with coordinator_server(tmp_path) as ch:
            jobs = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            red = (await jobs.SubmitJob(pb.SubmitJobRequest(spec=spec("red's")), metadata=as_("red-bot"))).job
            blue = (
                await jobs.SubmitJob(pb.SubmitJobRequest(spec=spec("blue's")), metadata=as_("blue-bot"))
            ).job
            assert (red.submitted_by, red.team) == ("red-bot", "red")
            assert (blue.submitted_by, blue.team) == ("blue-bot", "blue")

            # Another team's job answers exactly as an id that does not exist.
            unknown = await rpc_error(
                jobs.GetJob(pb.GetJobRequest(job_id="no-such-job"), metadata=as_("blue-bot"))
            )
            for call in (
                jobs.GetJob(pb.GetJobRequest(job_id=red.job_id), metadata=as_("blue-bot")),
                jobs.CancelJob(pb.CancelJobRequest(job_id=red.job_id), metadata=as_("blue-bot")),
            ):
                error = await rpc_error(call)
                assert error.code() == Code.NOT_FOUND
                assert error.details() == unknown.details().replace("no-such-job", red.job_id)
                assert error_detail_from(error).field == "job_id"
            error = await stream_error(
                jobs.WatchJob(pb.WatchJobRequest(job_id=red.job_id), metadata=as_("blue-bot"))
            )
            assert error.code() == Code.NOT_FOUND
            listed = await jobs.ListJobs(pb.ListJobsRequest(), metadata=as_("blue-bot"))
            assert [j.job_id for j in listed.jobs] == [blue.job_id]
            # Naming another team is an admin's listing.
            error = await rpc_error(jobs.ListJobs(pb.ListJobsRequest(team="red"), metadata=as_("blue-bot")))
            assert error.code() == Code.PERMISSION_DENIED and error_detail_from(error).field == "team"

            # The refused cancel left red's job running; red's own reader sees it.
            seen = (await jobs.GetJob(pb.GetJobRequest(job_id=red.job_id), metadata=as_("red-viewer"))).job
            assert seen.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
            listed = await jobs.ListJobs(pb.ListJobsRequest(team="red"), metadata=as_("red-viewer"))
            assert [j.job_id for j in listed.jobs] == [red.job_id]
            watch = jobs.WatchJob(pb.WatchJobRequest(job_id=red.job_id), metadata=as_("red-viewer"))
            assert (await watch.read()).job.job_id == red.job_id
            watch.cancel()

            # An admin sees every team, or the team it names, and may cancel any job.
            listed = await jobs.ListJobs(pb.ListJobsRequest(), metadata=as_("ops"))
            assert {j.job_id for j in listed.jobs} == {blue.job_id, red.job_id}
            listed = await jobs.ListJobs(pb.ListJobsRequest(team="red"), metadata=as_("ops"))
            assert [j.job_id for j in listed.jobs] == [red.job_id]
            got = (await jobs.GetJob(pb.GetJobRequest(job_id=red.job_id), metadata=as_("ops"))).job
            assert got.team == "red"
            cancelled = (
                await jobs.CancelJob(pb.CancelJobRequest(job_id=red.job_id), metadata=as_("ops"))
            ).job
            assert cancelled.state == pb.JOB_STATE_CANCELLED
            # A team's submitter may cancel its own team's jobs.
            mine = (
                await jobs.CancelJob(pb.CancelJobRequest(job_id=blue.job_id), metadata=as_("blue-bot"))
            ).job
            assert mine.state == pb.JOB_STATE_CANCELLED

    run(scenario())


def test_resubmitting_another_teams_job_id_shows_nothing_of_that_job(tmp_path, slow_stages):
    async def scenario():
        async with coordinator_server(tmp_path) as ch:
            jobs = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            request = pb.SubmitJobRequest(spec=spec("secret project"), job_id="shared-name")
            first = (await jobs.SubmitJob(request, metadata=as_("red-bot"))).job
            again = (await jobs.SubmitJob(request, metadata=as_("red-bot"))).job  # idempotent for red
            assert again.job_id == first.job_id and again.team == "red"

            error = await rpc_error(jobs.SubmitJob(request, metadata=as_("blue-bot")))
            assert error.code() == Code.ALREADY_EXISTS and error_detail_from(error).field == "job_id"
            assert "secret project" not in error.details() and "red" not in error.details()

    run(scenario())


def test_a_read_role_caller_cannot_submit_or_cancel(tmp_path, slow_stages):
    async def scenario():
        async with coordinator_server(tmp_path) as ch:
            jobs = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            red = (await jobs.SubmitJob(pb.SubmitJobRequest(spec=spec("x")), metadata=as_("red-bot"))).job
            for method, call in (
                (
                    "SubmitJob",
                    jobs.SubmitJob(pb.SubmitJobRequest(spec=spec("y")), metadata=as_("red-viewer")),
                ),
                (
                    "CancelJob",
                    jobs.CancelJob(pb.CancelJobRequest(job_id=red.job_id), metadata=as_("red-viewer")),
                ),
            ):
                error = await rpc_error(call)
                assert error.code() == Code.PERMISSION_DENIED
                assert f"/dreamframe.v1.CoordinatorService/{method}" in error.details()
            listed = await jobs.ListJobs(pb.ListJobsRequest(), metadata=as_("ops"))
            assert [j.job_id for j in listed.jobs] == [red.job_id]  # nothing was submitted
            assert listed.jobs[0].state != pb.JOB_STATE_CANCELLED

    run(scenario())


def test_a_submit_role_caller_cannot_do_an_admin_action(tmp_path, slow_stages):
    async def scenario():
        async with coordinator_server(tmp_path) as ch:
            jobs = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            await jobs.SubmitJob(pb.SubmitJobRequest(spec=spec("b")), metadata=as_("blue-bot"))
            # Listing across teams (another team by name) is admin-only.
            error = await rpc_error(jobs.ListJobs(pb.ListJobsRequest(team="blue"), metadata=as_("red-bot")))
            assert error.code() == Code.PERMISSION_DENIED and error_detail_from(error).field == "team"
            # A hostile team filter is refused short, not echoed.
            error = await rpc_error(
                jobs.ListJobs(pb.ListJobsRequest(team="../" + "x" * 5000), metadata=as_("ops"))
            )
            assert error.code() == Code.INVALID_ARGUMENT and len(error.details()) < 300

    run(scenario())


# --- trainer runs: the same ownership ----------------------------------------------------------------


def test_a_team_cannot_get_watch_cancel_or_list_another_teams_training_run(tmp_path):
    """Runs stay queued (no worker slot), so nothing trains; the manager and its store are real."""
    from services.trainer.contract import Runtime
    from services.trainer.runs import RunManager
    from services.trainer.server import TrainServicer

    store = LocalStore(tmp_path / "store", "dreamframe")
    store.put_bytes("datasets/toy/conversations/train.json", b"[]")

    def start(run_id: str) -> train_pb2.StartRunRequest:
        dataset = train_pb2.DatasetMix(dataset={"key": "datasets/toy/conversations/train.json"}, weight=1)
        return train_pb2.StartRunRequest(run_id=run_id, job_id="job-1", datasets=[dataset], base_model="tiny")

    async def scenario():
        manager = RunManager(store, Runtime(work_dir=tmp_path / "work", device="cpu"), max_concurrent_runs=0)
        await manager.start()
        registration = Registration.of(
            train_pb2, train_pb2_grpc.add_TrainServiceServicer_to_server, TrainServicer(manager)
        )
        try:
            async with (
                GrpcServer([registration], server_settings(), service_name="trainer") as server,
                grpc.aio.insecure_channel(server.address) as ch,
            ):
                train = train_pb2_grpc.TrainServiceStub(ch)
                await train.StartRun(start("red-run"), metadata=as_("red-bot"))
                await train.StartRun(start("blue-run"), metadata=as_("blue-bot"))

                unknown = await rpc_error(
                    train.GetRun(train_pb2.GetRunRequest(run_id="nope"), metadata=as_("blue-bot"))
                )
                for call in (
                    train.GetRun(train_pb2.GetRunRequest(run_id="red-run"), metadata=as_("blue-bot")),
                    train.CancelRun(train_pb2.CancelRunRequest(run_id="red-run"), metadata=as_("blue-bot")),
                ):
                    error = await rpc_error(call)
                    assert error.code() == Code.NOT_FOUND
                    assert error.details() == unknown.details().replace("nope", "red-run")
                error = await stream_error(
                    train.WatchRun(train_pb2.WatchRunRequest(run_id="red-run"), metadata=as_("blue-bot"))
                )
                assert error.code() == Code.NOT_FOUND
                listed = await train.ListRuns(
                    train_pb2.ListRunsRequest(job_id="job-1"), metadata=as_("blue-bot")
                )
                assert [r.run_id for r in listed.runs] == ["blue-run"]
                error = await rpc_error(train.StartRun(start("red-run"), metadata=as_("blue-bot")))
                assert error.code() == Code.ALREADY_EXISTS

                red = await train.GetRun(
                    train_pb2.GetRunRequest(run_id="red-run"), metadata=as_("red-viewer")
                )
                assert red.run.state == train_pb2.RUN_STATE_QUEUED  # the refused cancel changed nothing
                listed = await train.ListRuns(train_pb2.ListRunsRequest(), metadata=as_("ops"))
                assert sorted(r.run_id for r in listed.runs) == ["blue-run", "red-run"]
                cancelled = await train.CancelRun(
                    train_pb2.CancelRunRequest(run_id="red-run"), metadata=as_("ops")
                )
                assert cancelled.run.state == train_pb2.RUN_STATE_CANCELLED
        finally:
            await manager.shutdown(grace_seconds=1.0)
        assert store.get_json("runs/red-run/run.json")["team"] == "red"  # stored with the run

    run(scenario(), timeout=60.0)


# --- every service: no token, a wrong token ---------------------------------------------------------

SERVICES = [
    (coordinator_pb2, coordinator_pb2_grpc, "CoordinatorService"),
    (plot_pb2, plot_pb2_grpc, "PlotService"),
    (style_pb2, style_pb2_grpc, "StyleService"),
    (render_pb2, render_pb2_grpc, "RenderService"),
    (qa_pb2, qa_pb2_grpc, "QaService"),
    (train_pb2, train_pb2_grpc, "TrainService"),
    (eval_pb2, eval_pb2_grpc, "EvalService"),
]


def every_method() -> list[tuple[str, bool, bool]]:
    """(/package.Service/Method, client streaming, server streaming) for every RPC of the API."""
    pool = descriptor_pool.Default()
    found = []
    for pb2, _, name in SERVICES:
        service = pool.FindServiceByName(pb2.DESCRIPTOR.services_by_name[name].full_name)
        for m in service.methods:
            found.append((f"/{service.full_name}/{m.name}", m.client_streaming, m.server_streaming))
    return found


def test_every_rpc_has_its_role_in_the_table():
    methods = {m for m, _, _ in every_method()}
    assert len(methods) == 16
    assert methods == set(METHOD_ROLES)  # none falls back to admin by accident, none is stale


def test_every_rpc_of_every_service_refuses_missing_and_wrong_tokens():
    """The generic servicers stand in for each service: the wiring under test is GrpcServer's, which
    every service's main() runs with settings.server; the handler would answer UNIMPLEMENTED."""

    async def scenario():
        registrations = [
            Registration.of(
                pb2,
                getattr(grpc_mod, f"add_{name}Servicer_to_server"),
                getattr(grpc_mod, f"{name}Servicer")(),
            )
            for pb2, grpc_mod, name in SERVICES
        ]
        async with (
            GrpcServer(registrations, server_settings(), service_name="all") as server,
            grpc.aio.insecure_channel(server.address) as ch,
        ):
            wrong = [
                None,
                (("authorization", "Bearer not-a-known-token-at-all"),),
                (("authorization", TOKENS["ops"]),),  # no scheme
                (("authorization", f"Basic {TOKENS['ops']}"),),
                (("authorization", f"Bearer {TOKENS['ops']}x"),),
                (("authorization", f"Bearer {TOKENS['ops'][:-1]}"),),
                (("authorization", f"Bearer {TOKENS['ops']}"), ("authorization", f"Bearer {TOKENS['ops']}")),
            ]
            for method, client_streaming, server_streaming in every_method():
                assert not client_streaming
                call = (ch.unary_stream if server_streaming else ch.unary_unary)(method)
                for metadata in wrong:
                    response = call(b"", metadata=metadata)
                    error = await (stream_error(response) if server_streaming else rpc_error(response))
                    assert error.code() == Code.UNAUTHENTICATED, (method, metadata)
                    assert error_detail_from(error).field == "authorization"
                    assert not any(t in (error.details() or "") for t in TOKENS.values())
                # The right token gets through to the handler (which is not implemented here).
                response = call(b"", metadata=as_("ops"))
                error = await (stream_error(response) if server_streaming else rpc_error(response))
                assert error.code() == Code.UNIMPLEMENTED, method
                # A read-role caller may read, nothing else.
                response = call(b"", metadata=as_("red-viewer"))
                error = await (stream_error(response) if server_streaming else rpc_error(response))
                expected = Code.UNIMPLEMENTED if METHOD_ROLES[method] == "read" else Code.PERMISSION_DENIED
                assert error.code() == expected, method

    run(scenario())


# --- identity in logs and metrics; service identities ------------------------------------------------


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging(LogSettings(level="INFO", json=True), stream=stream)
    yield stream
    for handler in [h for h in logging.getLogger().handlers if h.get_name() == "dreamframe"]:
        logging.getLogger().removeHandler(handler)
    structlog.reset_defaults()


def test_the_access_log_and_metrics_carry_the_callers_identity_never_its_token(
    tmp_path, slow_stages, json_logs
):
    async def scenario():
        async with coordinator_server(tmp_path) as ch:
            jobs = coordinator_pb2_grpc.CoordinatorServiceStub(ch)
            await jobs.ListJobs(pb.ListJobsRequest(), metadata=as_("red-viewer"))
            await rpc_error(jobs.SubmitJob(pb.SubmitJobRequest(spec=spec("z")), metadata=as_("red-viewer")))
            await rpc_error(jobs.ListJobs(pb.ListJobsRequest(), metadata=(("authorization", "Bearer nope"),)))

    run(scenario())
    text = json_logs.getvalue()
    assert not any(t in text for t in TOKENS.values())
    lines = [json.loads(s) for s in text.splitlines() if s.startswith("{")]
    finished = [
        (e["method"].rsplit("/", 1)[1], e["code"], e["caller"], e["team"], e["role"])
        for e in lines
        if e["event"] == "rpc finished"
    ]
    assert finished == [
        ("ListJobs", "OK", "red-viewer", "red", "read"),
        ("SubmitJob", "PERMISSION_DENIED", "red-viewer", "red", "read"),
        ("ListJobs", "UNAUTHENTICATED", "anonymous", "anonymous", "anonymous"),
    ]


def test_metrics_count_rpcs_by_team_and_role_only():
    async def scenario():
        servicer = plot_pb2_grpc.PlotServiceServicer()
        registration = Registration.of(plot_pb2, plot_pb2_grpc.add_PlotServiceServicer_to_server, servicer)
        async with (
            GrpcServer([registration], server_settings(), service_name="plot-llm") as server,
            grpc.aio.insecure_channel(server.address) as ch,
        ):
            plot = plot_pb2_grpc.PlotServiceStub(ch)
            request = plot_pb2.GenerateStoryRequest(theme="t")
            await stream_error(plot.GenerateStory(request, metadata=as_("red-bot")))
            await stream_error(plot.GenerateStory(request, metadata=as_("red-viewer")))
            await stream_error(plot.GenerateStory(request))
            registry = server.metrics.registry
            families = {f.name: f for f in registry.collect()}
            samples = [s for s in families["dreamframe_rpc_handled"].samples if s.name.endswith("_total")]
            by = {(s.labels["team"], s.labels["role"], s.labels["grpc_code"]): s.value for s in samples}
            assert by == {
                ("red", "submit", "UNIMPLEMENTED"): 1,
                ("red", "read", "PERMISSION_DENIED"): 1,
                ("anonymous", "anonymous", "UNAUTHENTICATED"): 1,
            }
            assert set(samples[0].labels) == {"grpc_service", "grpc_method", "grpc_code", "team", "role"}

    run(scenario())


def test_the_coordinator_calls_workers_as_itself(tmp_path):
    """ClientSettings.token is the coordinator's own caller entry on the workers: they see its identity."""
    seen = []

    class Plot(plot_pb2_grpc.PlotServiceServicer):
        async def GenerateStory(self, request, context):  # noqa: N802
            seen.append(current_caller())
            yield plot_pb2.GenerateStoryResponse(level=3)

    async def scenario():
        registration = Registration.of(plot_pb2, plot_pb2_grpc.add_PlotServiceServicer_to_server, Plot())
        async with GrpcServer([registration], server_settings(), service_name="plot-llm") as server:
            settings = CoordinatorSettings(plot_address=server.address, renderer_discovery="static")
            clients = Clients.connect(settings, ClientSettings(token=TOKENS["coordinator"], max_attempts=1))
            try:
                [r async for r in clients.plot.GenerateStory(plot_pb2.GenerateStoryRequest(theme="t"))]
            finally:
                await clients.close()

    run(scenario())
    assert [(c.name, c.team, c.role) for c in seen] == [("coordinator", "dreamframe", "submit")]


# --- configuration ----------------------------------------------------------------------------------


def test_callers_come_from_env_json_a_mounted_file_and_the_legacy_token_list(tmp_path, monkeypatch):
    from dreamframe.config import load_settings

    mounted = tmp_path / "callers.yaml"
    mounted.write_text("- {name: green-bot, team: green, role: submit, token: green-submit-token-0006}\n")
    monkeypatch.setenv("DREAMFRAME_SERVER__CALLERS", json.dumps(CALLERS[:1]))
    monkeypatch.setenv("DREAMFRAME_SERVER__CALLERS_FILE", str(mounted))
    monkeypatch.setenv("DREAMFRAME_SERVER__AUTH_TOKENS", "old-shared-token")
    server = load_settings().server
    assert [(c.name, c.team, c.role) for c in server.all_callers] == [
        ("red-bot", "red", "submit"),
        ("green-bot", "green", "submit"),
        ("token-1", "default", "admin"),
    ]
    assert server.auth_enabled and not ServerSettings().auth_enabled


@pytest.mark.parametrize(
    "callers, message",
    [
        ([{**CALLERS[0], "token": "short-secret"}], "at least 16 characters"),
        ([CALLERS[0], {**CALLERS[1], "token": TOKENS["red-bot"]}], "the token of another caller"),
        ([CALLERS[0], {**CALLERS[1], "name": "red-bot"}], "used twice"),
    ],
)
def test_bad_caller_entries_fail_at_start_without_printing_a_token(callers, message):
    with pytest.raises(CallerConfigError) as info:
        ServerSettings(callers=callers)
    assert message in str(info.value)
    assert "short-secret" not in str(info.value) and TOKENS["red-bot"] not in str(info.value)


def test_a_bad_callers_file_is_named_without_its_contents(tmp_path):
    mounted = tmp_path / "callers.yaml"
    mounted.write_text("- {name: Bad Name, team: red, role: root, token: file-secret-token-0007}\n")
    with pytest.raises(CallerConfigError) as info:
        ServerSettings(callers_file=mounted)
    assert "entry 0" in str(info.value) and "file-secret-token-0007" not in str(info.value)
