"""Keepalive pings during a long quiet call (a style training is one unary call of minutes, with no data
either way until it ends): the server's ping policy must accept the clients' keepalive, or gRPC closes the
connection with GOAWAY "too_many_pings" after two strikes and the call fails UNAVAILABLE. Scaled down:
pings every second (gRPC sends none closer) against a 0.5 s server minimum (accepted) and against the
default 30 s (refused: the third strike comes about 7 s in), over a call quiet for 9 s."""

import asyncio

import grpc
import pytest

from dreamframe.config import ClientSettings, ServerSettings
from dreamframe.serving.client import make_channel
from dreamframe.serving.server import server_options

METHOD = "/keepalive.Test/Quiet"
QUIET_SECONDS = 9.0


async def call_quiet_rpc(server_settings: ServerSettings, client_settings: ClientSettings) -> bytes:
    async def quiet(request: bytes, context) -> bytes:
        await asyncio.sleep(QUIET_SECONDS)
        return b"done"

    handler = grpc.method_handlers_generic_handler(
        "keepalive.Test", {"Quiet": grpc.unary_unary_rpc_method_handler(quiet)}
    )
    server = grpc.aio.server(options=server_options(server_settings))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with make_channel(f"127.0.0.1:{port}", client_settings) as channel:
            return await channel.unary_unary(METHOD)(b"", timeout=30, wait_for_ready=True)
    finally:
        await server.stop(0)


def test_a_long_quiet_call_survives_keepalive_pings_the_server_allows():
    server = ServerSettings(min_ping_interval_seconds=0.5, max_connection_age_seconds=0)
    client = ClientSettings(keepalive_seconds=1.0, max_attempts=1)
    assert asyncio.run(call_quiet_rpc(server, client)) == b"done"


def test_pings_closer_than_the_server_allows_end_the_call():
    # The control: the same pings against the default minimum (30 s) are refused, so the test above
    # passes because server_options really sets the policy (a misspelt channel argument is ignored).
    server = ServerSettings(max_connection_age_seconds=0)
    client = ClientSettings(keepalive_seconds=1.0, max_attempts=1)
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        asyncio.run(call_quiet_rpc(server, client))
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "ping" in (failure.value.details() or "").lower()


def test_the_defaults_let_a_client_ping_as_often_as_it_does():
    assert ServerSettings().min_ping_interval_seconds <= ClientSettings().keepalive_seconds
