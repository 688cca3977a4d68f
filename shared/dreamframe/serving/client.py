"""Channels for calling DreamFrame services: retries, deadlines, auth, TLS, load balancing.

Every client call gets (DESIGN.md: "deadlines and retries on every client call"):
- retries of UNAVAILABLE with exponential backoff, up to ``ClientSettings.max_attempts`` (gRPC's own
  retry machinery, from a JSON service config; a stream is only retried before its first message);
- round-robin load balancing, so ``dns:///renderer-headless:50051`` spreads calls over every replica;
- a default deadline when the caller gives none (``deadline_seconds``; ``stream_deadline_seconds``
  for streaming RPCs);
- ``authorization: Bearer <token>`` when ``ClientSettings.token`` is set. It is added by an
  interceptor rather than call credentials because gRPC only sends call credentials over TLS; do use
  TLS when a token crosses an untrusted network.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from dreamframe.config import ClientSettings
from dreamframe.serving.auth import AUTHORIZATION, bearer

DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def service_config(
    settings: ClientSettings,
    *,
    load_balancing: str = "round_robin",
    initial_backoff_seconds: float = 0.1,
    max_backoff_seconds: float = 5.0,
) -> str:
    """The channel's default service config (JSON), applying to every method (``"name": [{}]``)."""
    method_config: dict[str, Any] = {"name": [{}]}
    if settings.max_attempts > 1:
        method_config["retryPolicy"] = {
            "maxAttempts": settings.max_attempts,
            "initialBackoff": f"{initial_backoff_seconds}s",
            "maxBackoff": f"{max_backoff_seconds}s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps({"loadBalancingConfig": [{load_balancing: {}}], "methodConfig": [method_config]})


def channel_options(
    settings: ClientSettings,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    load_balancing: str = "round_robin",
    initial_backoff_seconds: float = 0.1,
) -> list[tuple[str, Any]]:
    return [
        (
            "grpc.service_config",
            service_config(
                settings, load_balancing=load_balancing, initial_backoff_seconds=initial_backoff_seconds
            ),
        ),
        # Our config, not whatever a DNS TXT record says.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Keep long quiet calls alive through proxies; servers accept pings every 30 s (server.py).
        ("grpc.keepalive_time_ms", int(settings.keepalive_seconds * 1000)),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def channel_credentials(
    settings: ClientSettings,
    *,
    tls: bool | None = None,
    root_certificates: bytes | None = None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for plaintext. TLS is on when asked, or when a CA is configured; the
    settings' certificate and key are presented (mutual TLS) unless the caller passes its own."""
    ca_file: Path | None = settings.tls_ca_file
    use_tls = (
        tls if tls is not None else (settings.tls or ca_file is not None or root_certificates is not None)
    )
    if not use_tls:
        return None
    if root_certificates is None and ca_file is not None:
        root_certificates = ca_file.read_bytes()
    if certificate_chain is None and private_key is None:
        if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
            raise ValueError("client.tls_cert_file and client.tls_key_file must be set together")
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            certificate_chain = settings.tls_cert_file.read_bytes()
            private_key = settings.tls_key_file.read_bytes()
    # root_certificates None: the system's trust store.
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)


class _CallDefaults:
    """Default deadline and the bearer token, unless the caller gave their own."""

    def __init__(self, settings: ClientSettings) -> None:
        self.deadline = settings.deadline_seconds
        self.stream_deadline = settings.stream_deadline_seconds
        token = settings.token.get_secret_value()
        self.auth = bearer(token) if token else None

    def timeout(self, given: float | None, streaming: bool) -> float:
        if given is not None:
            return given
        return self.stream_deadline if streaming else self.deadline

    def metadata(self, given: Any) -> list[tuple[str, Any]]:
        metadata = list(given or ())
        if self.auth and not any(k == AUTHORIZATION for k, _ in metadata):
            metadata.append((AUTHORIZATION, self.auth))
        return metadata

    def aio_details(self, details: Any, streaming: bool) -> Any:
        return details._replace(
            timeout=self.timeout(details.timeout, streaming),
            metadata=grpc.aio.Metadata(*self.metadata(details.metadata)),
        )


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, defaults: _CallDefaults) -> None:
        self._defaults = defaults

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._defaults.aio_details(client_call_details, False), request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, defaults: _CallDefaults) -> None:
        self._defaults = defaults

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self._defaults.aio_details(client_call_details, True), request)


class _AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, defaults: _CallDefaults) -> None:
        self._defaults = defaults

    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._defaults.aio_details(client_call_details, True), request_iterator)


class _AioStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, defaults: _CallDefaults) -> None:
        self._defaults = defaults

    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(self._defaults.aio_details(client_call_details, True), request_iterator)


def _aio_defaults(settings: ClientSettings) -> list[grpc.aio.ClientInterceptor]:
    # One object per call type: grpc.aio files an interceptor under the FIRST interface it
    # implements only, so a single class implementing all four would never see streaming calls.
    defaults = _CallDefaults(settings)
    return [
        _AioUnaryUnary(defaults),
        _AioUnaryStream(defaults),
        _AioStreamUnary(defaults),
        _AioStreamStream(defaults),
    ]


def _channel_setup(
    settings: ClientSettings,
    *,
    tls: bool | None,
    root_certificates: bytes | None,
    certificate_chain: bytes | None,
    private_key: bytes | None,
    max_message_bytes: int,
    load_balancing: str,
    initial_backoff_seconds: float,
    options: Sequence[tuple[str, Any]],
) -> tuple[list[tuple[str, Any]], grpc.ChannelCredentials | None]:
    """Channel options and credentials (None: plaintext), the same for aio and blocking channels."""
    opts = [
        *channel_options(
            settings,
            max_message_bytes=max_message_bytes,
            load_balancing=load_balancing,
            initial_backoff_seconds=initial_backoff_seconds,
        ),
        *options,
    ]
    creds = channel_credentials(
        settings,
        tls=tls,
        root_certificates=root_certificates,
        certificate_chain=certificate_chain,
        private_key=private_key,
    )
    if creds is not None and settings.tls_server_name:
        opts.append(("grpc.ssl_target_name_override", settings.tls_server_name))
    return opts, creds


def make_channel(
    target: str,
    settings: ClientSettings | None = None,
    *,
    tls: bool | None = None,
    root_certificates: bytes | None = None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    load_balancing: str = "round_robin",
    initial_backoff_seconds: float = 0.1,
    options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``target`` (``host:port``, ``dns:///name:port``, ``ipv4:a:p,b:p``).

    ``certificate_chain``/``private_key`` present a client certificate (mutual TLS).
    """
    settings = settings or ClientSettings()
    opts, creds = _channel_setup(
        settings,
        tls=tls,
        root_certificates=root_certificates,
        certificate_chain=certificate_chain,
        private_key=private_key,
        max_message_bytes=max_message_bytes,
        load_balancing=load_balancing,
        initial_backoff_seconds=initial_backoff_seconds,
        options=options,
    )
    all_interceptors = [*_aio_defaults(settings), *interceptors]
    if creds is None:
        return grpc.aio.insecure_channel(target, options=opts, interceptors=all_interceptors)
    return grpc.aio.secure_channel(target, creds, options=opts, interceptors=all_interceptors)


class _SyncCallDetails(
    collections.namedtuple(
        "_SyncCallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _SyncDefaults(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """The same defaults for blocking stubs (scripts, the CLI)."""

    def __init__(self, settings: ClientSettings) -> None:
        self._defaults = _CallDefaults(settings)

    def _details(self, d: Any, streaming: bool) -> Any:
        return _SyncCallDetails(
            d.method,
            self._defaults.timeout(d.timeout, streaming),
            self._defaults.metadata(d.metadata),
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details, False), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details, True), request)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._details(client_call_details, True), request_iterator)

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._details(client_call_details, True), request_iterator)


def make_sync_channel(
    target: str,
    settings: ClientSettings | None = None,
    *,
    tls: bool | None = None,
    root_certificates: bytes | None = None,
    certificate_chain: bytes | None = None,
    private_key: bytes | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    load_balancing: str = "round_robin",
    initial_backoff_seconds: float = 0.1,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """Blocking-stub twin of ``make_channel``."""
    settings = settings or ClientSettings()
    opts, creds = _channel_setup(
        settings,
        tls=tls,
        root_certificates=root_certificates,
        certificate_chain=certificate_chain,
        private_key=private_key,
        max_message_bytes=max_message_bytes,
        load_balancing=load_balancing,
        initial_backoff_seconds=initial_backoff_seconds,
        options=options,
    )
    channel = (
        grpc.insecure_channel(target, options=opts)
        if creds is None
        else grpc.secure_channel(target, creds, options=opts)
    )
    return grpc.intercept_channel(channel, _SyncDefaults(settings))
