"""dreamframe.serving.client: retries, default deadlines, token, round robin, the sync twin.

Real servers (dreamframe.serving.GrpcServer on 127.0.0.1, port 0) and real channels throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest

from dreamframe import errors
from dreamframe.config import ClientSettings, ServerSettings
from dreamframe.serving import GrpcServer, Registration, error_detail_from, make_channel, make_sync_channel
from dreamframe.serving.client import service_config
from dreamframe.v1 import train_pb2, train_pb2_grpc

StatusCode = grpc.StatusCode


class FlakyTrain(train_pb2_grpc.TrainServiceServicer):
    """StartRun fails UNAVAILABLE ``failures`` times per run id, then succeeds; counts every attempt."""

    def __init__(self, name: str = "server", failures: int = 2) -> None:
        self.name = name
        self.failures = failures
        self.attempts: Counter[str] = Counter()
        self.metadata: list[dict[str, str]] = []

    async def StartRun(self, request, context):  # noqa: N802
        self.attempts[request.run_id] += 1
        self.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
        if request.run_id == "bad":
            raise errors.InvalidArgument("must be lower-case", field="run_id")
        if self.attempts[request.run_id] <= self.failures:
            raise errors.Unavailable("model still loading")
        return train_pb2.StartRunResponse(run_id=f"{request.run_id}@{self.name}")

    async def GetRun(self, request, context):  # noqa: N802
        await asyncio.sleep(5)
        return train_pb2.GetRunResponse()

    async def WatchRun(self, request, context):  # noqa: N802
        step = 0
        while True:
            yield train_pb2.WatchRunResponse(run=train_pb2.RunStatus(run_id=request.run_id, step=step))
            step += 1
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(servicer: FlakyTrain, **settings) -> AsyncIterator[GrpcServer]:
    server_settings = ServerSettings(host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=1.0, **settings)
    registration = Registration.of(train_pb2, train_pb2_grpc.add_TrainServiceServicer_to_server, servicer)
    async with GrpcServer([registration], server_settings, service_name="test") as server:
        yield server


def run(coro, timeout: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def rpc_error(awaitable) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value


def test_service_config_retries_unavailable_and_balances_round_robin():
    config = json.loads(service_config(ClientSettings(max_attempts=4)))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["name"] == [{}]  # every method
    assert method["retryPolicy"]["maxAttempts"] == 4
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    # One attempt means no retry policy at all (gRPC rejects maxAttempts < 2).
    assert "retryPolicy" not in json.loads(service_config(ClientSettings(max_attempts=1)))["methodConfig"][0]


@pytest.mark.parametrize(
    ("max_attempts", "succeeds", "attempts"), [(3, True, 3), (2, False, 2), (1, False, 1)]
)
def test_unavailable_is_retried_up_to_max_attempts(max_attempts, succeeds, attempts):
    async def body():
        servicer = FlakyTrain(failures=2)
        async with running(servicer) as server:
            async with make_channel(server.address, ClientSettings(max_attempts=max_attempts)) as ch:
                call = train_pb2_grpc.TrainServiceStub(ch).StartRun(train_pb2.StartRunRequest(run_id="r"))
                if succeeds:
                    assert (await call).run_id == "r@server"
                else:
                    assert (await rpc_error(call)).code() == StatusCode.UNAVAILABLE
                # Other codes are not retried.
                error = await rpc_error(
                    train_pb2_grpc.TrainServiceStub(ch).StartRun(train_pb2.StartRunRequest(run_id="bad"))
                )
                assert error.code() == StatusCode.INVALID_ARGUMENT
                assert error_detail_from(error).field == "run_id"
        assert servicer.attempts == {"r": attempts, "bad": 1}

    run(body())


def test_default_deadline_applies_when_the_caller_gives_none():
    async def body():
        async with running(FlakyTrain()) as server:
            settings = ClientSettings(deadline_seconds=0.5, stream_deadline_seconds=1.0)
            async with make_channel(server.address, settings) as ch:
                train = train_pb2_grpc.TrainServiceStub(ch)
                started = time.monotonic()
                error = await rpc_error(train.GetRun(train_pb2.GetRunRequest(run_id="slow")))
                assert error.code() == StatusCode.DEADLINE_EXCEEDED
                assert 0.4 < time.monotonic() - started < 2.0

                # The caller's own timeout wins.
                started = time.monotonic()
                error = await rpc_error(train.GetRun(train_pb2.GetRunRequest(run_id="slow"), timeout=0.1))
                assert error.code() == StatusCode.DEADLINE_EXCEEDED
                assert time.monotonic() - started < 0.45

                # Streams get the (longer) stream deadline, not the unary one.
                started = time.monotonic()
                steps = []
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for response in train.WatchRun(train_pb2.WatchRunRequest(run_id="w")):
                        steps.append(response.run.step)
                assert info.value.code() == StatusCode.DEADLINE_EXCEEDED
                assert 0.9 < time.monotonic() - started < 2.5
                assert len(steps) > 10  # it ran well past the 0.5 s unary deadline

    run(body())


def test_token_is_sent_as_bearer_metadata():
    async def body():
        servicer = FlakyTrain(failures=0)
        async with running(servicer, auth_tokens=["tok-123"]) as server:
            async with make_channel(server.address, ClientSettings(token="tok-123")) as ch:
                train = train_pb2_grpc.TrainServiceStub(ch)
                assert (await train.StartRun(train_pb2.StartRunRequest(run_id="a"))).run_id == "a@server"
                # Metadata the caller passes is kept alongside the token.
                await train.StartRun(
                    train_pb2.StartRunRequest(run_id="b"), metadata=(("x-request-id", "42"),)
                )
                assert servicer.metadata[-1]["x-request-id"] == "42"
                assert servicer.metadata[-1]["authorization"] == "Bearer tok-123"
                # A caller's own authorization header is not overridden.
                error = await rpc_error(
                    train.StartRun(
                        train_pb2.StartRunRequest(run_id="c"), metadata=(("authorization", "Bearer x"),)
                    )
                )
                assert error.code() == StatusCode.UNAUTHENTICATED
            async with make_channel(server.address, ClientSettings()) as ch:
                error = await rpc_error(
                    train_pb2_grpc.TrainServiceStub(ch).StartRun(train_pb2.StartRunRequest())
                )
                assert error.code() == StatusCode.UNAUTHENTICATED

    run(body())


@pytest.mark.parametrize(("policy", "both_used"), [("round_robin", True), ("pick_first", False)])
def test_calls_are_balanced_over_replicas(policy, both_used):
    async def body():
        one, two = FlakyTrain("one", failures=0), FlakyTrain("two", failures=0)
        async with running(one) as a, running(two) as b:
            target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
            async with make_channel(target, ClientSettings(), load_balancing=policy) as ch:
                train = train_pb2_grpc.TrainServiceStub(ch)
                answers = [
                    (await train.StartRun(train_pb2.StartRunRequest(run_id=str(i)))).run_id.split("@")[1]
                    for i in range(10)
                ]
        served = Counter(answers)
        if both_used:
            assert served["one"] >= 3 and served["two"] >= 3, served
        else:
            assert len(served) == 1, served

    run(body())


def test_sync_channel_has_the_same_defaults():
    async def body():
        servicer = FlakyTrain(failures=1)
        async with running(servicer, auth_tokens=["tok"]) as server:
            settings = ClientSettings(token="tok", deadline_seconds=0.3, max_attempts=2)
            with make_sync_channel(server.address, settings) as ch:
                train = train_pb2_grpc.TrainServiceStub(ch)
                # Blocking calls run in a thread: the server lives on this event loop.
                response = await asyncio.to_thread(train.StartRun, train_pb2.StartRunRequest(run_id="s"))
                assert response.run_id == "s@server" and servicer.attempts["s"] == 2
                with pytest.raises(grpc.RpcError) as info:
                    await asyncio.to_thread(train.GetRun, train_pb2.GetRunRequest(run_id="slow"))
                assert info.value.code() == StatusCode.DEADLINE_EXCEEDED
                with pytest.raises(grpc.RpcError) as info:
                    await asyncio.to_thread(train.StartRun, train_pb2.StartRunRequest(run_id="bad"))
                assert error_detail_from(info.value).field == "run_id"

    run(body())
