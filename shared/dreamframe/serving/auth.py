"""Bearer-token authentication for callers (``authorization: Bearer <token>``).

Health checking and reflection stay open: Kubernetes' gRPC probes cannot send a token, and reflection
only describes the API. Tokens are compared in constant time against every configured token, so
neither timing nor the position of the matching token leaks anything.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

import grpc
from grpc_interceptor.server import AsyncServerInterceptor
from pydantic import SecretStr

from dreamframe.serving.health import HEALTH_SERVICE_NAME
from dreamframe.serving.interceptors import abort

AUTHORIZATION = "authorization"
OPEN_SERVICES = frozenset(
    {
        HEALTH_SERVICE_NAME,
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)


def bearer(token: str | SecretStr) -> str:
    """The ``authorization`` metadata value for ``token``."""
    value = token.get_secret_value() if isinstance(token, SecretStr) else token
    return f"Bearer {value}"


class BearerTokenAuthInterceptor(AsyncServerInterceptor):
    """Rejects calls without a valid token with UNAUTHENTICATED, naming the ``authorization`` field.

    The request message has been parsed when this runs (grpc-interceptor keeps the handler's
    deserializer); the handler itself never runs for a rejected call.
    """

    def __init__(
        self, tokens: Iterable[str | SecretStr], *, open_services: Iterable[str] = OPEN_SERVICES
    ) -> None:
        self._tokens = [
            (t.get_secret_value() if isinstance(t, SecretStr) else t).encode() for t in tokens if t
        ]
        self._open = frozenset(open_services)

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def authorized(self, metadata: Iterable[Any] | None) -> bool:
        presented = [v for k, v in metadata or () if k == AUTHORIZATION]
        if len(presented) != 1 or not isinstance(presented[0], str):
            return False
        scheme, _, token = presented[0].partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        candidate = token.strip().encode()
        ok = False
        for expected in self._tokens:
            ok |= hmac.compare_digest(candidate, expected)  # no short-circuit: same work for every token
        return ok

    async def intercept(self, method: Any, request: Any, context: Any, method_name: str) -> Any:
        service = method_name.lstrip("/").partition("/")[0]
        if self._tokens and service not in self._open and not self.authorized(context.invocation_metadata()):
            await abort(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or invalid bearer token (metadata 'authorization: Bearer <token>')",
                field=AUTHORIZATION,
            )
        return await super().intercept(method, request, context, method_name)
