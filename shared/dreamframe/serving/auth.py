"""Callers: bearer tokens (``authorization: Bearer <token>``) mapped to a name, a team and a role.

The tokens and who they belong to are ``server.callers`` (config.py). Each RPC needs a role
(``METHOD_ROLES``: read ⊂ submit ⊂ admin); the caller of an RPC is ``current_caller()`` while it runs,
for servicers (job ownership), access logs and metrics. With no caller configured auth is off and
``current_caller()`` is None: a local run on 127.0.0.1, where every caller may do everything.

Health checking and reflection stay open: Kubernetes' gRPC probes cannot send a token, and reflection
only describes the API. Tokens are compared in constant time against every configured token, so
neither timing nor the position of the matching token leaks anything.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
import structlog
from grpc_interceptor.server import AsyncServerInterceptor
from pydantic import SecretStr

from dreamframe.config import CALLER_ROLES, CallerSettings
from dreamframe.serving.health import HEALTH_SERVICE_NAME
from dreamframe.serving.interceptors import Caller, abort, current_caller, set_current_caller

__all__ = [
    "ADMIN",
    "METHOD_ROLES",
    "READ",
    "SUBMIT",
    "Caller",
    "CallerAuthInterceptor",
    "bearer",
    "current_caller",
    "may_see",
    "owner",
    "required_role",
]

AUTHORIZATION = "authorization"
OPEN_SERVICES = frozenset(
    {
        HEALTH_SERVICE_NAME,
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)
READ, SUBMIT, ADMIN = CALLER_ROLES

# The role each RPC needs: the one table. A method not listed needs admin, so a new RPC stays closed
# to ordinary callers until it is given its role here. Cross-team access (another team's job, ListJobs
# over every team) needs admin too; the coordinator checks that per job (services/coordinator/access.py).
_V1 = "/dreamframe.v1."
METHOD_ROLES: Mapping[str, str] = {
    f"{_V1}CoordinatorService/GetJob": READ,
    f"{_V1}CoordinatorService/ListJobs": READ,
    f"{_V1}CoordinatorService/WatchJob": READ,
    f"{_V1}CoordinatorService/SubmitJob": SUBMIT,
    f"{_V1}CoordinatorService/CancelJob": SUBMIT,
    f"{_V1}TrainService/GetRun": READ,
    f"{_V1}TrainService/ListRuns": READ,
    f"{_V1}TrainService/WatchRun": READ,
    f"{_V1}TrainService/StartRun": SUBMIT,
    f"{_V1}TrainService/CancelRun": SUBMIT,
    # The workers: the coordinator calls them with its own (submit) identity; so may a team directly.
    f"{_V1}PlotService/GenerateStory": SUBMIT,
    f"{_V1}StyleService/TrainStyle": SUBMIT,
    f"{_V1}RenderService/RenderFrames": SUBMIT,
    f"{_V1}RenderService/BuildStoryBoard": SUBMIT,
    f"{_V1}QaService/BuildDataset": SUBMIT,
    f"{_V1}EvalService/Evaluate": SUBMIT,
}


def required_role(method_name: str) -> str:
    return METHOD_ROLES.get(method_name, ADMIN)


def may_see(caller: Caller | None, team: str) -> bool:
    """Whether ``caller`` may see (watch, cancel) what belongs to ``team``: its own team's things;
    admins everything; everyone everything while auth is off (``caller`` None)."""
    return caller is None or caller.is_admin or team == caller.team


def owner(caller: Caller | None) -> dict[str, str]:
    """What a new job or run records of the caller creating it: ``submitted_by`` and ``team``."""
    return {"submitted_by": caller.name, "team": caller.team} if caller else {}


def bearer(token: str | SecretStr) -> str:
    """The ``authorization`` metadata value for ``token``."""
    value = token.get_secret_value() if isinstance(token, SecretStr) else token
    return f"Bearer {value}"


class CallerAuthInterceptor(AsyncServerInterceptor):
    """UNAUTHENTICATED without a known token (naming the ``authorization`` field), PERMISSION_DENIED
    when the caller's role is below the method's; otherwise the caller is ``current_caller()``.

    The request message has been parsed when this runs (grpc-interceptor keeps the handler's
    deserializer); the handler itself never runs for a rejected call.
    """

    def __init__(
        self,
        callers: Iterable[CallerSettings],
        *,
        open_services: Iterable[str] = OPEN_SERVICES,
        method_roles: Mapping[str, str] = METHOD_ROLES,
    ) -> None:
        self._callers = [
            (c.token.get_secret_value().strip().encode(), Caller(c.name, c.team, c.role)) for c in callers
        ]
        self._open = frozenset(open_services)
        self._roles = dict(method_roles)

    @property
    def enabled(self) -> bool:
        return bool(self._callers)

    def caller_for(self, metadata: Iterable[Any] | None) -> Caller | None:
        """The caller whose token the metadata carries, or None."""
        presented = [v for k, v in metadata or () if k == AUTHORIZATION]
        if len(presented) != 1 or not isinstance(presented[0], str):
            return None
        scheme, _, token = presented[0].partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        candidate = token.strip().encode()
        found = None
        for expected, caller in self._callers:
            # No short-circuit: the same work for every token, wherever the match is.
            if hmac.compare_digest(candidate, expected):
                found = caller
        return found

    async def intercept(self, method: Any, request: Any, context: Any, method_name: str) -> Any:
        service = method_name.lstrip("/").partition("/")[0]
        if self._callers and service not in self._open:
            caller = self.caller_for(context.invocation_metadata())
            if caller is None:
                await abort(
                    context,
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing or invalid bearer token (metadata 'authorization: Bearer <token>')",
                    field=AUTHORIZATION,
                )
            # Known from here on, also to the access log and metrics of a call refused below.
            set_current_caller(caller)
            # The handler's own log lines name the caller too (the RPC's task has its own context).
            structlog.contextvars.bind_contextvars(caller=caller.name)
            needed = self._roles.get(method_name, ADMIN)
            if not caller.may(needed):
                await abort(
                    context,
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{method_name} needs the role {needed!r}; caller {caller.name!r} has {caller.role!r}",
                )
        return await super().intercept(method, request, context, method_name)
