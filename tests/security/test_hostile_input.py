"""Hostile input (issue 19): a clear status, a bounded cost, nothing written.

Real gRPC on 127.0.0.1: the real coordinator (SubmitJob/GetJob over a real LocalStore) and the real
qa-generator, plus every RPC of all seven services' APIs as the servers register them (the generated
base servicers: undecodable bytes must be refused before any servicer code runs). Raw bytes go through
a generic channel with identity serializers, as any client in any language could send them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from typer.testing import CliRunner

from dreamframe.cli import commands as cli
from dreamframe.config import ServerSettings, get_settings
from dreamframe.serving import GrpcServer, Registration, error_detail_from
from dreamframe.storage import LocalStore
from dreamframe.v1 import (
    common_pb2,
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
from services.coordinator.clients import Clients
from services.coordinator.runner import Coordinator
from services.coordinator.server import CoordinatorServicer
from services.coordinator.settings import CoordinatorSettings
from services.qa_generator.server import QaServicer
from services.qa_generator.settings import QaSettings

pb = coordinator_pb2
# Not a protobuf message: field 1 as a length-delimited value whose length runs past the end.
GARBAGE = b"\x0a\xff\xff\xff\xff\x0f garbage"
FAST = 3.0  # seconds: a refusal must not cost more
SERVER = ServerSettings(host="127.0.0.1", port=0, metrics_port=-1)

ALL_SERVICES = [
    (plot_pb2, plot_pb2_grpc.add_PlotServiceServicer_to_server, plot_pb2_grpc.PlotServiceServicer),
    (style_pb2, style_pb2_grpc.add_StyleServiceServicer_to_server, style_pb2_grpc.StyleServiceServicer),
    (render_pb2, render_pb2_grpc.add_RenderServiceServicer_to_server, render_pb2_grpc.RenderServiceServicer),
    (qa_pb2, qa_pb2_grpc.add_QaServiceServicer_to_server, qa_pb2_grpc.QaServiceServicer),
    (train_pb2, train_pb2_grpc.add_TrainServiceServicer_to_server, train_pb2_grpc.TrainServiceServicer),
    (eval_pb2, eval_pb2_grpc.add_EvalServiceServicer_to_server, eval_pb2_grpc.EvalServiceServicer),
    (
        coordinator_pb2,
        coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server,
        coordinator_pb2_grpc.CoordinatorServiceServicer,
    ),
]


def reference_story() -> dict:
    return {
        "overview": "A keeper and a robot.",
        "character": {"Ada": "a woman looks like Meryl Streep in grey"},
        "img_diag": [
            [
                "frame",
                "generate an image in Noir style: at the lighthouse, a woman looks like Meryl Streep in grey",
            ],
            ["dialogue", "Ada: Who are you?"],
        ],
        "QA": [{"Question": "Where is Ada?", "Answer": "At the lighthouse."}],
    }


def nested(depth: int) -> bytes:
    return b'{"overview": ' + b"[" * depth + b"1" + b"]" * depth + b"}"


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", "dreamframe")


@contextlib.asynccontextmanager
async def coordinator_server(store: LocalStore):
    clients = Clients(plot=None, style=None, renderers=[], qa=None, train=None, eval=None)
    coordinator = Coordinator(store, clients, CoordinatorSettings(leader_election="off"))
    registration = Registration.of(
        coordinator_pb2,
        coordinator_pb2_grpc.add_CoordinatorServiceServicer_to_server,
        CoordinatorServicer(coordinator),
    )
    async with GrpcServer([registration], SERVER, service_name="coordinator-test") as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield coordinator_pb2_grpc.CoordinatorServiceStub(channel), channel


def stored_job_keys(store: LocalStore) -> list[str]:
    return [info.key for info in store.list("") if not info.key.startswith("uploads/")]


async def refused(call) -> tuple[grpc.aio.AioRpcError, float]:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value, time.monotonic() - started


def trailer_bytes(error: grpc.aio.AioRpcError) -> int:
    """What the status costs in trailers: grpc-message plus every trailing metadata entry."""
    size = len((error.details() or "").encode())
    for key, value in error.trailing_metadata() or ():
        size += len(key) + len(value if isinstance(value, bytes) else value.encode())
    return size


async def raw_call(channel: grpc.aio.Channel, path: str, client_streaming: bool, server_streaming: bool):
    """Send GARBAGE to ``path`` with identity serializers; the call's final status."""
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(client_streaming, server_streaming)]
    call = kind(path, request_serializer=None, response_deserializer=None)
    if client_streaming:

        async def one():
            yield GARBAGE

        invocation = call(one(), timeout=10)
    else:
        invocation = call(GARBAGE, timeout=10)
    try:
        if server_streaming:
            async for _ in invocation:
                pass
        else:
            await invocation
    except grpc.aio.AioRpcError as error:
        return error.code(), error_detail_from(error)
    return grpc.StatusCode.OK, None


# --- undecodable bytes ------------------------------------------------------------------------------


def test_garbage_bytes_are_invalid_argument_on_every_rpc_of_every_service():
    """Every method of the seven APIs, health and reflection: INVALID_ARGUMENT, not UNKNOWN."""

    async def body() -> None:
        registrations = [Registration.of(pb2, add, base()) for pb2, add, base in ALL_SERVICES]
        async with GrpcServer(registrations, SERVER, service_name="all-apis") as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                methods = [
                    (f"/{m.containing_service.full_name}/{m.name}", m.client_streaming, m.server_streaming)
                    for pb2, _, _ in ALL_SERVICES
                    for service in pb2.DESCRIPTOR.services_by_name.values()
                    for m in service.methods
                ]
                methods += [
                    ("/grpc.health.v1.Health/Check", False, False),
                    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", True, True),
                ]
                assert len(methods) > 12
                for path, client_streaming, server_streaming in methods:
                    code, detail = await raw_call(channel, path, client_streaming, server_streaming)
                    assert code == grpc.StatusCode.INVALID_ARGUMENT, (path, code)
                    assert detail is not None and detail.reason == "INVALID_ARGUMENT"
                    assert "do not parse" in detail.description
                # The same server still answers well-formed requests.
                check = channel.unary_unary(
                    "/grpc.health.v1.Health/Check",
                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                    response_deserializer=health_pb2.HealthCheckResponse.FromString,
                )
                assert (await check(health_pb2.HealthCheckRequest(), timeout=5)).status == 1

    asyncio.run(body())


def test_garbage_bytes_to_the_real_coordinator_and_qa_generator(store):
    async def body() -> None:
        qa = Registration.of(
            qa_pb2, qa_pb2_grpc.add_QaServiceServicer_to_server, QaServicer(store, QaSettings())
        )
        async with GrpcServer([qa], SERVER, service_name="qa-test") as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                code, _ = await raw_call(channel, "/dreamframe.v1.QaService/BuildDataset", False, True)
                assert code == grpc.StatusCode.INVALID_ARGUMENT
        async with coordinator_server(store) as (_, channel):
            for name, streaming in (("SubmitJob", False), ("GetJob", False), ("WatchJob", True)):
                code, _ = await raw_call(
                    channel, f"/dreamframe.v1.CoordinatorService/{name}", False, streaming
                )
                assert code == grpc.StatusCode.INVALID_ARGUMENT, name
        assert stored_job_keys(store) == []

    asyncio.run(body())


# --- over-long values are not echoed ----------------------------------------------------------------


def test_a_5000_character_job_id_is_invalid_argument_with_a_short_status(store):
    long_id = "j" * 4999 + "!"

    async def body() -> None:
        async with coordinator_server(store) as (stub, _):
            calls = {
                "SubmitJob": lambda: stub.SubmitJob(
                    pb.SubmitJobRequest(job_id=long_id, spec=pb.JobSpec(stories=[pb.StoryInput(theme="t")]))
                ),
                "GetJob": lambda: stub.GetJob(pb.GetJobRequest(job_id=long_id)),
                "CancelJob": lambda: stub.CancelJob(pb.CancelJobRequest(job_id=long_id)),
            }
            for name, call in calls.items():
                error, seconds = await refused(call())
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.code())
                assert trailer_bytes(error) < 1024, (name, trailer_bytes(error))
                detail = error_detail_from(error)
                assert detail.field == "job_id" and "j" * 41 not in detail.description
                assert seconds < FAST
        assert stored_job_keys(store) == []

    asyncio.run(body())


# --- story files: nesting, sizes, counts, control characters ------------------------------------------

BAD_STORIES = {
    # name: (story file bytes, the field the error must name)
    "nested": (nested(100_000), "spec.stories.0.story"),
    "no frames": (
        json.dumps({**reference_story(), "img_diag": [["dialogue", "Ada: Hello?"]]}).encode(),
        "spec.stories.0.story.img_diag",
    ),
    "10 MB overview": (
        json.dumps({**reference_story(), "overview": "o" * 10_000_000}).encode(),
        "spec.stories.0.story.overview",
    ),
    "10 MB frame text": (
        json.dumps(
            {
                **reference_story(),
                "img_diag": [["frame", "a lighthouse " * 800_000], *reference_story()["img_diag"]],
            }
        ).encode(),
        "spec.stories.0.story.img_diag.0.1",
    ),
    "NUL in a question": (
        json.dumps(
            {**reference_story(), "QA": [{"Question": "Where\x00is Ada?", "Answer": "Here."}]}
        ).encode(),
        "spec.stories.0.story.QA.0.Question",
    ),
    "control character in a native frame": (
        json.dumps(
            {
                "overview": "o",
                "substories": [{"tiny_stories": [{"items": [{"kind": "frame", "text": "at sea\x1b[31m"}]}]}],
            }
        ).encode(),
        "spec.stories.0.story.substories.0.tiny_stories.0.items.0.text",
    ),
}


@pytest.mark.parametrize("case", list(BAD_STORIES), ids=list(BAD_STORIES))
def test_submitjob_refuses_a_hostile_story_file_before_storing_anything(store, case):
    data, field = BAD_STORIES[case]
    store.put_bytes("uploads/story.json", data)

    async def body() -> None:
        async with coordinator_server(store) as (stub, _):
            request = pb.SubmitJobRequest(
                job_id="hostile",
                spec=pb.JobSpec(
                    stories=[pb.StoryInput(story=common_pb2.ObjectRef(key="uploads/story.json"))],
                    stages=[pb.STAGE_RENDER],
                ),
            )
            error, seconds = await refused(stub.SubmitJob(request))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            detail = error_detail_from(error)
            assert detail.field == field, detail
            assert seconds < FAST
            assert trailer_bytes(error) < 1024
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetJob(pb.GetJobRequest(job_id="hostile"))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert stored_job_keys(store) == []

    asyncio.run(body())


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (pb.JobSpec(stories=[pb.StoryInput(theme="a\x00b")]), "spec.stories.0.theme"),
        # Over the plot service's limit: refused here, not later in the plot stage.
        (pb.JobSpec(stories=[pb.StoryInput(theme="t" * 1_000)]), "spec.stories.0.theme"),
        (pb.JobSpec(stories=[pb.StoryInput(theme="t")], name="job\x07"), "spec.name"),
        (pb.JobSpec(stories=[pb.StoryInput(theme="t")], name="n" * 1_000_000), "spec.name"),
    ],
    ids=["NUL theme", "long theme", "BEL in name", "1 MB name"],
)
def test_submitjob_refuses_control_characters_and_huge_text_fields(store, spec, field):
    async def body() -> None:
        async with coordinator_server(store) as (stub, _):
            error, seconds = await refused(stub.SubmitJob(pb.SubmitJobRequest(spec=spec)))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert error_detail_from(error).field == field
            assert seconds < FAST and trailer_bytes(error) < 1024
        assert stored_job_keys(store) == []

    asyncio.run(body())


# --- the command line ----------------------------------------------------------------------------------


@pytest.fixture
def local_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("DREAMFRAME_STORAGE__BACKEND", "local")
    monkeypatch.setenv("DREAMFRAME_STORAGE__ROOT", str(tmp_path / "store"))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


@pytest.mark.parametrize(
    ("case", "expected"),
    [("nested", "nested more than 32 levels deep"), ("NUL in a question", "QA.0.Question")],
)
def test_import_story_refuses_cleanly_and_uploads_nothing(local_settings, case, expected):
    path = local_settings / "story.json"
    path.write_bytes(BAD_STORIES[case][0])
    started = time.monotonic()
    result = CliRunner().invoke(cli.app, ["import-story", str(path)])
    assert time.monotonic() - started < FAST
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # not a RecursionError
    assert "Traceback" not in result.output and expected in result.output
    assert not (local_settings / "store" / "dreamframe" / "uploads").exists()


def test_submit_refuses_a_nested_spec_file_cleanly(local_settings):
    path = local_settings / "spec.json"
    path.write_bytes(b'{"name": "x", "stories": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    result = CliRunner().invoke(cli.app, ["submit", "--spec", str(path), "--coordinator", "127.0.0.1:1"])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert "nested more than" in result.output and "--spec" in result.output
