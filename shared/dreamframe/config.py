"""The one config mechanism: pydantic-settings, environment variables with prefix ``DREAMFRAME_``.

Nested sections use ``__``: ``DREAMFRAME_STORAGE__BACKEND=s3``, ``DREAMFRAME_SERVER__PORT=50051``,
``DREAMFRAME_RENDERER__BATCH_SIZE=4``. An optional YAML file named by ``DREAMFRAME_CONFIG_FILE`` gives
the same keys as nested mappings (``storage: {backend: s3}``); environment variables win over the file.
The Helm chart's ``config:`` values use exactly these names.

This module holds the sections every process shares (storage, server, client, log, models, cli, limits). Each
service owns its own section in ``services/<name>/settings.py`` and registers it with this loader through
the ``dreamframe.settings`` entry point group in pyproject.toml,
so the shared library does not change with every service. ``get_settings()`` returns one object with every
registered section (``settings.renderer.batch_size``).
"""

from __future__ import annotations

import os
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

ENV_PREFIX = "DREAMFRAME_"
CONFIG_FILE_ENV = "DREAMFRAME_CONFIG_FILE"
# Entry point group through which services register their settings sections.
SECTIONS_GROUP = "dreamframe.settings"


class StorageSettings(BaseModel):
    """Where artifacts live."""

    backend: Literal["local", "s3"] = "local"
    # local backend: buckets are directories under root
    root: Path = Path(".dreamframe/store")
    bucket: str = "dreamframe"
    # s3 backend (MinIO or any S3): host:port, no scheme
    endpoint: str = "127.0.0.1:9000"
    access_key: SecretStr = SecretStr("")
    secret_key: SecretStr = SecretStr("")
    secure: bool = False
    region: str | None = None
    # Make `bucket` at start-up if it is missing (never any other bucket, never on a request).
    create_bucket: bool = True
    # Buckets a request may name besides `bucket` (always allowed); they must exist already.
    # DREAMFRAME_STORAGE__ALLOWED_BUCKETS=a,b or a JSON list.
    allowed_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list)

    @field_validator("allowed_buckets", mode="before")
    @classmethod
    def _split_buckets(cls, value: object) -> object:
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                import json

                return json.loads(value)
            return [b.strip() for b in value.split(",") if b.strip()]
        return value


# Names and teams go into logs, metrics labels and storage keys (the per-team job index).
CALLER_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
CALLER_ROLES = ("read", "submit", "admin")  # ordered: each role may do what the ones before it may
MIN_TOKEN_CHARS = 16
# Callers made from the old server.auth_tokens list: admins of this team.
LEGACY_TOKEN_TEAM = "default"


class CallerConfigError(Exception):
    """A caller entry is unusable. Not a ValueError on purpose: pydantic would print the raw input
    (the token) into its ValidationError."""


class CallerSettings(BaseModel):
    """One caller of the services: who (``name``), which ``team`` its jobs belong to, what it may do."""

    name: str = Field(pattern=CALLER_NAME_PATTERN)
    team: str = Field(pattern=CALLER_NAME_PATTERN)
    role: Literal["read", "submit", "admin"] = "read"
    token: SecretStr

    @field_validator("token")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        if len(value.get_secret_value().strip()) < MIN_TOKEN_CHARS:
            raise CallerConfigError(f"a caller's token must have at least {MIN_TOKEN_CHARS} characters")
        return value


class ServerSettings(BaseModel):
    """How a service listens (the same for all seven)."""

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    # Prometheus /metrics over HTTP; 0 picks a free port, -1 disables.
    metrics_port: int = Field(0, ge=-1, le=65535)
    # A plaintext port with grpc.health.v1 alone (-1: none; health is on `port` as always). Kubernetes'
    # built-in gRPC probes cannot do TLS: with TLS on `port` the chart points them here.
    health_port: int = Field(-1, ge=-1, le=65535)
    # SIGTERM: stop accepting, let in-flight RPCs finish for this long, then cancel them.
    grace_seconds: float = Field(30.0, ge=0)
    max_workers: int = Field(16, ge=1)
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    # A client connection is asked to go (HTTP/2 GOAWAY) after this long (gRPC adds ±10 % jitter), so a
    # round-robin client over a headless Service resolves again and reaches replicas added since; 0: never.
    max_connection_age_seconds: float = Field(300.0, ge=0)
    # How long calls still open on such a connection may go on; unset: until they end (hours-long streams
    # such as training must not be cut).
    max_connection_age_grace_seconds: float | None = Field(None, ge=0)
    # Keepalive pings a client may send while a call runs with no data flowing (a style training is one
    # unary call of minutes): pings closer together than this are strikes, and gRPC closes the connection
    # (GOAWAY "too_many_pings") after two. Must not exceed the clients' client.keepalive_seconds.
    min_ping_interval_seconds: float = Field(30.0, gt=0)
    # This server's own pings to notice dead clients on hours-long streams.
    keepalive_seconds: float = Field(60.0, gt=0)
    # Who may call: {name, team, role, token} entries (DREAMFRAME_SERVER__CALLERS as a JSON list, or the
    # config file), plus those of callers_file (a mounted Secret: a YAML/JSON list of the same entries).
    # No caller and no auth_tokens: auth is off (local runs on 127.0.0.1).
    callers: list[CallerSettings] = Field(default_factory=list)
    callers_file: Path | None = None
    # Deprecated: bare bearer tokens; each becomes an admin caller "token-<n>" of team "default".
    auth_tokens: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Require client certificates signed by this CA (mutual TLS).
    tls_client_ca_file: Path | None = None

    _all_callers: list[CallerSettings] = PrivateAttr(default_factory=list)

    @field_validator("auth_tokens", mode="before")
    @classmethod
    def _split_tokens(cls, value: object) -> object:
        # Allow DREAMFRAME_SERVER__AUTH_TOKENS=a,b as well as a JSON list.
        if isinstance(value, str):
            if value.lstrip().startswith("["):
                import json

                return json.loads(value)
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @model_validator(mode="after")
    def _gather_callers(self) -> ServerSettings:
        found = list(self.callers)
        if self.callers_file is not None:
            found += _read_callers_file(self.callers_file)
        found += [
            CallerSettings.model_construct(
                name=f"token-{i}", team=LEGACY_TOKEN_TEAM, role="admin", token=token
            )
            for i, token in enumerate((t for t in self.auth_tokens if t.get_secret_value()), start=1)
        ]
        names, tokens = set(), set()
        for caller in found:
            if caller.name in names:
                raise CallerConfigError(f"server.callers: the name {caller.name!r} is used twice")
            token = caller.token.get_secret_value().strip()
            if token in tokens:
                raise CallerConfigError(f"server.callers: {caller.name!r} has the token of another caller")
            names.add(caller.name)
            tokens.add(token)
        self._all_callers = found
        return self

    @property
    def all_callers(self) -> list[CallerSettings]:
        """Every caller: ``callers``, then ``callers_file``'s, then the legacy ``auth_tokens``."""
        return list(self._all_callers)

    @property
    def auth_enabled(self) -> bool:
        return bool(self._all_callers)


def _read_callers_file(path: Path) -> list[CallerSettings]:
    import yaml

    try:
        entries = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CallerConfigError(f"server.callers_file: cannot read {str(path)!r} ({exc.strerror})") from None
    except yaml.YAMLError:
        raise CallerConfigError(f"server.callers_file: {str(path)!r} is not YAML/JSON") from None
    if isinstance(entries, dict):  # also accept {callers: [...]}
        entries = entries.get("callers")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise CallerConfigError(f"server.callers_file: {str(path)!r} must hold a list of callers")
    callers = []
    for i, entry in enumerate(entries):
        try:
            callers.append(CallerSettings.model_validate(entry))
        except ValidationError as exc:
            # Names the entry and the fields, never the values (the file holds tokens).
            problems = ", ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise CallerConfigError(f"server.callers_file: entry {i}: {problems}") from None
        except CallerConfigError as exc:
            raise CallerConfigError(f"server.callers_file: entry {i}: {exc}") from None
    return callers


class ClientSettings(BaseModel):
    """How services (and the CLI) call other services."""

    deadline_seconds: float = Field(60.0, gt=0)
    # Long streaming RPCs (rendering a story, training) get this deadline instead.
    stream_deadline_seconds: float = Field(24 * 3600.0, gt=0)
    max_attempts: int = Field(5, ge=1, le=5)
    # A ping every this long keeps a quiet connection (a minutes-long unary call) alive through proxies
    # and notices a dead server; servers accept it down to their server.min_ping_interval_seconds (30 s).
    keepalive_seconds: float = Field(60.0, gt=0)
    # This process's own bearer token: the services it calls know it as one caller of their server.callers
    # (the coordinator: e.g. {name: coordinator, role: submit}), so they see this service, not its callers.
    token: SecretStr = SecretStr("")
    tls_ca_file: Path | None = None
    tls: bool = False
    # Mutual TLS: the certificate and key this process presents to the services it calls.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # The name the server's certificate is checked against instead of the target's host: needed where
    # the target is a pod IP (renderer discovery) or a port-forward to 127.0.0.1.
    tls_server_name: str = ""


class LogSettings(BaseModel):
    level: str = "INFO"
    # JSON lines (for clusters) or human-readable console output.
    json_format: bool = Field(False, alias="json")

    model_config = {"populate_by_name": True}


class ModelSettings(BaseModel):
    """Where model presets are cached (the tiny presets are built here once per machine)."""

    cache_dir: Path = Path(".dreamframe/models")
    # GPU sharing (dreamframe.models.device / holder; the local runner sets both per process when
    # several GPU services share a GPU; 0 = off, the Kubernetes default of one service per GPU).
    # The fraction of the card this process's CUDA allocator may hold (set at start); past it the
    # service fails itself with RESOURCE_EXHAUSTED naming this setting, not a neighbour.
    gpu_memory_fraction: float = Field(0.0, ge=0.0, le=1.0)
    # Seconds without work after which a GPU service drops its loaded models and empties the CUDA
    # cache; the next request loads them again (health stays SERVING meanwhile).
    idle_release_s: float = Field(0.0, ge=0.0)


class CliSettings(BaseModel):
    """The ``dreamframe`` command line."""

    coordinator_address: str = "127.0.0.1:50060"
    # Local runs: process records, logs and the local store live here.
    state_dir: Path = Path(".dreamframe")
    # `dreamframe run` exports each job's results to <runs_dir>/<job>/.
    runs_dir: Path = Path("runs")


class LimitsSettings(BaseModel):
    """How much a story file or a request may hold (hostile input: a clear error, a bounded cost).

    Enforced where a story enters (``dreamframe import-story``/``submit --story``, SubmitJob, every
    service that loads a story) and on SubmitJob's text fields. Defaults sit far above the paper's reference
    story (DreamFrame-code json/story_info_0.json); its largest values are in the comments.
    """

    story_bytes: int = Field(16 * 1024 * 1024, ge=1024)  # the whole story file; reference: 445,855 bytes
    json_depth: int = Field(32, ge=8)  # nested objects/arrays; reference file 3, native story 7
    json_containers: int = Field(200_000, ge=100)  # objects and arrays in all; reference: 2,129
    theme_chars: int = Field(500, ge=1)  # the plot service's own theme limit
    overview_chars: int = Field(20_000, ge=1)  # reference: 429
    frame_text_chars: int = Field(2_000, ge=1)  # a frame's text or prompt; reference: 341
    dialogue_chars: int = Field(2_000, ge=1)  # reference: 106
    qa_chars: int = Field(4_000, ge=1)  # a question or an answer; reference: 103 / 429
    # Character names, locations, title, style keyword, QA kind; reference names: 11.
    name_chars: int = Field(200, ge=1)
    # Appearances, style description, scene and contents; reference appearances: 48.
    description_chars: int = Field(2_000, ge=1)
    frames: int = Field(20_000, ge=1)  # per story (at least 1 always); reference: 1,331
    dialogues: int = Field(20_000, ge=0)  # reference: 650
    qa_pairs: int = Field(20_000, ge=0)  # all levels together; reference: 144
    substories: int = Field(1_000, ge=1)  # the paper's plot: 11 (an imported reference file is 1)
    tiny_stories: int = Field(10_000, ge=1)  # all substories together; the paper's plot: 121
    characters: int = Field(1_000, ge=0)  # reference: 3
    locations: int = Field(1_000, ge=0)  # the paper asks for at least 12
    # Any other text field of a request (names, option strings, a negative prompt).
    request_string_chars: int = Field(10_000, ge=1)


class Settings(BaseSettings):
    """DreamFrame's configuration: the common sections here, the services' own sections added by
    ``settings_class`` (use ``load_settings``/``get_settings`` to read it)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="ignore",
        case_sensitive=False,
    )

    storage: StorageSettings = Field(default_factory=StorageSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    client: ClientSettings = Field(default_factory=ClientSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    cli: CliSettings = Field(default_factory=CliSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get(CONFIG_FILE_ENV)
        if config_file:
            if not Path(config_file).is_file():
                raise FileNotFoundError(f"{CONFIG_FILE_ENV}={config_file!r}: no such file")
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        sources.append(file_secret_settings)
        return tuple(sources)


_registered: dict[str, type[BaseModel]] = {}


def register_section(name: str, model: type[BaseModel]) -> None:
    """Add a settings section besides the entry points (plugins, tests)."""
    _registered[name] = model
    sections.cache_clear()
    settings_class.cache_clear()
    get_settings.cache_clear()


@lru_cache(maxsize=1)
def sections() -> dict[str, type[BaseModel]]:
    """The services' sections by name: the ``dreamframe.settings`` entry points, then registered ones."""
    found = {}
    for ep in entry_points(group=SECTIONS_GROUP):
        try:
            found[ep.name] = ep.load()
        except ModuleNotFoundError as exc:
            # An image holds only its own service's package: other services' sections are not there.
            if not (exc.name and f"{ep.module}.".startswith(f"{exc.name}.")):
                raise
    found.update(_registered)
    for name, model in found.items():
        if name in Settings.model_fields:
            raise ValueError(f"settings section {name!r} ({model.__qualname__}) clashes with a common one")
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            raise TypeError(f"settings section {name!r}: {model!r} is not a pydantic model")
    return found


@lru_cache(maxsize=1)
def settings_class() -> type[Settings]:
    """``Settings`` with every registered section as a field (defaults when not configured)."""
    fields: dict = {name: (model, Field(default_factory=model)) for name, model in sections().items()}
    return create_model("Settings", __base__=Settings, __module__=__name__, **fields)


def load_settings(**values: object) -> Settings:
    """Read the settings now: environment, then the config file; ``values`` win over both."""
    return settings_class()(**values)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once."""
    return load_settings()


def _holds_secret(annotation: object) -> bool:
    """Whether a field's type holds a SecretStr anywhere (a list of them, a model with one)."""
    if annotation is SecretStr:
        return True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return any(_holds_secret(f.annotation) for f in annotation.model_fields.values())
    return any(_holds_secret(arg) for arg in get_args(annotation))


def _model_in(annotation: object) -> type[BaseModel] | None:
    """The settings model a field's type is (or, for ``Model | None``, holds); None for a leaf."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def secret_variable(name: str) -> bool:
    """Whether the environment variable ``name`` (``DREAMFRAME_SECTION__FIELD``) sets a secret or a
    value that holds one (``server.callers``' tokens), read from the settings' own types, so that its
    value is never shown. A name that is no known setting counts as secret: nothing can vouch for it."""
    model: type[BaseModel] | None = settings_class()
    upper = name.upper()
    if not upper.startswith(ENV_PREFIX):
        return True
    annotation: object = model
    for part in upper.removeprefix(ENV_PREFIX).lower().split("__"):
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return True
        annotation, model = field.annotation, _model_in(field.annotation)
    # The named value as a whole: a section or model set as JSON holds its secrets too.
    return _holds_secret(annotation)
