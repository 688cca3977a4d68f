"""EvalService over gRPC: request → ``Evaluator.evaluate`` (in a worker thread) → progress + result.

An evaluation is long blocking work (model inference, storage I/O, judge calls), so it runs in a thread
and reports progress through a queue the RPC drains. When the caller goes away (cancel, deadline, server
shutdown after the grace period) the evaluation stops at its next item; every answer and verdict it got
is already in the answer cache, so a retry resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

from dreamframe.config import Settings
from dreamframe.enums import enum_name
from dreamframe.models.device import apply_memory_budget
from dreamframe.progress import Progress
from dreamframe.serving import (
    Done,
    Registration,
    ThreadJobs,
    progress_to_proto,
    run_service,
    serve,
    stream_from_thread,
)
from dreamframe.serving.readiness import StorageReadiness
from dreamframe.storage import open_store, to_proto
from dreamframe.storage.base import ObjectStore
from dreamframe.v1 import eval_pb2, eval_pb2_grpc
from services.evaluator.settings import EvaluatorSettings

from .benchmarks import STYLE_CONSISTENCY
from .evaluate import Evaluator
from .request import BenchmarkSpec, EndpointSpec, EvaluateRequest, EvaluateResult, ModelSpec

SERVICE = "evaluator"

KIND_NAMES = {
    eval_pb2.BENCHMARK_KIND_MVBENCH: "mvbench",
    eval_pb2.BENCHMARK_KIND_TEMPCOMPASS: "tempcompass",
    eval_pb2.BENCHMARK_KIND_VIDEO_BENCH: "video_bench",
    eval_pb2.BENCHMARK_KIND_VIDEO_CHATGPT: "video_chatgpt",
    eval_pb2.BENCHMARK_KIND_DREAMFRAME_MC: "dreamframe_mc",
    eval_pb2.BENCHMARK_KIND_STYLE_CONSISTENCY: STYLE_CONSISTENCY,
}


def _endpoint(message: eval_pb2.OpenAIEndpoint) -> EndpointSpec:
    return EndpointSpec(name=message.name, model=message.model, base_url=message.base_url)


def request_from_proto(request: eval_pb2.EvaluateRequest) -> EvaluateRequest:
    """Proto → domain request. Unknown or unspecified kinds pass through by their enum name for the
    domain to refuse, naming ``benchmarks[i].kind``."""
    models = []
    for m in request.models:
        source = m.WhichOneof("source")
        models.append(
            ModelSpec(
                name=m.name,
                checkpoint_prefix=m.checkpoint_prefix if source == "checkpoint_prefix" else "",
                endpoint=_endpoint(m.endpoint) if source == "endpoint" else None,
                preset=m.preset if source == "preset" else "",
                num_frames=m.num_frames,
            )
        )
    benchmarks = [
        BenchmarkSpec(
            kind=KIND_NAMES.get(b.kind, enum_name(eval_pb2.BenchmarkKind, b.kind)),
            name=b.name,
            data_prefix=b.data_prefix,
            video_prefix=b.video_prefix,
            max_items=b.max_items,
            frame_prefixes=tuple(b.frame_prefixes),
        )
        for b in request.benchmarks
    ]
    return EvaluateRequest(
        report_name=request.report_name,
        models=tuple(models),
        benchmarks=tuple(benchmarks),
        job_id=request.job_id,
        judge=_endpoint(request.judge) if request.HasField("judge") else None,
        ignore_cache=request.ignore_cache,
    )


def result_to_proto(result: EvaluateResult) -> eval_pb2.EvaluateResult:
    return eval_pb2.EvaluateResult(
        report_json=to_proto(result.report_json),
        report_markdown=to_proto(result.report_markdown),
        items_jsonl=to_proto(result.items_jsonl),
        scores=[
            eval_pb2.BenchmarkScore(
                model=s.model,
                benchmark=s.benchmark,
                task=s.task,
                score=s.score,
                items=s.items,
                failures=s.failures,
                unit=s.unit,
            )
            for s in result.scores
        ],
    )


class EvalServicer(eval_pb2_grpc.EvalServiceServicer):
    def __init__(self, evaluator: Evaluator, settings: EvaluatorSettings) -> None:
        self.evaluator = evaluator
        # One evaluation per report name at a time (a retried call waits for the first to stop), and a
        # bound on evaluations at once (each holds a model on the GPU).
        self._report_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._slots = asyncio.Semaphore(settings.max_concurrent_evaluations)
        # Evaluations outlive their RPC when the caller leaves, until they stop at their next item.
        self._running = ThreadJobs()

    async def Evaluate(  # noqa: N802 - the RPC's name
        self, request: eval_pb2.EvaluateRequest, context: object
    ) -> AsyncIterator[eval_pb2.EvaluateResponse]:
        domain_request = request_from_proto(request)

        def evaluate(emit: Callable[[Progress | EvaluateResult], None], stop: threading.Event) -> None:
            for message in self.evaluator.evaluate(domain_request, should_stop=stop.is_set):
                emit(message)

        async for message in stream_from_thread(
            evaluate,
            name=f"evaluate-{domain_request.report_name}",
            keep=self._running,
            hold=(self._report_locks[domain_request.report_name], self._slots),
        ):
            if not isinstance(message, Done):
                yield _response(message)


def _response(message: Progress | EvaluateResult) -> eval_pb2.EvaluateResponse:
    if isinstance(message, EvaluateResult):
        return eval_pb2.EvaluateResponse(result=result_to_proto(message))
    return eval_pb2.EvaluateResponse(progress=progress_to_proto(message))


def build_servicer(settings: Settings, store: ObjectStore | None = None) -> EvalServicer:
    store = store or open_store(settings.storage)
    evaluator = Evaluator(store, settings.evaluator, model_cache_dir=settings.models.cache_dir)
    return EvalServicer(evaluator, settings.evaluator)


async def amain(settings: Settings) -> None:
    # This process's share of a GPU that other services use too (0: the whole card). Models load per
    # evaluation and are closed after it, so nothing stays held between requests.
    apply_memory_budget(settings.models.gpu_memory_fraction, settings.evaluator.device)
    servicer = build_servicer(settings)
    store = servicer.evaluator.store

    # Benchmarks, checkpoints, the cache and reports are all in storage: it must answer.
    ready = StorageReadiness(store, "reports/")
    registration = Registration.of(eval_pb2, eval_pb2_grpc.add_EvalServiceServicer_to_server, servicer)
    try:
        await serve([registration], settings.server, service_name=SERVICE, readiness=ready)
    finally:
        store.close()


def main() -> None:
    run_service(amain)


if __name__ == "__main__":
    main()
