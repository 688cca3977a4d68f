"""dreamframe.serving, server side: real grpc.aio servers on 127.0.0.1, port 0, real clients.

Fake PlotService/TrainService servicers stand in for the real ones; everything else (interceptors,
health, reflection, metrics over HTTP, TLS, shutdown in a subprocess) is the real thing.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from prometheus_client.parser import text_string_to_metric_families
from serving_fixtures.certs import certificate, write_pem

from dreamframe import errors
from dreamframe.config import ClientSettings, LogSettings, ServerSettings
from dreamframe.logging import configure_logging, get_logger
from dreamframe.serving import (
    GrpcServer,
    Registration,
    ServiceCannotStart,
    domain_error_from,
    error_detail_from,
    make_channel,
)
from dreamframe.v1 import common_pb2, plot_pb2, plot_pb2_grpc, train_pb2, train_pb2_grpc

FIXTURES = Path(__file__).parent / "serving_fixtures"
REPO = Path(__file__).resolve().parents[1]
StatusCode = grpc.StatusCode


# --- fakes ---------------------------------------------------------------------------------------


class FakePlot(plot_pb2_grpc.PlotServiceServicer):
    """GenerateStory as an async generator: 3 progress messages, then the result."""

    async def GenerateStory(self, request, context):  # noqa: N802
        if not request.theme:
            raise errors.InvalidArgument("must not be empty", field="theme")
        for i in range(3):
            yield plot_pb2.GenerateStoryResponse(
                level=1, progress=common_pb2.Progress(unit="llm_calls", done=i + 1, total=3)
            )
            if i == 1 and request.theme == "fail-midway":
                raise errors.FailedPrecondition("must be at most 11", field="options.substories")
            if i == 1 and request.theme == "crash-midway":
                raise KeyError("llm_cache_secret_path")
            if request.theme == "slow":
                await asyncio.sleep(0.2)
        yield plot_pb2.GenerateStoryResponse(
            level=3, result=plot_pb2.GenerateStoryResult(title=request.theme)
        )


class FakeTrain(train_pb2_grpc.TrainServiceServicer):
    """GetRun raises what run_id names; WatchRun streams through context.write; ListRuns is unimplemented."""

    def __init__(self) -> None:
        self.log = get_logger("fake.train")

    async def GetRun(self, request, context):  # noqa: N802
        run_id = request.run_id
        self.log.info("looking up run", run_id=run_id)
        if run_id.startswith("raise:"):
            raise getattr(errors, run_id.removeprefix("raise:"))("no such thing", field="run_id")
        if run_id == "boom":
            raise RuntimeError("connect failed: password=hunter2")
        if run_id.startswith("huge:"):  # a message that echoes a huge bad value, under a huge field path
            raise errors.InvalidArgument(f"{run_id!r} is not a run", field="runs." + "x" * 10_000)
        return train_pb2.GetRunResponse(
            run=train_pb2.RunStatus(run_id=run_id, state=train_pb2.RUN_STATE_RUNNING)
        )

    async def WatchRun(self, request, context):  # noqa: N802
        for step in range(2):
            await context.write(
                train_pb2.WatchRunResponse(run=train_pb2.RunStatus(run_id=request.run_id, step=step))
            )
        if request.run_id == "vanishes":
            raise errors.NotFound("was deleted while watching", field="run_id")


def registrations() -> list[Registration]:
    return [
        Registration.of(plot_pb2, plot_pb2_grpc.add_PlotServiceServicer_to_server, FakePlot()),
        Registration.of(train_pb2, train_pb2_grpc.add_TrainServiceServicer_to_server, FakeTrain()),
    ]


def server_settings(**overrides) -> ServerSettings:
    values = {"host": "127.0.0.1", "port": 0, "metrics_port": -1, "grace_seconds": 2.0, **overrides}
    return ServerSettings(**values)


@contextlib.asynccontextmanager
async def running(settings: ServerSettings | None = None, **kwargs) -> AsyncIterator[GrpcServer]:
    kwargs.setdefault("readiness_interval", 0.05)
    server = GrpcServer(registrations(), settings or server_settings(), service_name="test", **kwargs)
    async with server:
        yield server


@contextlib.asynccontextmanager
async def channel(server: GrpcServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address) as ch:
        yield ch


def run(coro, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def rpc_error(awaitable) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value


async def read_all(call) -> tuple[list, grpc.aio.AioRpcError | None]:
    """Messages of a server stream, and the error that ended it (None when OK)."""
    messages = []
    try:
        # read() rather than async-for: callers may already have read() the first messages.
        while (message := await call.read()) is not grpc.aio.EOF:
            messages.append(message)
    except grpc.aio.AioRpcError as exc:
        return messages, exc
    return messages, None


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging(LogSettings(level="DEBUG", json=True), stream=stream)
    yield stream
    for handler in [h for h in logging.getLogger().handlers if h.get_name() == "dreamframe"]:
        logging.getLogger().removeHandler(handler)
    structlog.reset_defaults()


def log_events(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]


# --- registration, health, reflection ------------------------------------------------------------


def test_registration_takes_the_full_service_name_from_the_descriptor():
    reg = Registration.of(plot_pb2, plot_pb2_grpc.add_PlotServiceServicer_to_server, FakePlot())
    assert reg.service_name == "dreamframe.v1.PlotService"
    with pytest.raises(ValueError, match="TrainService"):
        Registration.of(plot_pb2, train_pb2_grpc.add_TrainServiceServicer_to_server, FakeTrain())


async def wait_for_status(stub, expected: int, service: str = "", timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status
        if status == expected:
            return
        assert time.monotonic() < deadline, f"health stayed {status}, expected {expected}"
        await asyncio.sleep(0.02)


def test_health_follows_the_readiness_check():
    NOT_SERVING, SERVING = health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING
    state = {"ready": False, "raise": False}

    async def readiness() -> bool:
        if state["raise"]:
            raise ConnectionError("storage unreachable")
        return state["ready"]

    async def body():
        async with running(readiness=readiness) as server, channel(server) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "dreamframe.v1.PlotService", "dreamframe.v1.TrainService"):
                response = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert response.status == NOT_SERVING, service
            # The service works while not ready; health is what load balancers and probes consult.
            await train_pb2_grpc.TrainServiceStub(ch).GetRun(train_pb2.GetRunRequest(run_id="r"))

            state["ready"] = True
            await wait_for_status(health, SERVING)
            await wait_for_status(health, SERVING, "dreamframe.v1.PlotService")
            assert server.metrics.registry.get_sample_value("dreamframe_ready") == 1

            state["ready"] = False  # re-checked periodically, e.g. storage went away
            await wait_for_status(health, NOT_SERVING)
            state["ready"], state["raise"] = True, True  # a failing check counts as not ready
            await asyncio.sleep(0.2)
            assert (await health.Check(health_pb2.HealthCheckRequest())).status == NOT_SERVING
            state["raise"] = False
            await wait_for_status(health, SERVING)

            error = await rpc_error(health.Check(health_pb2.HealthCheckRequest(service="no.such.Service")))
            assert error.code() == StatusCode.NOT_FOUND

            # Shutdown: a watcher sees NOT_SERVING and its stream ends instead of holding the grace period.
            watch = health.Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == SERVING
            started = time.monotonic()
            stopping = asyncio.create_task(server.stop(grace=5.0))
            assert (await watch.read()).status == NOT_SERVING
            assert await watch.read() is grpc.aio.EOF
            assert await watch.code() == StatusCode.OK
            await stopping
            assert time.monotonic() - started < 2.0

    run(body())


def test_health_is_serving_at_once_without_a_readiness_check():
    async def body():
        async with running() as server, channel(server) as ch:
            response = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert response.status == health_pb2.HealthCheckResponse.SERVING

    run(body())


def test_reflection_lists_and_describes_the_services():
    async def body():
        async with running() as server, channel(server) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            requests = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(file_containing_symbol="dreamframe.v1.PlotService"),
            ]
            responses = [r async for r in stub.ServerReflectionInfo(iter(requests))]
            names = {s.name for s in responses[0].list_services_response.service}
            assert names == {
                "dreamframe.v1.PlotService",
                "dreamframe.v1.TrainService",
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
            }
            files = responses[1].file_descriptor_response.file_descriptor_proto
            assert files, responses[1]
            names = [descriptor_pb2.FileDescriptorProto.FromString(f).name for f in files]
            assert "dreamframe/v1/plot.proto" in names

    run(body())


# --- auth ----------------------------------------------------------------------------------------


def test_bearer_token_auth_guards_services_but_not_health_or_reflection():
    async def body():
        settings = server_settings(auth_tokens=["s3cret", "second-token"])
        async with running(settings) as server, channel(server) as ch:
            train = train_pb2_grpc.TrainServiceStub(ch)
            plot = plot_pb2_grpc.PlotServiceStub(ch)
            request = train_pb2.GetRunRequest(run_id="r1")

            for metadata in [None, (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)]:
                error = await rpc_error(train.GetRun(request, metadata=metadata))
                assert error.code() == StatusCode.UNAUTHENTICATED, metadata
                assert "s3cret" not in (error.details() or "")
                assert error_detail_from(error).field == "authorization"
            _, error = await read_all(plot.GenerateStory(plot_pb2.GenerateStoryRequest(theme="x")))
            assert error is not None and error.code() == StatusCode.UNAUTHENTICATED

            ok = await train.GetRun(request, metadata=(("authorization", "Bearer s3cret"),))
            assert ok.run.run_id == "r1"
            ok = await train.GetRun(request, metadata=(("authorization", "bearer second-token"),))
            assert ok.run.run_id == "r1"
            messages, error = await read_all(
                plot.GenerateStory(
                    plot_pb2.GenerateStoryRequest(theme="x"), metadata=(("authorization", "Bearer s3cret"),)
                )
            )
            assert error is None and len(messages) == 4

            # Kubernetes probes and grpcurl-style discovery need no token.
            health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            reflect = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            assert [r async for r in reflect][0].list_services_response.service

            rejected = server.metrics.registry.get_sample_value(
                "grpc_server_handled_total",
                {
                    "grpc_service": "dreamframe.v1.TrainService",
                    "grpc_method": "GetRun",
                    "grpc_type": "unary",
                    "grpc_code": "UNAUTHENTICATED",
                },
            )
            assert rejected == 3

    run(body())


# --- error mapping -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error_name", "code"),
    [
        ("InvalidArgument", StatusCode.INVALID_ARGUMENT),
        ("NotFound", StatusCode.NOT_FOUND),
        ("AlreadyExists", StatusCode.ALREADY_EXISTS),
        ("FailedPrecondition", StatusCode.FAILED_PRECONDITION),
        ("Unavailable", StatusCode.UNAVAILABLE),
        ("ResourceExhausted", StatusCode.RESOURCE_EXHAUSTED),
        ("Cancelled", StatusCode.CANCELLED),
    ],
)
def test_domain_errors_map_to_status_codes_with_the_field_named(error_name, code):
    async def body():
        async with running() as server, channel(server) as ch:
            train = train_pb2_grpc.TrainServiceStub(ch)
            error = await rpc_error(train.GetRun(train_pb2.GetRunRequest(run_id=f"raise:{error_name}")))
            assert error.code() == code
            assert error.details() == "run_id: no such thing"
            detail = error_detail_from(error)
            assert (detail.reason, detail.field, detail.description) == (code.name, "run_id", "no such thing")
            rebuilt = domain_error_from(error)
            assert type(rebuilt) is getattr(errors, error_name)
            assert (rebuilt.field, rebuilt.message) == ("run_id", "no such thing")

    run(body())


def test_an_exception_is_described_by_its_type_and_its_message_if_it_has_one():
    assert errors.described(ValueError("steps: must be positive")) == "ValueError: steps: must be positive"
    assert errors.described(AssertionError()) == "AssertionError"  # a bare assert says nothing alone
    assert errors.described(KeyError("frames")) == "KeyError: 'frames'"


def test_errors_are_a_standard_google_rpc_status_any_grpc_client_reads():
    """No DreamFrame helpers: a plain channel, grpcio-status and the google.rpc protos find the field."""

    def detail(status, message_type):
        (packed,) = [d for d in status.details if d.Is(message_type.DESCRIPTOR)]
        message = message_type()
        packed.Unpack(message)
        return message

    def get_run_with_a_sync_stub(address: str) -> grpc.RpcError:
        with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as info:
            request = train_pb2.GetRunRequest(run_id="raise:InvalidArgument")
            train_pb2_grpc.TrainServiceStub(ch).GetRun(request, timeout=5)
        return info.value

    async def body():
        async with running() as server:
            error = await asyncio.to_thread(get_run_with_a_sync_stub, server.address)
            status = rpc_status.from_call(error)
            assert status.code == StatusCode.INVALID_ARGUMENT.value[0]
            assert status.message == "run_id: no such thing"
            (violation,) = detail(status, error_details_pb2.BadRequest).field_violations
            assert (violation.field, violation.description) == ("run_id", "no such thing")
            info = detail(status, error_details_pb2.ErrorInfo)
            assert (info.reason, info.domain) == ("INVALID_ARGUMENT", "dreamframe.v1")

            async with grpc.aio.insecure_channel(server.address) as ch:
                call = plot_pb2_grpc.PlotServiceStub(ch).GenerateStory(plot_pb2.GenerateStoryRequest())
                with pytest.raises(grpc.aio.AioRpcError):
                    await call.read()
                status = await rpc_status.aio.from_call(call)
                (violation,) = detail(status, error_details_pb2.BadRequest).field_violations
                assert (violation.field, violation.description) == ("theme", "must not be empty")

    run(body())


def test_statuses_are_capped_so_a_huge_bad_value_stays_a_short_invalid_argument():
    async def body():
        async with running() as server, channel(server) as ch:
            train = train_pb2_grpc.TrainServiceStub(ch)
            error = await rpc_error(train.GetRun(train_pb2.GetRunRequest(run_id="huge:" + "v" * 100_000)))
            # Uncapped, the trailers pass gRPC's 8 KiB metadata limit: RESOURCE_EXHAUSTED, status lost.
            assert error.code() == StatusCode.INVALID_ARGUMENT
            assert len(error.details()) <= 300 and error.details().endswith("…")
            detail = error_detail_from(error)
            assert len(detail.field) <= 120 and detail.field.startswith("runs.xxx")
            assert len(detail.description) <= 300 and detail.description.startswith("'huge:vvv")
            trailers = sum(len(k) + len(v) for k, v in error.trailing_metadata())
            assert trailers + len(error.details().encode()) < 2048

    run(body())


def test_undecodable_request_bytes_are_invalid_argument_for_unary_and_streaming_methods(json_logs):
    """grpc.aio parses requests before any interceptor's code runs; without the guard this is UNKNOWN."""

    async def body():
        async with running() as server, channel(server) as ch:
            garbage = b"\x0a\xff\xff\xff\xff\x0f"  # a length that runs past the end
            unary = ch.unary_unary("/dreamframe.v1.TrainService/GetRun")
            error = await rpc_error(unary(garbage))
            assert error.code() == StatusCode.INVALID_ARGUMENT
            assert "do not parse" in error_detail_from(error).description
            # An async-generator stream and a stream the handler writes with context.write.
            for method in (
                "/dreamframe.v1.PlotService/GenerateStory",
                "/dreamframe.v1.TrainService/WatchRun",
            ):
                messages, error = await read_all(ch.unary_stream(method)(garbage))
                assert messages == [] and error.code() == StatusCode.INVALID_ARGUMENT, method
            # The same methods still work.
            train = train_pb2_grpc.TrainServiceStub(ch)
            assert (await train.GetRun(train_pb2.GetRunRequest(run_id="r"))).run.run_id == "r"
            messages, error = await read_all(train.WatchRun(train_pb2.WatchRunRequest(run_id="w")))
            assert error is None and [m.run.step for m in messages] == [0, 1]

    run(body())
    codes = [e["code"] for e in log_events(json_logs) if e.get("event") == "rpc finished"]
    assert codes.count("INVALID_ARGUMENT") == 3  # logged and counted like any refusal


def test_invalid_argument_in_a_stream_before_any_message():
    async def body():
        async with running() as server, channel(server) as ch:
            plot = plot_pb2_grpc.PlotServiceStub(ch)
            messages, error = await read_all(plot.GenerateStory(plot_pb2.GenerateStoryRequest(theme="")))
            assert messages == []
            assert error.code() == StatusCode.INVALID_ARGUMENT
            assert error.details() == "theme: must not be empty"
            assert error_detail_from(error).field == "theme"

    run(body())


def test_errors_raised_after_part_of_a_stream_was_sent():
    async def body():
        async with running() as server, channel(server) as ch:
            plot = plot_pb2_grpc.PlotServiceStub(ch)
            messages, error = await read_all(
                plot.GenerateStory(plot_pb2.GenerateStoryRequest(theme="fail-midway"))
            )
            assert [m.progress.done for m in messages] == [1, 2]
            assert error.code() == StatusCode.FAILED_PRECONDITION
            assert error.details() == "options.substories: must be at most 11"
            detail = error_detail_from(error)
            assert (detail.reason, detail.field) == ("FAILED_PRECONDITION", "options.substories")

            # The same for a handler that writes through context.write instead of yielding.
            train = train_pb2_grpc.TrainServiceStub(ch)
            messages, error = await read_all(train.WatchRun(train_pb2.WatchRunRequest(run_id="vanishes")))
            assert [m.run.step for m in messages] == [0, 1]
            assert error.code() == StatusCode.NOT_FOUND
            assert error_detail_from(error).field == "run_id"
            messages, error = await read_all(train.WatchRun(train_pb2.WatchRunRequest(run_id="stays")))
            assert error is None and len(messages) == 2

    run(body())


def test_unexpected_exceptions_are_internal_and_leak_nothing(json_logs):
    async def body():
        async with running() as server, channel(server) as ch:
            train = train_pb2_grpc.TrainServiceStub(ch)
            error = await rpc_error(train.GetRun(train_pb2.GetRunRequest(run_id="boom")))
            assert error.code() == StatusCode.INTERNAL
            for secret in ("hunter2", "RuntimeError", "Traceback", "password"):
                assert secret not in error.details()
            assert error_detail_from(error).reason == "INTERNAL"

            plot = plot_pb2_grpc.PlotServiceStub(ch)
            messages, stream_error = await read_all(
                plot.GenerateStory(plot_pb2.GenerateStoryRequest(theme="crash-midway"))
            )
            assert len(messages) == 2 and stream_error.code() == StatusCode.INTERNAL
            assert "llm_cache_secret_path" not in stream_error.details()
            return error.details()

    details = run(body())
    crashes = [e for e in log_events(json_logs) if e["event"] == "unhandled exception"]
    assert len(crashes) == 2
    # The caller's message carries the id of the log line that has the traceback.
    assert crashes[0]["error_id"] in details
    assert "hunter2" in crashes[0]["exception"] and "RuntimeError" in crashes[0]["exception"]


def test_unimplemented_methods_answer_unimplemented_not_internal():
    async def body():
        async with running() as server, channel(server) as ch:
            error = await rpc_error(train_pb2_grpc.TrainServiceStub(ch).ListRuns(train_pb2.ListRunsRequest()))
            assert error.code() == StatusCode.UNIMPLEMENTED

    run(body())


def test_oversized_requests_are_rejected_with_resource_exhausted():
    async def body():
        async with running(server_settings(max_message_bytes=64 * 1024)) as server, channel(server) as ch:
            plot = plot_pb2_grpc.PlotServiceStub(ch)
            _, error = await read_all(plot.GenerateStory(plot_pb2.GenerateStoryRequest(theme="x" * 100_000)))
            assert error is not None and error.code() == StatusCode.RESOURCE_EXHAUSTED
            messages, error = await read_all(
                plot.GenerateStory(plot_pb2.GenerateStoryRequest(theme="x" * 60_000))
            )
            assert error is None and len(messages) == 4

    run(body())


# --- observability -------------------------------------------------------------------------------


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def labels(
    method: str, service: str = "dreamframe.v1.TrainService", kind: str = "unary", **extra
) -> frozenset:
    return frozenset({"grpc_service": service, "grpc_method": method, "grpc_type": kind, **extra}.items())


def test_metrics_are_served_over_http_per_server():
    async def body():
        settings = server_settings(metrics_port=0)
        async with running(settings) as server, running(settings) as other, channel(server) as ch:
            assert server.metrics_port and other.metrics_port and server.metrics_port != other.metrics_port
            train = train_pb2_grpc.TrainServiceStub(ch)
            for run_id in ("a", "b", "raise:NotFound"):
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await train.GetRun(train_pb2.GetRunRequest(run_id=run_id))
            plot = plot_pb2_grpc.PlotServiceStub(ch)
            await read_all(plot.GenerateStory(plot_pb2.GenerateStoryRequest(theme="t")))

            samples = await asyncio.to_thread(scrape, server.metrics_port)
            handled = "grpc_server_handled_total"
            assert samples[(handled, labels("GetRun", grpc_code="OK"))] == 2
            assert samples[(handled, labels("GetRun", grpc_code="NOT_FOUND"))] == 1
            story = labels("GenerateStory", "dreamframe.v1.PlotService", "server_stream")
            assert samples[(handled, story | {("grpc_code", "OK")})] == 1
            assert samples[("grpc_server_msg_sent_total", story)] == 4
            assert samples[("grpc_server_handling_seconds_count", labels("GetRun"))] == 3
            assert samples[("grpc_server_in_flight", labels("GetRun"))] == 0
            assert samples[("dreamframe_ready", frozenset())] == 1

            # The other server in this process has its own registry: none of those calls.
            other_samples = await asyncio.to_thread(scrape, other.metrics_port)
            assert (handled, labels("GetRun", grpc_code="OK")) not in other_samples

        async with running(server_settings(metrics_port=-1)) as quiet:
            assert quiet.metrics_port is None

    run(body())


def test_one_access_log_line_per_rpc(json_logs):
    async def body():
        async with running() as server, channel(server) as ch:
            train = train_pb2_grpc.TrainServiceStub(ch)
            await rpc_error(train.GetRun(train_pb2.GetRunRequest(run_id="raise:NotFound")))

    run(body())
    events = log_events(json_logs)
    finished = [e for e in events if e["event"] == "rpc finished" and e["method"].endswith("/GetRun")]
    assert len(finished) == 1
    line = finished[0]
    assert line["method"] == "/dreamframe.v1.TrainService/GetRun"
    assert line["code"] == "NOT_FOUND"
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    assert line["peer"].startswith("ipv4:127.0.0.1:")
    assert (line["caller"], line["team"], line["role"]) == ("anonymous",) * 3  # auth off: no caller
    assert line["level"] == "info" and "timestamp" in line
    # The handler's own log lines carry the RPC they belong to.
    (lookup,) = [e for e in events if e["event"] == "looking up run"]
    assert lookup["rpc"] == "/dreamframe.v1.TrainService/GetRun"


# --- TLS -----------------------------------------------------------------------------------------


def _write_pair(directory: Path, stem: str, cert: x509.Certificate, key) -> tuple[Path, Path]:
    cert_file, key_file = directory / f"{stem}.crt", directory / f"{stem}.key"
    write_pem(cert_file, cert, key, key_file)
    return cert_file, key_file


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and an unrelated CA."""
    directory = tmp_path_factory.mktemp("pki")
    files: dict[str, Path] = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("dreamframe test CA", ca_key, "dreamframe test CA", ca_key, ca=True)
    files["ca"], _ = _write_pair(directory, "ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = certificate("localhost", server_key, "dreamframe test CA", ca_key, ca=False, san=san)
    files["server_cert"], files["server_key"] = _write_pair(directory, "server", server, server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = certificate("coordinator", client_key, "dreamframe test CA", ca_key, ca=False)
    files["client_cert"], files["client_key"] = _write_pair(directory, "client", client, client_key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = certificate("someone else", other_key, "someone else", other_key, ca=True)
    files["other_ca"], _ = _write_pair(directory, "other", other, other_key)
    return files


async def _get_run(ch: grpc.aio.Channel) -> train_pb2.GetRunResponse:
    return await train_pb2_grpc.TrainServiceStub(ch).GetRun(train_pb2.GetRunRequest(run_id="tls"), timeout=3)


def test_tls_server_and_client(pki):
    async def body():
        settings = server_settings(tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"])
        async with running(settings) as server:
            client = ClientSettings(tls_ca_file=pki["ca"], max_attempts=1)
            async with make_channel(server.address, client) as ch:
                assert (await _get_run(ch)).run.run_id == "tls"
            # Plaintext to a TLS port, or a server certificate from the wrong CA: no connection.
            async with grpc.aio.insecure_channel(server.address) as ch:
                assert (await rpc_error(_get_run(ch))).code() == StatusCode.UNAVAILABLE
            wrong_ca = ClientSettings(tls_ca_file=pki["other_ca"], max_attempts=1)
            async with make_channel(server.address, wrong_ca) as ch:
                assert (await rpc_error(_get_run(ch))).code() == StatusCode.UNAVAILABLE

    run(body())


def test_mutual_tls_requires_a_client_certificate(pki):
    async def body():
        settings = server_settings(
            tls_cert_file=pki["server_cert"], tls_key_file=pki["server_key"], tls_client_ca_file=pki["ca"]
        )
        async with running(settings) as server:
            client = ClientSettings(tls_ca_file=pki["ca"], max_attempts=1)
            async with make_channel(server.address, client) as ch:
                assert (await rpc_error(_get_run(ch))).code() == StatusCode.UNAVAILABLE
            async with make_channel(
                server.address,
                client,
                certificate_chain=pki["client_cert"].read_bytes(),
                private_key=pki["client_key"].read_bytes(),
            ) as ch:
                assert (await _get_run(ch)).run.run_id == "tls"

    run(body())


def test_half_configured_tls_is_refused_at_start(pki):
    async def body():
        with pytest.raises(ValueError, match="tls_key_file"):
            async with running(server_settings(tls_cert_file=pki["server_cert"])):
                pass

    run(body())


def test_a_port_in_use_fails_the_second_server_cleanly():
    async def body():
        async with running() as first:
            second = GrpcServer(registrations(), server_settings(port=first.port), service_name="second")
            with pytest.raises(RuntimeError):
                await second.start()
            async with channel(first) as ch:  # the first one is untouched
                response = await train_pb2_grpc.TrainServiceStub(ch).GetRun(
                    train_pb2.GetRunRequest(run_id="x")
                )
                assert response.run.run_id == "x"

    run(body())


def test_configure_logging_console_and_bad_level():
    stream = io.StringIO()
    try:
        configure_logging(LogSettings(level="warning"), stream=stream)
        get_logger("t").info("hidden")
        get_logger("t").warning("shown", job="j1")
        logging.getLogger("some.library").warning("stdlib too")
        text = stream.getvalue()
        assert "hidden" not in text and "shown" in text and "job=j1" in text and "stdlib too" in text
        assert not text.lstrip().startswith("{")
        with pytest.raises(ValueError, match="log.level"):
            configure_logging(LogSettings(level="LOUD"))
    finally:
        for handler in [h for h in logging.getLogger().handlers if h.get_name() == "dreamframe"]:
            logging.getLogger().removeHandler(handler)
        structlog.reset_defaults()


# --- shutdown ------------------------------------------------------------------------------------


def test_stop_lets_in_flight_rpcs_finish_refuses_new_ones_and_runs_hooks():
    hooks: list[str] = []

    async def body():
        async def checkpoint() -> None:
            hooks.append("checkpoint")

        async with running(shutdown_hooks=[checkpoint]) as server, channel(server) as ch:
            plot = plot_pb2_grpc.PlotServiceStub(ch)
            call = plot.GenerateStory(plot_pb2.GenerateStoryRequest(theme="slow"))
            first = await call.read()
            stopping = asyncio.create_task(server.stop(grace=5.0))
            await asyncio.sleep(0.05)
            train = train_pb2_grpc.TrainServiceStub(ch)
            error = await rpc_error(train.GetRun(train_pb2.GetRunRequest(run_id="late"), timeout=2))
            assert error.code() == StatusCode.UNAVAILABLE
            assert hooks == ["checkpoint"]
            rest = []
            while (message := await call.read()) is not grpc.aio.EOF:
                rest.append(message)
            assert [first, *rest][-1].result.title == "slow" and len(rest) == 3
            assert await call.code() == StatusCode.OK
            await stopping

    run(body())


def test_in_flight_rpcs_are_cancelled_when_the_grace_period_ends():
    async def body():
        async with running() as server, channel(server) as ch:
            plot = plot_pb2_grpc.PlotServiceStub(ch)
            call = plot.GenerateStory(plot_pb2.GenerateStoryRequest(theme="slow"))
            await call.read()
            started = time.monotonic()
            await server.stop(grace=0.1)
            assert time.monotonic() - started < 1.0
            messages, error = await read_all(call)
            assert error is not None and len(messages) < 3

    run(body())


def _start_fixture_server(tmp_path: Path, grace: float, messages: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(FIXTURES / "slow_plot_server.py"),
            f"--grace={grace}",
            f"--messages={messages}",
            "--interval=0.2",
            f"--marker={tmp_path / 'hook-ran'}",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if line.startswith("{") and json.loads(line)["event"] == "server started":
            return proc, json.loads(line)["address"]
    proc.wait(timeout=5)
    raise AssertionError(f"fixture server exited with {proc.returncode} before starting")


@pytest.mark.slow
def test_sigterm_drains_in_flight_rpcs_and_exits_zero(tmp_path):
    grace = 5.0
    proc, address = _start_fixture_server(tmp_path, grace=grace, messages=6)
    try:

        async def body():
            async with grpc.aio.insecure_channel(address) as ch:
                health = health_pb2_grpc.HealthStub(ch)
                await wait_for_status(health, health_pb2.HealthCheckResponse.SERVING)
                watch = health.Watch(health_pb2.HealthCheckRequest())
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
                call = plot_pb2_grpc.PlotServiceStub(ch).GenerateStory(
                    plot_pb2.GenerateStoryRequest(theme="t")
                )
                first = await call.read()
                assert first.progress.done == 1

                proc.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
                assert await watch.read() is grpc.aio.EOF

                # New RPCs are refused (on a fresh connection and on the existing one).
                async with grpc.aio.insecure_channel(address) as fresh:
                    error = await rpc_error(
                        health_pb2_grpc.HealthStub(fresh).Check(health_pb2.HealthCheckRequest())
                    )
                    assert error.code() == StatusCode.UNAVAILABLE
                error = await rpc_error(health.Check(health_pb2.HealthCheckRequest(), timeout=2))
                assert error.code() == StatusCode.UNAVAILABLE

                rest, error = await read_all(call)
                assert error is None, error
                assert [m.progress.done for m in [first, *rest]] == [1, 2, 3, 4, 5, 6]
                return signalled

        signalled = run(body())
        returncode = proc.wait(timeout=grace)
        assert returncode == 0
        assert time.monotonic() - signalled < grace
        assert (tmp_path / "hook-ran").read_text() == "checkpointed\n"
        events = [
            json.loads(line)["event"] for line in proc.stdout.read().splitlines() if line.startswith("{")
        ]
        assert "stop requested" in events and events[-1] == "server stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("grace", "signals"),
    [(0.5, [signal.SIGINT]), (30.0, [signal.SIGTERM, signal.SIGTERM])],
    ids=["grace-period-ends", "second-signal"],
)
def test_work_still_running_is_cancelled_when_the_grace_period_ends_or_on_a_second_signal(
    tmp_path, grace, signals
):
    proc, address = _start_fixture_server(tmp_path, grace=grace, messages=50)
    try:

        async def body():
            async with grpc.aio.insecure_channel(address) as ch:
                await wait_for_status(health_pb2_grpc.HealthStub(ch), health_pb2.HealthCheckResponse.SERVING)
                call = plot_pb2_grpc.PlotServiceStub(ch).GenerateStory(
                    plot_pb2.GenerateStoryRequest(theme="t")
                )
                await call.read()
                signalled = time.monotonic()
                for sig in signals:
                    proc.send_signal(sig)
                    await asyncio.sleep(0.2)
                messages, error = await read_all(call)
                assert error is not None and error.code() in (StatusCode.CANCELLED, StatusCode.UNAVAILABLE)
                assert len(messages) < 10
                return signalled

        signalled = run(body())
        assert proc.wait(timeout=5) == 0
        assert time.monotonic() - signalled < 2.5
        assert (tmp_path / "hook-ran").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_a_readiness_check_that_cannot_succeed_stops_the_service():
    """A package missing from the image fails the check the same way forever: the service stops and
    `run_forever` raises, so the process exits non-zero instead of answering NOT_SERVING until a
    start-up timeout (`dreamframe up` waited 15 minutes on such a plot-llm)."""
    calls = {"n": 0}

    async def readiness() -> bool:
        calls["n"] += 1
        import dreamframe_no_such_module  # noqa: F401

        return True

    async def body():
        server = GrpcServer(registrations(), server_settings(), service_name="test", readiness=readiness)
        started = time.monotonic()
        with pytest.raises(ServiceCannotStart, match="dreamframe_no_such_module"):
            await server.run_forever(handle_signals=False)
        assert time.monotonic() - started < 5.0
        assert calls["n"] == 1

    run(body())
