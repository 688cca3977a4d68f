"""GPU sharing when several services run on one GPU (local runner) and readiness before calls.

- The local runner's budgets for a one-GPU box (80 GiB: the story group and the training group take the
  card in turns; 141 GB: everything at once), in each process's environment, overridable.
- A service applies its budget with torch.cuda.set_per_process_memory_fraction (the call checked with a
  stand-in on this CPU machine); over budget is RESOURCE_EXHAUSTED naming models.gpu_memory_fraction.
- Idle release over real gRPC: the renderer drops its engine after idle_release_s (the holder is empty,
  the engine garbage collected), the next request loads it again and succeeds.
- Two service processes started under the policy each apply their own budget and release after idle.
- The coordinator waits for a service that is not listening, then NOT_SERVING (a slow preload), and calls
  it once SERVING; it fails with a clear error naming the setting after service_ready_timeout_s.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import socket
import time
import weakref

import grpc
import pytest
import torch
from pydantic import ValidationError

from dreamframe import keys
from dreamframe.cli import local
from dreamframe.config import ClientSettings, ServerSettings, load_settings
from dreamframe.errors import InvalidArgument, ResourceExhausted, Unavailable
from dreamframe.models import device as gpu
from dreamframe.models.holder import ModelHolder
from dreamframe.serving import GrpcServer, Registration
from dreamframe.serving.client import make_channel
from dreamframe.serving.readiness import StorageReadiness
from dreamframe.storage import LocalStore, to_proto
from dreamframe.story import Story, StoryItem, Substory, TinyStory
from dreamframe.v1 import common_pb2, plot_pb2, plot_pb2_grpc, render_pb2, render_pb2_grpc
from dreamframe.v1 import coordinator_pb2 as pb
from services.coordinator import stages as st
from services.coordinator.clients import Clients
from services.coordinator.readiness import ServiceReadiness
from services.coordinator.settings import CoordinatorSettings
from services.keyframe_renderer.renderer import Renderer
from services.keyframe_renderer.server import RenderServicer
from services.keyframe_renderer.settings import RendererSettings
from services.plot_llm.scripted_server import ScriptedChatServer
from services.plot_llm.server import PlotServicer
from services.plot_llm.service import PlotService
from services.plot_llm.settings import PlotSettings

SDXL_ENV = {
    "DREAMFRAME_RENDERER__PRESET": "sdxl",
    "DREAMFRAME_STYLE__PRESET": "sdxl",
    "DREAMFRAME_TRAINER__PRESET": "llava-1.5-7b",
    "DREAMFRAME_PLOT__BACKEND": "openai",
}


def run(coro, timeout: float = 60.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# --- the policy ----------------------------------------------------------------------------------------
def shares_for(card_gib: float, **policy) -> dict[str, local.GpuShare]:
    plan, _ = local.service_plan(renderers=policy.pop("renderers", 1), gpus=policy.pop("gpus", 0))
    gpu_policy = local.GpuPolicy(local.gpu_services_for(SDXL_ENV), card_gib=card_gib, **policy)
    return {s.name: s for s in local.plan_gpu_sharing(plan, gpu_policy)}


def test_an_80_gib_card_is_shared_in_turns_and_each_turn_fits():
    shares = shares_for(80.0)
    assert set(shares) == {"style-trainer", "keyframe-renderer", "trainer", "evaluator"}
    assert {s.mode for s in shares.values()} == {"phased"}  # 110 GiB of needs do not fit at once
    reserve = (local.SLACK_GIB + local.CONTEXT_GIB * 4) / 80.0
    stories = shares["style-trainer"].fraction + shares["keyframe-renderer"].fraction
    training = shares["trainer"].fraction + shares["evaluator"].fraction
    assert stories <= 1 - reserve + 1e-3 and training <= 1 - reserve + 1e-3
    assert shares["keyframe-renderer"].gib >= 28 and shares["trainer"].gib >= 40
    # In turns only works when the story group lets go soon: short idle release for everyone.
    assert {s.idle_release_s for s in shares.values()} == {local.PHASED_IDLE_RELEASE_S}


def test_a_141_gb_card_holds_every_gpu_service_at_once():
    shares = shares_for(140.4)  # what nvidia-smi reports for an H200 (143,771 MiB)
    assert {s.mode for s in shares.values()} == {"concurrent"}
    assert sum(s.gib for s in shares.values()) <= 140.4 - local.SLACK_GIB - 4 * local.CONTEXT_GIB + 0.1
    for name, share in shares.items():
        assert share.gib >= local.GPU_NEEDS_GIB[name], name
    assert shares["keyframe-renderer"].idle_release_s == 300 and shares["style-trainer"].idle_release_s == 120


def test_overrides_a_gpu_of_its_own_and_the_tiny_preset():
    shares = shares_for(80.0, budgets={"keyframe-renderer": 0.25}, idle_release_s=5.0)
    assert (shares["keyframe-renderer"].fraction, shares["keyframe-renderer"].mode) == (0.25, "override")
    assert {s.idle_release_s for s in shares.values()} == {5.0}
    # Two GPUs: replica 1 has GPU 1 to itself (no budget, no release); replica 0 shares GPU 0.
    spread = shares_for(80.0, renderers=2, gpus=2)
    assert (spread["keyframe-renderer-1"].gpu, spread["keyframe-renderer-1"].fraction) == (1, 0.0)
    assert spread["keyframe-renderer-1"].idle_release_s == 0.0
    assert spread["keyframe-renderer"].fraction > 0 and spread["keyframe-renderer"].idle_release_s > 0
    assert local.gpu_services_for({"DREAMFRAME_RENDERER__PRESET": "tiny"}) == frozenset()


def test_each_process_gets_its_budget_in_its_environment(monkeypatch):
    monkeypatch.delenv(local.FRACTION_ENV, raising=False)
    monkeypatch.delenv(local.IDLE_ENV, raising=False)
    plan, _ = local.service_plan()
    policy = local.GpuPolicy(local.gpu_services_for(SDXL_ENV), card_gib=80.0)
    planned = {p.name: p for p in local.with_gpu_shares(plan, local.plan_gpu_sharing(plan, policy))}
    assert planned["keyframe-renderer"].env[local.FRACTION_ENV] == "0.518"
    assert planned["keyframe-renderer"].env[local.IDLE_ENV] == "30"
    assert local.FRACTION_ENV not in planned["qa-generator"].env  # CPU services: nothing
    # What the caller's environment sets wins for every service.
    monkeypatch.setenv(local.FRACTION_ENV, "0.2")
    planned = {p.name: p for p in local.with_gpu_shares(plan, local.plan_gpu_sharing(plan, policy))}
    assert local.FRACTION_ENV not in planned["keyframe-renderer"].env


# --- applying a budget ---------------------------------------------------------------------------------
def test_the_budget_is_applied_with_the_allocator_call_and_validated(monkeypatch):
    calls = []
    applied = gpu.apply_memory_budget(0.3, torch.device("cuda", 0), setter=lambda f, d: calls.append((f, d)))
    assert applied == 0.3 and calls == [(0.3, torch.device("cuda", 0))]
    assert gpu.memory_budget(torch.device("cuda", 0)) == 0.3
    calls.clear()
    assert gpu.apply_memory_budget(0.3, "cpu", setter=lambda f, d: calls.append(f)) is None and not calls
    assert gpu.apply_memory_budget(0.0, torch.device("cuda", 0), setter=lambda f, d: calls.append(f)) is None
    assert not calls, "0 means the whole card: no cap"
    with pytest.raises(InvalidArgument) as bad:
        gpu.apply_memory_budget(1.5, torch.device("cuda", 0), setter=lambda f, d: None)
    assert bad.value.field == gpu.BUDGET_SETTING
    monkeypatch.setenv(gpu.BUDGET_ENV, "1.5")  # a service refuses to start with it, naming the setting
    with pytest.raises(ValidationError, match="gpu_memory_fraction"):
        load_settings()


def test_running_out_within_the_budget_is_resource_exhausted_naming_the_setting():
    def out_of_memory(key: str):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    holder = ModelHolder(out_of_memory, name="keyframe-renderer")
    with pytest.raises(ResourceExhausted) as loading:
        holder.get("sdxl")
    assert loading.value.field == "models.gpu_memory_fraction"
    assert "keyframe-renderer" in loading.value.message and "--gpu-budget" in loading.value.message
    holder = ModelHolder(lambda key: object(), name="style-trainer")
    with pytest.raises(ResourceExhausted), holder.use("tiny"):
        raise torch.OutOfMemoryError("CUDA out of memory")
    assert not holder.in_use("tiny")


# --- idle release over real gRPC -----------------------------------------------------------------------
def story_ref(store: LocalStore, job: str, frames: int) -> common_pb2.ObjectRef:
    items = [StoryItem(kind="frame", text=f"scene {i}: a cat sits on a roof") for i in range(frames)]
    story = Story(overview="cats", substories=[Substory(tiny_stories=[TinyStory(items=items)])])
    return to_proto(store.put_bytes(keys.story_key(job), story.to_json().encode()))


def test_renderer_releases_its_engine_after_idle_and_reloads_on_the_next_request(tmp_path):
    store = LocalStore(tmp_path / "store", "dreamframe")
    cache_dir = tmp_path / "models"
    renderer = Renderer(store, RendererSettings(device="cpu"), cache_dir=cache_dir, idle_release_s=0.5)
    servicer = RenderServicer(renderer)
    settings = ServerSettings(host="127.0.0.1", port=0, metrics_port=-1, grace_seconds=5.0)
    registration = Registration.of(render_pb2, render_pb2_grpc.add_RenderServiceServicer_to_server, servicer)
    ref = story_ref(store, "idle", 2)

    def request(job: str) -> render_pb2.RenderFramesRequest:
        return render_pb2.RenderFramesRequest(
            job_id=job, story=ref, options=render_pb2.RenderOptions(steps=4, batch_size=2, overwrite=True)
        )

    async def go():
        async with GrpcServer([registration], settings, service_name="keyframe-renderer") as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = render_pb2_grpc.RenderServiceStub(channel)
                first = [m async for m in stub.RenderFrames(request("idle"))]
                assert renderer.engines.loaded() == ["tiny"]
                engine = weakref.ref(renderer.engines.get("tiny"))
                deadline = time.monotonic() + 10
                while renderer.engines.loaded() and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                released = renderer.engines.loaded()
                gc.collect()
                collected = engine() is None
                second = [m async for m in stub.RenderFrames(request("idle"))]
                return first, released, collected, second

    try:
        first, released, collected, second = run(go())
    finally:
        renderer.close()
    assert released == [], "the holder is empty after idle_release_s without work"
    assert collected, "nothing else keeps the released engine (its memory is given back)"
    assert first[-1].summary.rendered == 2 and second[-1].summary.rendered == 2
    assert renderer.engines.loads == 2 and renderer.engines.releases >= 1


def test_a_model_in_use_is_never_released():
    now = [0.0]
    holder = ModelHolder(lambda key: object(), idle_release_s=1.0, clock=lambda: now[0])
    with holder.use("a"):
        now[0] = 100.0
        assert holder.release_idle() == [] and holder.loaded() == ["a"]
    assert holder.release_idle() == []  # idle time counts from the end of the use
    now[0] = 101.5
    assert holder.release_idle() == ["a"] and holder.loaded() == []
    holder.close()


# --- two service processes under the policy -------------------------------------------------------------
@pytest.mark.slow
def test_two_gpu_service_processes_apply_their_budgets_and_release_after_idle(tmp_path):
    """The local runner's plan for a one-GPU sdxl box, run with tiny models on this CPU: each process
    gets its own budget (applied at start: on a CPU it says so and caps nothing) and idle release."""
    plan, _ = local.service_plan(base_port=_free_port_block())
    policy = local.GpuPolicy(local.gpu_services_for(SDXL_ENV), card_gib=80.0, idle_release_s=1.0)
    shares = {s.name: s for s in local.plan_gpu_sharing(plan, policy)}
    planned = {p.name: p for p in local.with_gpu_shares(plan, list(shares.values()))}
    env = {
        "DREAMFRAME_STORAGE__BACKEND": "local",
        "DREAMFRAME_STORAGE__ROOT": str(tmp_path / "store"),
        "DREAMFRAME_MODELS__CACHE_DIR": str(tmp_path / "models"),
        "DREAMFRAME_RENDERER__DEVICE": "cpu",
        "DREAMFRAME_STYLE__DEVICE": "cpu",
        "DREAMFRAME_LOG__LEVEL": "INFO",
        "HF_HUB_OFFLINE": "1",
    }
    procs = [
        local.spawn(planned[name], env, tmp_path / f"{name}.log")
        for name in ("keyframe-renderer", "style-trainer")
    ]
    try:
        local.wait_healthy(procs, timeout=180)
        renderer = procs[0]
        store = LocalStore(tmp_path / "store", "dreamframe")
        ref = story_ref(store, "two", 2)

        async def render() -> int:
            async with grpc.aio.insecure_channel(f"{local.HOST}:{renderer.port}") as channel:
                stub = render_pb2_grpc.RenderServiceStub(channel)
                options = render_pb2.RenderOptions(steps=4, batch_size=2, overwrite=True)
                request = render_pb2.RenderFramesRequest(job_id="two", story=ref, options=options)
                return [m async for m in stub.RenderFrames(request, timeout=60)][-1].summary.rendered

        def log(name: str) -> str:
            return (tmp_path / f"{name}.log").read_text()

        _wait_for(lambda: "released" in log("keyframe-renderer") and "released" in log("style-trainer"))
        assert run(render()) == 2, "the next request after a release loads the engine again"
        _wait_for(lambda: log("keyframe-renderer").count("released") >= 2)
    finally:
        local.stop_processes(procs, grace=5)
    for name in ("keyframe-renderer", "style-trainer"):
        text = log(name)
        fraction = f"{shares[name].fraction:.3f}"
        assert planned[name].env[local.FRACTION_ENV] == fraction
        assert re.search(rf"gpu_memory_fraction={fraction} ignored: models run on cpu", text), text[-2000:]
        assert "released" in text
    assert log("keyframe-renderer").count("loaded tiny") == 2  # preload, then the request after release


def _free_port_block() -> int:
    """A base port whose next 20 ports were free a moment ago."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + 20 < 65535 and all(_free(base + i) for i in range(20)):
            return base
    raise RuntimeError("no free port block")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.2)


# --- the coordinator waits for readiness ---------------------------------------------------------------
THEME = "a lighthouse keeper finds a message in a bottle"
OPTIONS = plot_pb2.PlotOptions(
    substories=1, tiny_stories=1, frames_per_tiny_story=2, dialogues_per_tiny_story=1, min_locations=3, seed=5
)


class SlowPlot:
    """plot-llm on ``port`` that starts listening after ``listen_after`` s and says NOT_SERVING for
    ``preload_s`` more (a model loading), recording when GenerateStory was called."""

    def __init__(self, store: LocalStore, llm: ScriptedChatServer, port: int, listen_after: float, preload_s):
        self.service = PlotService(
            PlotSettings(backend="openai", model="scripted", base_url=llm.base_url), store
        )
        self.port, self.listen_after, self.preload_s = port, listen_after, preload_s
        self.store = store
        self.called_at: list[float] = []
        self.ready_at: float | None = None

    @contextlib.asynccontextmanager
    async def running(self):
        servicer = PlotServicer(self.service)
        original = servicer.GenerateStory

        async def generate(request, context):
            self.called_at.append(time.monotonic())
            async for response in original(request, context):
                yield response

        servicer.GenerateStory = generate
        registration = Registration.of(plot_pb2, plot_pb2_grpc.add_PlotServiceServicer_to_server, servicer)

        async def preload() -> None:
            await asyncio.sleep(self.preload_s)
            self.ready_at = time.monotonic()

        async def serve() -> None:
            await asyncio.sleep(self.listen_after)
            ready = StorageReadiness(self.store, "jobs/")
            settings = ServerSettings(host="127.0.0.1", port=self.port, metrics_port=-1, grace_seconds=1.0)
            server = GrpcServer(
                [registration], settings, service_name="plot-llm", readiness=ready, readiness_interval=0.2
            )
            ready.track(asyncio.ensure_future(preload()))
            async with server:
                await asyncio.Event().wait()

        task = asyncio.create_task(serve())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.service.aclose()


def plot_context(store: LocalStore, address: str, *, ready_timeout: float | None) -> st.JobContext:
    channel = make_channel(address, ClientSettings())
    readiness = None
    if ready_timeout is not None:
        readiness = ServiceReadiness(
            lambda a: make_channel(a, ClientSettings()),
            {"plot-llm": [address]},
            timeout_s=ready_timeout,
            poll_s=0.2,
        )
    clients = Clients(
        plot=plot_pb2_grpc.PlotServiceStub(channel),
        style=None,
        renderers=[],
        qa=None,
        train=None,
        eval=None,
        channels=[channel],
        readiness=readiness,
    )
    job = pb.Job(job_id="ready", spec=pb.JobSpec(stories=[pb.StoryInput(theme=THEME)], plot=OPTIONS))
    job.stages.add(stage=pb.STAGE_PLOT)

    async def changed(persist: bool) -> None:
        return None

    return st.JobContext(job, store, clients, CoordinatorSettings(), changed)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_coordinator_waits_for_a_service_still_loading_then_calls_it(tmp_path):
    store = LocalStore(tmp_path / "store", "dreamframe")

    async def go(ready_timeout: float | None):
        port = _port()
        with ScriptedChatServer() as llm:
            async with SlowPlot(store, llm, port, listen_after=3.0, preload_s=2.0).running() as slow:
                ctx = plot_context(store, f"127.0.0.1:{port}", ready_timeout=ready_timeout)
                started = time.monotonic()
                try:
                    await st.plot(ctx, 0)
                    return slow, time.monotonic() - started, ctx.output(pb.STAGE_PLOT, "story/000")
                finally:
                    await ctx.clients.close()

    # Without waiting: the call meets a service that is not listening yet and fails after gRPC's retries.
    with pytest.raises(grpc.aio.AioRpcError) as early:
        run(go(None))
    assert early.value.code() == grpc.StatusCode.UNAVAILABLE
    slow, seconds, story = run(go(60.0))
    assert story is not None, "the stage succeeded"
    assert slow.ready_at is not None and slow.called_at and slow.called_at[0] >= slow.ready_at
    assert seconds >= 5.0 - 0.5  # 3 s not listening + 2 s NOT_SERVING


def test_coordinator_gives_up_after_service_ready_timeout_with_a_clear_error(tmp_path):
    store = LocalStore(tmp_path / "store", "dreamframe")

    async def go():
        port = _port()
        with ScriptedChatServer() as llm:
            async with SlowPlot(store, llm, port, listen_after=0.0, preload_s=3600).running() as slow:
                ctx = plot_context(store, f"127.0.0.1:{port}", ready_timeout=2.0)
                started = time.monotonic()
                try:
                    with pytest.raises(Unavailable) as failed:
                        await st.plot(ctx, 0)
                finally:
                    await ctx.clients.close()
                return failed.value, time.monotonic() - started, slow.called_at

    error, seconds, called = run(go())
    assert error.field == "coordinator.service_ready_timeout_s"
    assert "plot-llm" in error.message and "NOT_SERVING" in error.message and "2 s" in error.message
    assert 2.0 <= seconds < 10.0 and not called, "never called while not ready"


def test_static_renderer_lists_are_waited_for_and_discovered_ones_are_not():
    from services.coordinator.clients import addresses_of

    static = addresses_of(CoordinatorSettings(renderer_addresses="127.0.0.1:1,127.0.0.1:2"))
    assert static["keyframe-renderer"] == ["127.0.0.1:1", "127.0.0.1:2"]
    assert static["trainer"] == ["127.0.0.1:50065"]
    assert addresses_of(CoordinatorSettings(renderer_addresses="dns:///r:1"))["keyframe-renderer"] == []


@pytest.fixture(autouse=True)
def _no_budget_left_behind():
    yield
    gpu._budgets.clear()


def test_up_refuses_a_bad_gpu_budget_before_starting_anything(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dreamframe.cli import commands as cli
    from dreamframe.config import get_settings

    monkeypatch.setenv("DREAMFRAME_CLI__STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("COLUMNS", "200")
    get_settings.cache_clear()
    try:
        for bad in ("renderer=0.3", "keyframe-renderer=1.5", "trainer"):
            result = CliRunner().invoke(cli.app, ["up", "--gpu-budget", bad])
            assert result.exit_code == 2, result.output
            assert "--gpu-budget" in result.output and "SERVICE=FRACTION" in result.output
        assert not local.running_services(tmp_path / "state")
        policy = cli._gpu_policy(SDXL_ENV, ["keyframe-renderer=0.3", "keyframe-renderer-1=0.2"], 141.0, 10.0)
        assert policy.budgets == {"keyframe-renderer": 0.3, "keyframe-renderer-1": 0.2}
        assert policy.gpu_services == {"keyframe-renderer", "style-trainer", "trainer", "evaluator"}
        assert (policy.card_gib, policy.idle_release_s) == (141.0, 10.0)
    finally:
        get_settings.cache_clear()
