"""TLS and mutual TLS as the chart sets them up (issue 19): real gRPC servers on 127.0.0.1, certificates
generated here the way the chart's are (one certificate naming every Service, no IP address in it).

The services' and clients' TLS settings are taken from the rendered chart's environment variables, so
the chart and the settings they name cannot drift apart.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dreamframe.config import ClientSettings, ServerSettings, settings_class
from dreamframe.serving import GrpcServer, make_channel
from dreamframe.serving.health import LIVENESS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving_fixtures.certs import certificate, write_pem  # noqa: E402
from test_chart import by_kind, render  # noqa: E402

NAMESPACE = "dreamframe"
RENDERER = f"dreamframe-keyframe-renderer.{NAMESPACE}.svc.cluster.local"
COORDINATOR = f"dreamframe-coordinator.{NAMESPACE}.svc.cluster.local"
SERVING = health_pb2.HealthCheckResponse.SERVING


def release_pki(directory: Path, cn: str = "dreamframe CA") -> Path:
    """What the chart's TLS Secret holds, as mounted at /etc/dreamframe/tls: tls.crt/tls.key (every
    Service's DNS names, server and client auth) and ca.crt."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate(cn, ca_key, cn, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(d) for d in (COORDINATOR, RENDERER)]
    cert = certificate(COORDINATOR, key, cn, ca_key, ca=False, san=names, usages=True)
    write_pem(directory / "tls.crt", cert, key, directory / "tls.key")
    write_pem(directory / "ca.crt", ca)
    return directory


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tls")
    return {"release": release_pki(base / "release"), "other": release_pki(base / "other", "someone else")}


def chart_env(values: dict, deployment: str = "dreamframe-coordinator") -> dict[str, str]:
    """The plain-valued environment of a Deployment's container, as the chart renders it."""
    pod = by_kind(render(values, namespace=NAMESPACE), "Deployment")[deployment]["spec"]["template"]["spec"]
    return {e["name"]: e["value"] for e in pod["containers"][0]["env"] if "value" in e}


def settings_from_chart(
    env: dict[str, str], tls_dir: Path, monkeypatch
) -> tuple[ServerSettings, ClientSettings]:
    """DreamFrame's own settings loaded from the chart's TLS variables, the mount point moved to tls_dir."""
    for name in list(os.environ):
        if name.startswith("DREAMFRAME_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if "TLS" in name:
            monkeypatch.setenv(name, value.replace("/etc/dreamframe/tls", str(tls_dir)))
    settings = settings_class()()
    server = settings.server.model_copy(
        update={"host": "127.0.0.1", "port": 0, "metrics_port": -1, "health_port": 0}
    )
    return server, settings.client.model_copy(update={"max_attempts": 1})


async def health(channel: grpc.aio.Channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=3
    )
    return reply.status


async def refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await health(channel)
    return info.value.code()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_tls_is_on_by_default_and_a_client_needs_the_release_ca(pki, monkeypatch):
    env = chart_env({})
    server_settings, client = settings_from_chart(env, pki["release"], monkeypatch)
    assert client.tls and client.tls_server_name == RENDERER and client.tls_cert_file is None

    async def body() -> None:
        async with GrpcServer([], server_settings, service_name="tls") as server:
            # Dialled by IP, as renderer discovery does: the certificate is checked against the name.
            async with make_channel(server.address, client) as ch:
                assert await health(ch) == SERVING
            # Without the name the IP is checked (it is in no certificate): no connection.
            unnamed = client.model_copy(update={"tls_server_name": ""})
            async with make_channel(server.address, unnamed) as ch:
                assert await refused(ch) == grpc.StatusCode.UNAVAILABLE
            # Plaintext to the TLS port, or a client trusting another CA: no connection.
            async with grpc.aio.insecure_channel(server.address) as ch:
                assert await refused(ch) == grpc.StatusCode.UNAVAILABLE
            wrong_ca = client.model_copy(update={"tls_ca_file": pki["other"] / "ca.crt"})
            async with make_channel(server.address, wrong_ca) as ch:
                assert await refused(ch) == grpc.StatusCode.UNAVAILABLE

    run(body())


def test_mutual_tls_refuses_clients_without_a_certificate_of_the_ca(pki, monkeypatch):
    env = chart_env({"tls": {"mutual": True}})
    server_settings, client = settings_from_chart(env, pki["release"], monkeypatch)
    assert server_settings.tls_client_ca_file is not None and client.tls_cert_file is not None

    async def body() -> None:
        async with GrpcServer([], server_settings, service_name="mtls") as server:
            # The chart's client settings present the release's certificate: accepted.
            async with make_channel(server.address, client) as ch:
                assert await health(ch) == SERVING
            # No client certificate, or one from another CA: the handshake fails.
            bare = client.model_copy(update={"tls_cert_file": None, "tls_key_file": None})
            async with make_channel(server.address, bare) as ch:
                assert await refused(ch) == grpc.StatusCode.UNAVAILABLE
            stranger = client.model_copy(
                update={"tls_cert_file": pki["other"] / "tls.crt", "tls_key_file": pki["other"] / "tls.key"}
            )
            async with make_channel(server.address, stranger) as ch:
                assert await refused(ch) == grpc.StatusCode.UNAVAILABLE

    run(body())


def test_half_a_client_certificate_is_a_configuration_error(pki):
    half = ClientSettings(tls_ca_file=pki["release"] / "ca.crt", tls_cert_file=pki["release"] / "tls.crt")
    with pytest.raises(ValueError, match="tls_cert_file and client.tls_key_file"):
        make_channel("127.0.0.1:1", half)


def test_probes_get_plaintext_health_alone_beside_a_tls_port(pki, monkeypatch):
    """The kubelet's gRPC probes cannot do TLS: the chart points them at server.health_port, which
    answers health (readiness "", liveness) in plaintext and nothing else."""
    env = chart_env({"tls": {"mutual": True}})
    assert env["DREAMFRAME_SERVER__HEALTH_PORT"] == "50052"
    server_settings, _ = settings_from_chart(env, pki["release"], monkeypatch)

    async def body() -> None:
        async with GrpcServer([], server_settings, service_name="probes") as server:
            assert server.health_port and server.health_port != server.port
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as ch:
                assert await health(ch) == SERVING
                assert await health(ch, LIVENESS) == SERVING
                # Nothing else is served there: no reflection, no service.
                method = ch.unary_unary("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await method(b"", timeout=3)
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # Stopped with the server.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}") as ch:
            assert await refused(ch) == grpc.StatusCode.UNAVAILABLE

    run(body())
