"""EvalService over real gRPC on 127.0.0.1:0 with a real LocalStore: a scripted OpenAI-protocol server is
the model and the judge; progress streams, the report comes back as ObjectRefs; requests that can never
run are INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from test_eval_support import (
    BLUE,
    RED,
    FakeOpenAI,
    make_store,
    write_mvbench,
    write_story_frames,
    write_videochatgpt,
)

from dreamframe.config import ServerSettings
from dreamframe.serving import GrpcServer, Registration, error_detail_from
from dreamframe.v1 import eval_pb2, eval_pb2_grpc
from services.evaluator.evaluate import Evaluator
from services.evaluator.request import EndpointSpec
from services.evaluator.server import EvalServicer, request_from_proto
from services.evaluator.settings import EvaluatorSettings

E = eval_pb2


@contextlib.asynccontextmanager
async def serving(store, tmp_path, **overrides):
    settings = EvaluatorSettings(work_dir=tmp_path / "work", num_frames=3, max_new_tokens=6, **overrides)
    servicer = EvalServicer(Evaluator(store, settings, model_cache_dir=tmp_path / "models"), settings)
    registration = Registration.of(eval_pb2, eval_pb2_grpc.add_EvalServiceServicer_to_server, servicer)
    server = GrpcServer(
        [registration], ServerSettings(host="127.0.0.1", port=0, metrics_port=-1), service_name="eval-test"
    )
    async with server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield eval_pb2_grpc.EvalServiceStub(channel)


async def collect(stub, request) -> list[eval_pb2.EvaluateResponse]:
    return [response async for response in stub.Evaluate(request, timeout=120)]


@pytest.mark.slow
def test_evaluate_over_grpc(tmp_path) -> None:
    store = make_store(tmp_path)
    mvbench = write_mvbench(store)["data_prefix"]
    vcgpt = write_videochatgpt(store)["data_prefix"]
    red = write_story_frames(store, "jobs/j/stories/000/frames/", RED, seed=1)
    blue = write_story_frames(store, "jobs/j/stories/001/frames/", BLUE, seed=2)
    with FakeOpenAI() as fake:
        request = E.EvaluateRequest(
            job_id="job-7",
            report_name="grpc-report",
            models=[E.ModelSpec(name="api", endpoint=E.OpenAIEndpoint(name="fake"))],
            benchmarks=[
                E.BenchmarkSpec(kind=E.BENCHMARK_KIND_MVBENCH, data_prefix=mvbench),
                E.BenchmarkSpec(kind=E.BENCHMARK_KIND_VIDEO_CHATGPT, name="vcgpt", data_prefix=vcgpt),
                E.BenchmarkSpec(
                    kind=E.BENCHMARK_KIND_STYLE_CONSISTENCY, name="style", frame_prefixes=[red, blue]
                ),
            ],
            judge=E.OpenAIEndpoint(name="fake-judge"),
        )
        entries = {
            "endpoints": {"fake": {"base_url": fake.base_url, "model": "vision"}},
            "judges": {"fake-judge": {"base_url": fake.base_url, "model": "judge"}},
        }

        async def go():
            async with serving(store, tmp_path, **entries) as stub:
                return await collect(stub, request)

        responses = asyncio.run(go())
    progress = [r.progress for r in responses if r.HasField("progress")]
    results = [r.result for r in responses if r.HasField("result")]
    assert len(results) == 1 and responses[-1].HasField("result")
    assert progress[-1].done == progress[-1].total == 4 + 4 + 2
    result = results[0]
    assert result.report_json.key == "reports/grpc-report/report.json"
    assert result.report_markdown.key == "reports/grpc-report/report.md"
    assert result.items_jsonl.key == "reports/grpc-report/items.jsonl"
    assert store.sha256(result.report_json.key) == result.report_json.sha256
    scores = {(s.model, s.benchmark, s.task): s for s in result.scores}
    assert scores[("api", "mvbench", "overall")].score == 100.0
    assert scores[("api", "mvbench", "overall")].unit == "accuracy"
    assert scores[("api", "vcgpt", "mean")].unit == "judge_score"
    assert scores[("api", "vcgpt", "mean")].failures == 1  # the judgment that never parsed
    gap = scores[("", "style", "gap")]
    assert gap.unit == "cosine" and gap.score > 0
    report = store.get_json(result.report_json.key)
    assert report["job_id"] == "job-7" and [m["name"] for m in report["models"]] == ["api"]


@pytest.mark.parametrize(
    ("benchmark", "field"),
    [
        (E.BenchmarkSpec(data_prefix="bench/x"), "benchmarks[0].kind"),
        (E.BenchmarkSpec(kind=E.BENCHMARK_KIND_MVBENCH), "benchmarks[0].data_prefix"),
        (
            E.BenchmarkSpec(kind=E.BENCHMARK_KIND_MVBENCH, data_prefix="bench/nothing-here"),
            "benchmarks[0].data_prefix",
        ),
        (E.BenchmarkSpec(kind=E.BENCHMARK_KIND_VIDEO_CHATGPT, data_prefix="bench/x"), "judge"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(tmp_path, benchmark, field) -> None:
    store = make_store(tmp_path)
    request = E.EvaluateRequest(
        report_name="bad", models=[E.ModelSpec(name="t", preset="tiny")], benchmarks=[benchmark]
    )

    async def go():
        async with serving(store, tmp_path) as stub:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, request)
            return err.value

    error = asyncio.run(go())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_detail_from(error).field == field


def test_request_conversion_keeps_every_field() -> None:
    request = request_from_proto(
        E.EvaluateRequest(
            report_name="r",
            job_id="j",
            ignore_cache=True,
            models=[
                E.ModelSpec(name="ckpt", checkpoint_prefix="runs/r/final", num_frames=16),
                E.ModelSpec(endpoint=E.OpenAIEndpoint(name="api", model="m")),
                E.ModelSpec(name="shipped"),
            ],
            benchmarks=[
                E.BenchmarkSpec(
                    kind=E.BENCHMARK_KIND_TEMPCOMPASS,
                    name="tc",
                    data_prefix="d",
                    video_prefix="v",
                    max_items=5,
                )
            ],
        )
    )
    ckpt, endpoint, shipped = request.models
    assert (ckpt.checkpoint_prefix, ckpt.num_frames, ckpt.endpoint) == ("runs/r/final", 16, None)
    assert endpoint.endpoint == EndpointSpec(name="api", model="m", base_url="")
    assert endpoint.checkpoint_prefix == ""
    assert (shipped.checkpoint_prefix, shipped.preset, shipped.endpoint) == ("", "", None)
    bench = request.benchmarks[0]
    assert (bench.kind, bench.name, bench.data_prefix, bench.video_prefix, bench.max_items) == (
        "tempcompass",
        "tc",
        "d",
        "v",
        5,
    )
    assert request.ignore_cache and request.judge is None and request.job_id == "j"
