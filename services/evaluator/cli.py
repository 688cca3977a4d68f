"""Evaluate models on benchmarks without a server: the same domain call the service makes.

    python -m services.evaluator.cli --name ckpt-vs-base \
        --model ours=checkpoint:runs/run-1/final/ --model base=preset:llava-1.5-7b \
        --benchmark mvbench=bench/mvbench/json --max-items 50

Models: ``LABEL=checkpoint:PREFIX``, ``LABEL=preset:NAME``, ``LABEL=endpoint:NAME[#MODEL]`` (an entry of
``evaluator.endpoints``), ``LABEL=endpoint:BASE_URL#MODEL`` or ``LABEL=predictions`` (the answers shipped
in Video-ChatGPT files). ``--judge`` takes ``NAME[#MODEL]`` (an entry of ``evaluator.judges``) or
``BASE_URL#MODEL``. The command runs in-process as the operator, so a ``BASE_URL`` becomes an endpoint
entry of this run only (named after the model's label, or ``cli-judge``), its key read from the
environment variable ``--api-key-env`` names. Benchmarks:
``KIND=DATA_PREFIX`` or ``KIND=DATA_PREFIX@VIDEO_PREFIX`` (KIND: mvbench, tempcompass, video_bench,
video_chatgpt, dreamframe_mc); ``--style FRAMES_PREFIX`` (repeatable, one per story) adds keyframe style
consistency. Storage and defaults come from the usual settings (DREAMFRAME_STORAGE__*,
DREAMFRAME_EVALUATOR__*); progress goes to stderr, the report's refs and headline scores to stdout.
Exit status: 0 with scores; 1 when the report holds no score at all (every item failed); 2 when the
request is refused (bad arguments, or a benchmark none of whose items can be scored, such as Video-Bench
files without answers).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer
from pydantic import ValidationError

from dreamframe import commandline
from dreamframe.config import get_settings
from dreamframe.errors import DreamFrameError, InvalidArgument
from dreamframe.logging import configure_logging
from dreamframe.storage import open_store
from services.evaluator.settings import EndpointEntry, EvaluatorSettings

from .benchmarks import STYLE_CONSISTENCY
from .evaluate import Evaluator
from .report import HEADLINE
from .request import BenchmarkSpec, EndpointSpec, EvaluateRequest, EvaluateResult, ModelSpec

app = typer.Typer(add_completion=False, rich_markup_mode=None)


CLI_JUDGE = "cli-judge"


def parse_endpoint(
    text: str, *, entry_name: str, api_key_env: str, entries: dict[str, EndpointEntry]
) -> EndpointSpec:
    """``NAME[#MODEL]`` picks a configured entry; ``BASE_URL#MODEL`` adds one to ``entries``."""
    target, _, model = text.partition("#")
    if "://" not in target:
        return EndpointSpec(name=target, model=model)
    try:
        entries[entry_name] = EndpointEntry(base_url=target, model=model, api_key_env=api_key_env)
    except ValidationError as exc:
        raise InvalidArgument(f"{text!r}: use BASE_URL#MODEL ({exc.errors()[0]['msg']})") from None
    return EndpointSpec(name=entry_name)


def parse_model(
    text: str, *, num_frames: int, api_key_env: str, entries: dict[str, EndpointEntry]
) -> ModelSpec:
    label, _, source = text.partition("=")
    kind, _, value = source.partition(":")
    if kind == "checkpoint":
        return ModelSpec(name=label, checkpoint_prefix=value, num_frames=num_frames)
    if kind == "preset":
        return ModelSpec(name=label, preset=value, num_frames=num_frames)
    if kind == "endpoint":
        endpoint = parse_endpoint(value, entry_name=label, api_key_env=api_key_env, entries=entries)
        return ModelSpec(name=label, endpoint=endpoint, num_frames=num_frames)
    if source == "predictions":
        return ModelSpec(name=label)
    raise InvalidArgument(
        f"{text!r}: use LABEL=checkpoint:PREFIX, LABEL=preset:NAME, LABEL=endpoint:NAME[#MODEL], "
        "LABEL=endpoint:URL#MODEL or LABEL=predictions",
        field="--model",
    )


def parse_benchmark(text: str, *, max_items: int) -> BenchmarkSpec:
    kind, _, location = text.partition("=")
    data_prefix, _, video_prefix = location.partition("@")
    return BenchmarkSpec(kind, data_prefix=data_prefix, video_prefix=video_prefix, max_items=max_items)


def build_request(
    settings: EvaluatorSettings,
    *,
    name: str,
    models: list[str],
    benchmarks: list[str],
    style: list[str],
    max_items: int = 0,
    num_frames: int = 0,
    judge: str = "",
    api_key_env: str = "",
    job: str = "",
    ignore_cache: bool = False,
) -> tuple[EvaluateRequest, EvaluatorSettings]:
    """The request and the settings it runs with (the configured ones plus the entries the flags add)."""
    specs = [parse_benchmark(b, max_items=max_items) for b in benchmarks]
    if style:
        specs.append(BenchmarkSpec(STYLE_CONSISTENCY, frame_prefixes=tuple(style), max_items=max_items))
    endpoints, judges = dict(settings.endpoints), dict(settings.judges)
    model_specs = tuple(
        parse_model(m, num_frames=num_frames, api_key_env=api_key_env, entries=endpoints) for m in models
    )
    judge_spec = None
    if judge:
        judge_spec = parse_endpoint(judge, entry_name=CLI_JUDGE, api_key_env=api_key_env, entries=judges)
    request = EvaluateRequest(
        report_name=name,
        models=model_specs,
        benchmarks=tuple(specs),
        job_id=job,
        judge=judge_spec,
        ignore_cache=ignore_cache,
    )
    return request, settings.model_copy(update={"endpoints": endpoints, "judges": judges})


@app.command(help=__doc__.split("\n")[0])
def evaluate(
    name: Annotated[str, typer.Option(help="report name: outputs go to reports/<name>/")],
    model: Annotated[
        list[str] | None, typer.Option(help="LABEL=SOURCE (repeatable; first = baseline)")
    ] = None,
    benchmark: Annotated[list[str] | None, typer.Option(help="KIND=DATA_PREFIX[@VIDEO_PREFIX]")] = None,
    style: Annotated[list[str] | None, typer.Option(help="a story's frames prefix (repeatable)")] = None,
    max_items: Annotated[int, typer.Option(help="per task (0: all)")] = 0,
    num_frames: Annotated[int, typer.Option(help="frames per video (0: evaluator.num_frames)")] = 0,
    judge: Annotated[str, typer.Option(help="judge: a configured NAME[#MODEL] or BASE_URL#MODEL")] = "",
    api_key_env: Annotated[
        str, typer.Option(help="environment variable with the API key of the BASE_URL endpoints given here")
    ] = "",
    job: Annotated[str, typer.Option(help="job id recorded in the report")] = "",
    ignore_cache: Annotated[
        bool, typer.Option("--ignore-cache", help="recompute every answer and judgment")
    ] = False,
) -> int:
    settings = get_settings()
    configure_logging(settings.log)  # logs to stderr: stdout carries only the JSON summary
    store = open_store(settings.storage)
    result = None
    try:
        request, evaluator_settings = build_request(
            settings.evaluator,
            name=name,
            models=model or [],
            benchmarks=benchmark or [],
            style=style or [],
            max_items=max_items,
            num_frames=num_frames,
            judge=judge,
            api_key_env=api_key_env,
            job=job,
            ignore_cache=ignore_cache,
        )
        evaluator = Evaluator(store, evaluator_settings, model_cache_dir=settings.models.cache_dir)
        for message in evaluator.evaluate(request):
            if isinstance(message, EvaluateResult):
                result = message
            else:
                m = message
                print(f"[{m.unit}] {m.done}/{m.total} {m.current_item} {m.message}".rstrip(), file=sys.stderr)
    except DreamFrameError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    assert result is not None
    headline = {
        f"{b['name']}/{label}": next((r["score"] for r in rows if r["task"] == HEADLINE.get(b["kind"])), None)
        for b in result.report["benchmarks"]
        for label, rows in b["scores"].items()
    }
    summary = {
        "report_json": result.report_json.__dict__,
        "report_markdown": result.report_markdown.__dict__,
        "items_jsonl": result.items_jsonl.__dict__,
        "headline": headline,
    }
    print(json.dumps(summary, indent=2))
    if not any(
        row["score"] is not None
        for b in result.report["benchmarks"]
        for rows in b["scores"].values()
        for row in rows
    ):
        # Every item failed (model, video or judge errors): the report says why, but it holds no score.
        print(f"error: no item could be scored; see {result.report_markdown.key}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); the exit status (a usage error
    raises ``SystemExit(2)`` as argparse did)."""
    return commandline.run(app, argv)


if __name__ == "__main__":
    sys.exit(main())
