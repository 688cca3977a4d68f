"""Refusing a request that can never run, naming the field (INVALID_ARGUMENT / FAILED_PRECONDITION);
everything item-level (a missing video, a model error) is reported in the report instead."""

from __future__ import annotations

import os

from dreamframe import keys
from dreamframe.errors import FailedPrecondition, InvalidArgument
from services.evaluator.settings import EvaluatorSettings

from .benchmarks import BENCHMARKS, STYLE_CONSISTENCY
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
        name = m.name or m.checkpoint_prefix or m.preset or (m.endpoint.model if m.endpoint else "")
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
            if not m.endpoint.base_url:
                raise InvalidArgument("required", field=f"{where}.endpoint.base_url")
            if not m.endpoint.model:
                raise InvalidArgument("required", field=f"{where}.endpoint.model")
            if m.endpoint.api_key_env and m.endpoint.api_key_env not in os.environ:
                raise FailedPrecondition(
                    f"environment variable {m.endpoint.api_key_env!r} is not set",
                    field=f"{where}.endpoint.api_key_env",
                )
        if not any(sources):
            bad = [b.name or b.kind for b in qa if b.kind != "video_chatgpt"]
            if bad:
                raise InvalidArgument(
                    f"a model without a source only has Video-ChatGPT predictions to judge, not {bad[0]!r}",
                    field=where,
                )
    if any(BENCHMARKS[b.kind].requires_judge for b in qa) and not (request.judge or settings.judge_base_url):
        raise InvalidArgument(
            "judge-scored open answers need a judge (request.judge or evaluator.judge_base_url)",
            field="judge",
        )
    if request.judge is not None:
        if not request.judge.base_url:
            raise InvalidArgument("required", field="judge.base_url")
        if request.judge.api_key_env and request.judge.api_key_env not in os.environ:
            raise FailedPrecondition(
                f"environment variable {request.judge.api_key_env!r} is not set", field="judge.api_key_env"
            )
