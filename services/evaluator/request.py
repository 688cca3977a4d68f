"""What an evaluation is asked for and what it returns, transport-free (``server`` maps the protos onto
these; ``cli`` builds them from its options)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dreamframe.storage.base import ObjectRef


@dataclass(frozen=True)
class EndpointSpec:
    """An endpoint as a request picks it: a configured entry's ``name`` (and optionally one of its models),
    or a caller's own ``base_url`` + ``model`` where the server allows those (``endpoints``)."""

    name: str = ""
    model: str = ""
    base_url: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """Exactly one of checkpoint_prefix / endpoint / preset, or none: the predictions shipped in the
    benchmark files (Video-ChatGPT's ``pred`` fields)."""

    name: str = ""
    checkpoint_prefix: str = ""
    endpoint: EndpointSpec | None = None
    preset: str = ""
    num_frames: int = 0


@dataclass(frozen=True)
class BenchmarkSpec:
    kind: str
    name: str = ""
    data_prefix: str = ""
    video_prefix: str = ""
    max_items: int = 0
    frame_prefixes: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvaluateRequest:
    report_name: str
    models: tuple[ModelSpec, ...] = ()
    benchmarks: tuple[BenchmarkSpec, ...] = ()
    job_id: str = ""
    judge: EndpointSpec | None = None
    ignore_cache: bool = False


@dataclass(frozen=True)
class Score:
    model: str
    benchmark: str
    task: str
    score: float
    items: int
    failures: int
    unit: str


@dataclass(frozen=True)
class EvaluateResult:
    report_json: ObjectRef
    report_markdown: ObjectRef
    items_jsonl: ObjectRef
    scores: list[Score]
    report: dict = field(repr=False, compare=False)
