"""Which OpenAI-compatible server a request's model endpoint or judge reaches, and with which key.

Endpoints are the server's. A request names an entry of ``evaluator.endpoints`` (models under test) or
``evaluator.judges`` (judges); the entry's base URL, models and API key (read from the environment variable
or secret file the operator named) come from configuration, never from the request. A URL of the caller's
own is taken only where ``evaluator.allow_caller_endpoints`` is on, and such a call carries no credential:
its HTTP client sends protocol headers only (no Authorization, no OpenAI-Organization / -Project, nothing
from the environment or a .netrc).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx2  # the openai client's HTTP library (it takes only its clients)

from dreamframe.errors import FailedPrecondition, InvalidArgument
from dreamframe.logging import get_logger
from services.evaluator.settings import DEFAULT_JUDGE, EndpointEntry, EvaluatorSettings

from .request import EndpointSpec

log = get_logger("dreamframe.evaluator")

MAX_URL_CHARS = 2048
MAX_NAME_CHARS = 256
# Error messages quote at most this much of a value the caller sent.
QUOTE_CHARS = 40
# Headers a call to a caller's URL may carry: the protocol's, nothing that authenticates or identifies us.
CALLER_HEADERS = frozenset(
    {"host", "accept", "accept-encoding", "content-type", "content-length", "user-agent", "connection"}
)


@dataclass(frozen=True)
class Endpoint:
    """A resolved endpoint: where calls go, the model, and the key (None: a caller's URL, no credential)."""

    base_url: str
    model: str
    api_key: str | None
    # The configured entry's name; "" for a caller's URL.
    entry: str = ""

    @property
    def identity(self) -> str:
        """Answer/verdict cache identity: the server and the model answering."""
        return f"openai:{self.base_url}:{self.model}"

    def describe(self) -> dict:
        """What the report records (never the key)."""
        described = {"base_url": self.base_url, "model": self.model}
        return {"name": self.entry, **described} if self.entry else {**described, "caller_url": True}


def quote(value: str) -> str:
    """A caller's value for an error message: a short prefix only."""
    return repr(value if len(value) <= QUOTE_CHARS else value[:QUOTE_CHARS] + "…")


def endpoint_label(spec: EndpointSpec | None) -> str:
    """A model's report label when the request gives none: the endpoint's model, else the entry's name."""
    return (spec.model or spec.name) if spec is not None else ""


def judge_entries(settings: EvaluatorSettings) -> dict[str, EndpointEntry]:
    """The configured judges, with judge_base_url/judge_model as "default" unless judges names one."""
    entries = dict(settings.judges)
    if settings.judge_base_url and DEFAULT_JUDGE not in entries:
        entries[DEFAULT_JUDGE] = EndpointEntry(base_url=settings.judge_base_url, model=settings.judge_model)
    return entries


def resolve_model_endpoint(spec: EndpointSpec, settings: EvaluatorSettings, *, field: str) -> Endpoint:
    """``models[i].endpoint``: a configured entry by name, or (where allowed) the caller's URL + model."""
    return _resolve(spec, settings.endpoints, settings, field=field, what="endpoint", default_model="")


def resolve_judge(spec: EndpointSpec | None, settings: EvaluatorSettings) -> Endpoint | None:
    """The request's judge, else the default one, else None."""
    entries = judge_entries(settings)
    if spec is None:
        if DEFAULT_JUDGE not in entries:
            return None
        spec = EndpointSpec(name=DEFAULT_JUDGE)
    return _resolve(spec, entries, settings, field="judge", what="judge", default_model=settings.judge_model)


def _resolve(
    spec: EndpointSpec,
    entries: dict[str, EndpointEntry],
    settings: EvaluatorSettings,
    *,
    field: str,
    what: str,
    default_model: str,
) -> Endpoint:
    if spec.name and spec.base_url:
        raise InvalidArgument("give name or base_url, not both", field=field)
    if len(spec.model) > MAX_NAME_CHARS:
        raise InvalidArgument(f"longer than {MAX_NAME_CHARS} characters", field=f"{field}.model")
    if not spec.base_url:
        if not spec.name:
            raise InvalidArgument(f"name a configured {what}", field=f"{field}.name")
        entry = entries.get(spec.name)
        if entry is None:
            known = ", ".join(sorted(entries)[:20]) or "none"
            raise InvalidArgument(
                f"unknown {what} {quote(spec.name)}; configured: {known}", field=f"{field}.name"
            )
        model = spec.model or entry.model
        if model not in entry.allowed_models:
            raise InvalidArgument(
                f"{what} {spec.name!r} serves {', '.join(entry.allowed_models)}, not {quote(model)}",
                field=f"{field}.model",
            )
        key = _api_key(spec.name, what, entry, settings)
        return Endpoint(entry.base_url, model, key, spec.name)
    if not settings.allow_caller_endpoints:
        raise InvalidArgument(
            f"this server takes no caller URLs; name a configured {what} instead", field=f"{field}.base_url"
        )
    url = spec.base_url
    try:
        parts = urlsplit(url) if len(url) <= MAX_URL_CHARS else None
    except ValueError:  # e.g. an unclosed IPv6 bracket
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgument(f"not an http(s) URL: {quote(url)}", field=f"{field}.base_url")
    model = spec.model or default_model
    if not model:
        raise InvalidArgument("required with a base_url", field=f"{field}.model")
    return Endpoint(url, model, None)


def _api_key(name: str, what: str, entry: EndpointEntry, settings: EvaluatorSettings) -> str:
    """The entry's key from where the operator put it. A missing one is the server's misconfiguration:
    the caller learns that, not where the key should have been (the log says)."""
    if what == "judge" and name == DEFAULT_JUDGE and DEFAULT_JUDGE not in settings.judges:
        return settings.judge_api_key.get_secret_value()
    try:
        if entry.api_key_file is not None:
            return entry.api_key_file.read_text().strip()
        if entry.api_key_env:
            return os.environ[entry.api_key_env]
    except (OSError, KeyError, UnicodeDecodeError) as exc:
        log.error("API key of a configured endpoint is not available", kind=what, entry=name, error=repr(exc))
        raise FailedPrecondition(f"the API key of {what} {name!r} is not available on this server") from None
    return ""


class _ProtocolHeadersOnly(httpx2.HTTPTransport):
    """Drops every header but the protocol's from each request, whatever the SDK added on the way."""

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        for header in [h for h in request.headers if h.lower() not in CALLER_HEADERS]:
            del request.headers[header]
        return super().handle_request(request)


def openai_client(endpoint: Endpoint, *, timeout: float, max_retries: int):  # noqa: ANN201 - openai.OpenAI
    import openai

    if endpoint.api_key is not None:
        # Only the entry's key: a local server needs none, but the client insists on one (and would read
        # OPENAI_API_KEY); nor the OpenAI organization/project the client would take from the environment.
        return openai.OpenAI(
            base_url=endpoint.base_url,
            api_key=endpoint.api_key or "unused",
            timeout=timeout,
            max_retries=max_retries,
            default_headers={"OpenAI-Organization": openai.Omit(), "OpenAI-Project": openai.Omit()},
        )
    # A caller's URL: no key, no proxy or .netrc credentials from the environment, protocol headers only.
    http_client = httpx2.Client(transport=_ProtocolHeadersOnly(trust_env=False), trust_env=False)
    return openai.OpenAI(
        base_url=endpoint.base_url,
        api_key="none",
        organization="",
        project="",
        timeout=timeout,
        max_retries=max_retries,
        http_client=http_client,
    )
