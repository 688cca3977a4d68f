"""Evaluate models on benchmarks without a server: the same domain call the service makes.

    python -m services.evaluator.cli --name ckpt-vs-base \
        --model ours=checkpoint:runs/run-1/final/ --model base=preset:llava-1.5-7b \
        --benchmark mvbench=bench/mvbench/json --max-items 50

Models: ``LABEL=checkpoint:PREFIX``, ``LABEL=preset:NAME``, ``LABEL=endpoint:BASE_URL#MODEL`` (key from
``--api-key-env``) or ``LABEL=predictions`` (the answers shipped in Video-ChatGPT files). Benchmarks:
``KIND=DATA_PREFIX`` or ``KIND=DATA_PREFIX@VIDEO_PREFIX`` (KIND: mvbench, tempcompass, video_bench,
video_chatgpt, dreamframe_mc); ``--style FRAMES_PREFIX`` (repeatable, one per story) adds keyframe style
consistency. Storage and defaults come from the usual settings (DREAMFRAME_STORAGE__*,
DREAMFRAME_EVALUATOR__*); progress goes to stderr, the report's refs and headline scores to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys

from dreamframe.config import get_settings
from dreamframe.errors import DreamFrameError, InvalidArgument
from dreamframe.logging import configure_logging
from dreamframe.storage import open_store

from .benchmarks import STYLE_CONSISTENCY
from .evaluate import BenchmarkSpec, EndpointSpec, EvaluateRequest, EvaluateResult, Evaluator, ModelSpec
from .report import HEADLINE


def parse_model(text: str, *, num_frames: int, api_key_env: str) -> ModelSpec:
    label, _, source = text.partition("=")
    kind, _, value = source.partition(":")
    if kind == "checkpoint":
        return ModelSpec(name=label, checkpoint_prefix=value, num_frames=num_frames)
    if kind == "preset":
        return ModelSpec(name=label, preset=value, num_frames=num_frames)
    if kind == "endpoint":
        base_url, _, model = value.partition("#")
        return ModelSpec(
            name=label, endpoint=EndpointSpec(base_url, model, api_key_env), num_frames=num_frames
        )
    if source == "predictions":
        return ModelSpec(name=label)
    raise InvalidArgument(
        f"{text!r}: use LABEL=checkpoint:PREFIX, LABEL=preset:NAME, LABEL=endpoint:URL#MODEL "
        "or LABEL=predictions",
        field="--model",
    )


def parse_benchmark(text: str, *, max_items: int) -> BenchmarkSpec:
    kind, _, location = text.partition("=")
    data_prefix, _, video_prefix = location.partition("@")
    return BenchmarkSpec(kind, data_prefix=data_prefix, video_prefix=video_prefix, max_items=max_items)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.evaluator.cli", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--name", required=True, help="report name: outputs go to reports/<name>/")
    parser.add_argument(
        "--model", action="append", default=[], help="LABEL=SOURCE (repeatable; first = baseline)"
    )
    parser.add_argument("--benchmark", action="append", default=[], help="KIND=DATA_PREFIX[@VIDEO_PREFIX]")
    parser.add_argument("--style", action="append", default=[], help="a story's frames prefix (repeatable)")
    parser.add_argument("--max-items", type=int, default=0, help="per task (0: all)")
    parser.add_argument(
        "--num-frames", type=int, default=0, help="frames per video (0: evaluator.num_frames)"
    )
    parser.add_argument("--judge", default="", help="OpenAI-compatible judge: BASE_URL#MODEL")
    parser.add_argument("--api-key-env", default="", help="environment variable with the endpoints' API key")
    parser.add_argument("--job", default="", help="job id recorded in the report")
    parser.add_argument("--ignore-cache", action="store_true", help="recompute every answer and judgment")
    return parser.parse_args(argv)


def build_request(args: argparse.Namespace) -> EvaluateRequest:
    benchmarks = [parse_benchmark(b, max_items=args.max_items) for b in args.benchmark]
    if args.style:
        benchmarks.append(
            BenchmarkSpec(STYLE_CONSISTENCY, frame_prefixes=tuple(args.style), max_items=args.max_items)
        )
    judge = None
    if args.judge:
        base_url, _, model = args.judge.partition("#")
        judge = EndpointSpec(base_url, model, args.api_key_env)
    return EvaluateRequest(
        report_name=args.name,
        models=tuple(
            parse_model(m, num_frames=args.num_frames, api_key_env=args.api_key_env) for m in args.model
        ),
        benchmarks=tuple(benchmarks),
        job_id=args.job,
        judge=judge,
        ignore_cache=args.ignore_cache,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = get_settings()
    configure_logging(settings.log)  # logs to stderr: stdout carries only the JSON summary
    store = open_store(settings.storage)
    result = None
    try:
        evaluator = Evaluator(store, settings.evaluator, model_cache_dir=settings.models.cache_dir)
        for message in evaluator.evaluate(build_request(args)):
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
        f"{b['name']}/{model}": next((r["score"] for r in rows if r["task"] == HEADLINE.get(b["kind"])), None)
        for b in result.report["benchmarks"]
        for model, rows in b["scores"].items()
    }
    summary = {
        "report_json": result.report_json.__dict__,
        "report_markdown": result.report_markdown.__dict__,
        "items_jsonl": result.items_jsonl.__dict__,
        "headline": headline,
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
