"""Refusing a request that can never run, naming the field (INVALID_ARGUMENT / FAILED_PRECONDITION);
everything item-level (a missing video, a model error) is reported in the report instead."""

from __future__ import annotations

from dreamframe import keys
from dreamframe.errors import InvalidArgument
from services.evaluator.settings import EvaluatorSettings

from .benchmarks import BENCHMARKS, STYLE_CONSISTENCY
from .endpoints import endpoint_label, resolve_judge, resolve_model_endpoint
from .request import EvaluateRequest


def validate(request: EvaluateRequest, settings: EvaluatorSettings) -> None:
    """Reject what can never run, naming the field; everything item-level is reported instead."""
    keys.report_prefix(request.report_name)
    if request.job_id:
        keys.validate_id(request.job_id, field="job_id")
    if not request.benchmarks:
        raise InvalidArgument("at least one benchmark is required", field="benchmarks")
    names = set()
    for i, b in enumerate(request.benchmarks):
        where = f"benchmarks[{i}]"
        if b.kind not in BENCHMARKS and b.kind != STYLE_CONSISTENCY:
            raise InvalidArgument(
                f"unknown benchmark format {b.kind!r}; known: {', '.join([*BENCHMARKS, STYLE_CONSISTENCY])}",
                field=f"{where}.kind",
            )
        name = b.name or b.kind
        if name in names:
            raise InvalidArgument(f"benchmark name {name!r} is used twice", field=f"{where}.name")
        names.add(name)
        if b.max_items < 0:
            raise InvalidArgument("must be >= 0", field=f"{where}.max_items")
        if b.kind == STYLE_CONSISTENCY:
            if not b.frame_prefixes:
                raise InvalidArgument(
                    "style consistency needs one frame prefix per story", field=f"{where}.frame_prefixes"
                )
        elif not b.data_prefix:
            raise InvalidArgument("the benchmark's files are required", field=f"{where}.data_prefix")
    qa = [b for b in request.benchmarks if b.kind != STYLE_CONSISTENCY]
    if qa and not request.models:
        raise InvalidArgument("at least one model is required for question answering", field="models")
    model_names = set()
    for i, m in enumerate(request.models):
        where = f"models[{i}]"
        sources = [bool(m.checkpoint_prefix), m.endpoint is not None, bool(m.preset)]
        if sum(sources) > 1:
            raise InvalidArgument("give one of checkpoint_prefix, endpoint, preset", field=where)
        name = m.name or m.checkpoint_prefix or m.preset or endpoint_label(m.endpoint)
        if not name:
            raise InvalidArgument(
                "a model without a source (shipped predictions) needs a name", field=f"{where}.name"
            )
        if name in model_names:
            raise InvalidArgument(f"model name {name!r} is used twice", field=f"{where}.name")
        model_names.add(name)
        if not 0 <= m.num_frames <= 256:
            raise InvalidArgument("must be between 0 (default) and 256", field=f"{where}.num_frames")
        if m.endpoint is not None:
            resolve_model_endpoint(m.endpoint, settings, field=f"{where}.endpoint")
        if not any(sources):
            bad = [b.name or b.kind for b in qa if b.kind != "video_chatgpt"]
            if bad:
                raise InvalidArgument(
                    f"a model without a source only has Video-ChatGPT predictions to judge, not {bad[0]!r}",
                    field=where,
                )
    needs_judge = any(BENCHMARKS[b.kind].requires_judge for b in qa)
    # A judge the request names is checked even when no benchmark needs it: it is a bad request either way.
    judge = resolve_judge(request.judge, settings) if request.judge is not None or needs_judge else None
    if needs_judge and judge is None:
        raise InvalidArgument(
            "judge-scored open answers need a judge (request.judge, or a default judge on the server)",
            field="judge",
        )
