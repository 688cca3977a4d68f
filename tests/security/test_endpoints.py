"""Endpoints and credentials are the server's, not the caller's (evaluator).

Over real gRPC on 127.0.0.1: a local HTTP server stands for an attacker's OpenAI-compatible endpoint and
records every request's headers and body. A caller names it as a model endpoint or as the judge and asks
for a server secret (DREAMFRAME_STORAGE__SECRET_KEY) as the API key, the way the old proto's
``api_key_env`` field (number 3) did; the request is refused, and where the server does allow caller URLs
the recording server never sees the secret or any Authorization header. Naming an existing or a missing
environment variable gets the same answer. A configured entry's key goes to its own URL only. plot-llm
takes no caller endpoint at all: options.model only picks one of its configured models.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from test_eval_support import make_store, scripted_reply, write_mvbench

from dreamframe.config import ServerSettings
from dreamframe.serving import GrpcServer, Registration, error_detail_from
from dreamframe.v1 import eval_pb2, eval_pb2_grpc, plot_pb2, plot_pb2_grpc
from services.evaluator.evaluate import Evaluator
from services.evaluator.server import EvalServicer
from services.evaluator.settings import EvaluatorSettings
from services.plot_llm.server import PlotServicer
from services.plot_llm.service import PlotService
from services.plot_llm.settings import PlotSettings

E = eval_pb2
SECRET_VAR = "DREAMFRAME_STORAGE__SECRET_KEY"
SECRET = "storage-root-password-5f0c1e"
MISSING_VAR = "DREAMFRAME_NO_SUCH_VARIABLE_91"
VISION_KEY, JUDGE_KEY = "vision-key-a1b2c3", "judge-key-d4e5f6"


class Recorder:
    """An OpenAI-compatible chat server on 127.0.0.1:0 that records each request's headers and body."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        seen: Counter = Counter()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                recorder.requests.append(({k.lower(): v for k, v in self.headers.items()}, raw))
                content = scripted_reply(json.loads(raw), seen)
                payload = json.dumps(
                    {
                        "id": "x",
                        "object": "chat.completion",
                        "created": 0,
                        "model": "m",
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": content},
                            }
                        ],
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def everything(self) -> str:
        """Every header name, value and body byte received, as one text to search."""
        return "\n".join(
            json.dumps(headers) + "\n" + body.decode("utf-8", "replace") for headers, body in self.requests
        )

    def __enter__(self) -> Recorder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv(SECRET_VAR, SECRET)
    monkeypatch.delenv(MISSING_VAR, raising=False)
    # The openai client would read these when given nothing: a caller's URL must not get them either.
    monkeypatch.setenv("OPENAI_API_KEY", SECRET + "-openai")
    monkeypatch.setenv("OPENAI_ORG_ID", "org-" + SECRET)
    monkeypatch.setenv("OPENAI_PROJECT_ID", "proj-" + SECRET)


def legacy_endpoint(base_url: str, model: str, api_key_env: str) -> eval_pb2.OpenAIEndpoint:
    """An OpenAIEndpoint as a client built from the old proto sends it: base_url=1, model=2 and the
    environment variable to read the key from in field 3 (``api_key_env``)."""
    value = api_key_env.encode()
    field3 = bytes([3 << 3 | 2, len(value)]) + value
    return E.OpenAIEndpoint.FromString(
        E.OpenAIEndpoint(base_url=base_url, model=model).SerializeToString() + field3
    )


async def evaluate(
    store, tmp_path, settings: EvaluatorSettings, request
) -> tuple[list, grpc.aio.AioRpcError | None]:
    servicer = EvalServicer(Evaluator(store, settings, model_cache_dir=tmp_path / "models"), settings)
    registration = Registration.of(eval_pb2, eval_pb2_grpc.add_EvalServiceServicer_to_server, servicer)
    server = GrpcServer(
        [registration], ServerSettings(host="127.0.0.1", port=0, metrics_port=-1), service_name="eval-sec"
    )
    async with server, grpc.aio.insecure_channel(server.address) as channel:
        stub = eval_pb2_grpc.EvalServiceStub(channel)
        try:
            return [r async for r in stub.Evaluate(request, timeout=120)], None
        except grpc.aio.AioRpcError as error:
            return [], error


def settings_for(tmp_path, **overrides) -> EvaluatorSettings:
    return EvaluatorSettings(work_dir=tmp_path / "work", num_frames=2, max_new_tokens=6, **overrides)


def attack_request(store, where: str, endpoint: eval_pb2.OpenAIEndpoint) -> eval_pb2.EvaluateRequest:
    """The caller's endpoint as the model under test (MVBench) or as the judge of shipped predictions."""
    if where == "model":
        return E.EvaluateRequest(
            report_name="attack-model",
            models=[E.ModelSpec(name="mine", endpoint=endpoint)],
            benchmarks=[
                E.BenchmarkSpec(
                    kind=E.BENCHMARK_KIND_MVBENCH, data_prefix=write_mvbench(store)["data_prefix"]
                )
            ],
        )
    store.put_json(
        "bench/preds/generic_preds.json", [{"video_name": "v1", "Q": "Colour?", "A": "red", "pred": "red"}]
    )
    return E.EvaluateRequest(
        report_name="attack-judge",
        models=[E.ModelSpec(name="shipped")],
        benchmarks=[E.BenchmarkSpec(kind=E.BENCHMARK_KIND_VIDEO_CHATGPT, data_prefix="bench/preds")],
        judge=endpoint,
    )


FIELD = {"model": "models[0].endpoint", "judge": "judge"}


@pytest.mark.parametrize("where", ["model", "judge"])
def test_a_caller_url_asking_for_a_server_secret_is_refused(tmp_path, secret_env, where) -> None:
    store = make_store(tmp_path)
    with Recorder() as attacker:
        request = attack_request(store, where, legacy_endpoint(attacker.base_url, "m", SECRET_VAR))
        responses, error = asyncio.run(evaluate(store, tmp_path, settings_for(tmp_path), request))
    assert error is not None, "the evaluation ran against the caller's URL"
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_detail_from(error).field == f"{FIELD[where]}.base_url"
    assert SECRET not in error.details() and SECRET_VAR not in error.details()
    assert attacker.requests == []


@pytest.mark.parametrize("where", ["model", "judge"])
def test_allowed_caller_urls_never_carry_a_credential(tmp_path, secret_env, where) -> None:
    store = make_store(tmp_path)
    settings = settings_for(tmp_path, allow_caller_endpoints=True, judge_api_key=SECRET + "-judge")
    with Recorder() as attacker:
        request = attack_request(store, where, legacy_endpoint(attacker.base_url, "m", SECRET_VAR))
        responses, error = asyncio.run(evaluate(store, tmp_path, settings, request))
    assert error is None, error
    assert responses[-1].HasField("result")
    assert attacker.requests, "the caller's endpoint was not called"
    for headers, _ in attacker.requests:
        assert "authorization" not in headers and "proxy-authorization" not in headers
        assert not any(name.startswith("openai-") for name in headers), headers
    assert SECRET not in attacker.everything()


def test_naming_an_existing_or_a_missing_variable_gets_the_same_answer(tmp_path, secret_env) -> None:
    store = make_store(tmp_path)
    answers = []
    with Recorder() as attacker:
        for variable in (SECRET_VAR, MISSING_VAR):
            for where in ("model", "judge"):
                request = attack_request(store, where, legacy_endpoint(attacker.base_url, "m", variable))
                _, error = asyncio.run(evaluate(store, tmp_path, settings_for(tmp_path), request))
                assert error is not None
                answers.append((where, error.code(), error.details(), error_detail_from(error).field))
    assert answers[:2] == answers[2:]
    assert all(SECRET_VAR not in details and MISSING_VAR not in details for _, _, details, _ in answers)


def test_an_entry_name_is_not_a_way_to_probe_the_environment(tmp_path, secret_env) -> None:
    store = make_store(tmp_path)
    settings = settings_for(tmp_path, judges={"gpt": {"base_url": "http://127.0.0.1:9/v1", "model": "g"}})
    answers = []
    for variable in (SECRET_VAR, MISSING_VAR):
        request = attack_request(store, "judge", E.OpenAIEndpoint(name=variable))
        _, error = asyncio.run(evaluate(store, tmp_path, settings, request))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_detail_from(error).field == "judge.name"
        answers.append(error.details().replace(variable, "<name>"))
    assert answers[0] == answers[1]
    assert "unknown judge" in answers[0] and "gpt" in answers[0]


def test_configured_entries_send_their_key_to_their_own_url_only(tmp_path, secret_env, monkeypatch) -> None:
    store = make_store(tmp_path)
    monkeypatch.setenv("DF_TEST_VISION_KEY", VISION_KEY)
    key_file = tmp_path / "judge-api-key"
    key_file.write_text(JUDGE_KEY + "\n")
    data = write_mvbench(store)["data_prefix"]
    store.put_json(
        "bench/preds/generic_preds.json", [{"video_name": "v1", "Q": "Colour?", "A": "red", "pred": "red"}]
    )
    with Recorder() as vision, Recorder() as judge:
        settings = settings_for(
            tmp_path,
            endpoints={
                "vision": {
                    "base_url": vision.base_url,
                    "model": "vision",
                    "api_key_env": "DF_TEST_VISION_KEY",
                }
            },
            judges={"judge": {"base_url": judge.base_url, "model": "judge", "api_key_file": str(key_file)}},
        )
        request = E.EvaluateRequest(
            report_name="configured",
            models=[E.ModelSpec(name="shipped")],
            benchmarks=[E.BenchmarkSpec(kind=E.BENCHMARK_KIND_VIDEO_CHATGPT, data_prefix="bench/preds")],
            judge=E.OpenAIEndpoint(name="judge"),
        )
        responses, error = asyncio.run(evaluate(store, tmp_path, settings, request))
        assert error is None, error
        mc = E.EvaluateRequest(
            report_name="configured-mc",
            models=[E.ModelSpec(name="api", endpoint=E.OpenAIEndpoint(name="vision"))],
            benchmarks=[E.BenchmarkSpec(kind=E.BENCHMARK_KIND_MVBENCH, data_prefix=data)],
            judge=E.OpenAIEndpoint(name="judge"),
        )
        mc_responses, error = asyncio.run(evaluate(store, tmp_path, settings, mc))
        assert error is None, error

        # Unknown names and models outside the entry's list: INVALID_ARGUMENT naming the field.
        for bad, field in [
            (E.OpenAIEndpoint(name="x"), "judge.name"),
            (E.OpenAIEndpoint(name="judge", model="gpt-4o"), "judge.model"),
        ]:
            mc.judge.CopyFrom(bad)
            _, error = asyncio.run(evaluate(store, tmp_path, settings, mc))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_detail_from(error).field == field
            assert "DF_TEST_VISION_KEY" not in error.details() and "api_key" not in error.details()
    assert responses[-1].HasField("result") and mc_responses[-1].HasField("result")
    assert vision.requests and judge.requests
    assert {headers.get("authorization") for headers, _ in vision.requests} == {f"Bearer {VISION_KEY}"}
    assert {headers.get("authorization") for headers, _ in judge.requests} == {f"Bearer {JUDGE_KEY}"}
    assert JUDGE_KEY not in vision.everything() and VISION_KEY not in judge.everything()
    assert SECRET not in vision.everything() + judge.everything()


def test_plot_llm_takes_no_caller_endpoint_or_model(tmp_path, secret_env) -> None:
    """plot-llm's endpoint, key and models are its settings; options.model only picks a configured model."""
    store = make_store(tmp_path)
    with Recorder() as llm:
        service = PlotService(
            PlotSettings(backend="openai", model="scripted", base_url=llm.base_url, api_key=VISION_KEY), store
        )
        registration = Registration.of(
            plot_pb2, plot_pb2_grpc.add_PlotServiceServicer_to_server, PlotServicer(service)
        )

        async def call(model: str) -> grpc.RpcError:
            server = GrpcServer(
                [registration], ServerSettings(host="127.0.0.1", port=0, metrics_port=-1), service_name="plot"
            )
            async with server, grpc.aio.insecure_channel(server.address) as channel:
                request = plot_pb2.GenerateStoryRequest(
                    job_id="j", theme="a theme", options=plot_pb2.PlotOptions(model=model)
                )
                stub = plot_pb2_grpc.PlotServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    [r async for r in stub.GenerateStory(request, timeout=30)]
                return error.value

        for model in ("http://127.0.0.1:9/v1#" + "x" * 4000, SECRET_VAR + "/" + "y" * 4000):
            error = asyncio.run(call(model))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_detail_from(error).field == "options.model"
            assert len(error.details()) < 200  # a short prefix of the bad value, not the value
    assert llm.requests == []
