"""The compile cache (dreamframe.models.compile_cache): keys, signed bundles refused when planted,
unsigned or tampered, and a second process that reuses the first one's artifacts instead of compiling."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from dreamframe.models import compile_cache as cc
from dreamframe.models.compile_cache import CacheRefused, CompileCache, CompileCacheSettings
from dreamframe.storage import LocalStore

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("compile_cache_child.py")
KEY = "k" * 40


def settings(tmp_path: Path, **values) -> CompileCacheSettings:
    return CompileCacheSettings(dir=tmp_path / "local", key=KEY, key_file=None, **values)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store", "dreamframe")


@pytest.fixture(autouse=True)
def _keep_inductor_dir(monkeypatch):
    # CompileCache points TORCHINDUCTOR_CACHE_DIR at its dir when unset: keep this process's as it was.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/tmp/ti-test"))


# --- keys ----------------------------------------------------------------------------------------------
def test_any_change_is_another_key():
    env = {"torch": "2.13.0", "triton": "3.7.1", "python": "3.11.7", "machine": "x86_64", "device": "cpu"}
    model = {"preset": "sdxl-random", "configs": cc.config_hash({"block_out_channels": [320, 640, 1280]})}
    options = {"compile_mode": "default", "fuse_qkv": True}
    workload = {"batch": 16, "width": 1024, "height": 1024}

    def key(service="keyframe-renderer", **changes):
        parts = {"model": model, "options": options, "workload": workload, "env": env}
        return cc.cache_key(service, **{k: {**v, **changes.get(k, {})} for k, v in parts.items()})

    base = key()
    assert base == key()
    changed = [
        key("style-trainer"),
        key(model={"configs": cc.config_hash({"block_out_channels": [32, 64]})}),
        key(model={"preset": "sdxl"}),
        key(options={"compile_mode": "max-autotune"}),
        key(options={"fuse_qkv": False}),
        key(workload={"batch": 8}),
        key(env={"torch": "2.14.0"}),
        key(env={"triton": "3.8.0"}),
        key(env={"python": "3.12.1"}),
        key(env={"device": "NVIDIA H200|sm_90"}),
    ]
    assert len({base, *changed}) == len(changed) + 1


def test_environment_names_versions_and_the_device():
    import torch

    env = cc.environment("cpu")
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert env["python"].count(".") == 2 and env["triton"]


def test_engine_keys_follow_options_and_shapes(tmp_path):
    from dreamframe.models import sdxl
    from services.keyframe_renderer.engine import EngineOptions, SDXLEngine
    from services.keyframe_renderer.options import RenderOptions, resolve_options

    pipes = sdxl.load_sdxl("tiny", model_paths={}, cache_dir=tmp_path / "models", device="cpu")
    cache = CompileCache(settings(tmp_path), service="keyframe-renderer")
    engine = SDXLEngine(pipes, model_id="tiny", options=EngineOptions(), compile_cache=cache)
    params = resolve_options(
        RenderOptions(width=64, height=64),
        preset="tiny",
        resolution=64,
        default_batch_size=1,
        compile_default=True,
    )
    one = engine.workload(1, params, True)
    two = engine.workload(2, params, True)
    keys = {
        engine.cache_key(one, "default"),
        engine.cache_key(two, "default"),
        engine.cache_key(one, "max-autotune"),
        engine.choice_key(),
    }
    assert len(keys) == 4
    model = engine.cache_model()
    assert model["preset"] == "tiny" and len(model["configs"]) == 16


# --- signing and refusal --------------------------------------------------------------------------------
def test_seal_round_trip_and_every_kind_of_bad_bundle_is_refused():
    sealed = cc.seal(KEY.encode(), "abc", b"payload", {"mode": "default"})
    assert cc.unseal(KEY.encode(), "abc", sealed) == (b"payload", {"mode": "default"})
    tampered = bytearray(sealed)
    tampered[-40] ^= 1  # a payload byte
    bad = {
        "unsigned": b"payload",
        "other key": cc.seal(b"x" * 40, "abc", b"payload"),
        "tampered": bytes(tampered),
        "replayed for another key": cc.seal(KEY.encode(), "other", b"payload"),
        "truncated": sealed[:-1],
        "empty": b"",
    }
    for what, data in bad.items():
        with pytest.raises(CacheRefused):
            cc.unseal(KEY.encode(), "abc", data)
        assert what


class Planted:
    """A pickle that writes a marker file when unpickled: what an attacker would plant."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_planted_unsigned_and_tampered_artifacts_are_refused_and_never_loaded(tmp_path, store, monkeypatch):
    import torch

    loaded: list[bytes] = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: loaded.append(data))
    marker = tmp_path / "pwned"
    malicious = pickle.dumps(Planted(marker))
    cache = CompileCache(settings(tmp_path), service="keyframe-renderer", store=store)
    key = cache.key(model={"preset": "tiny"}, options={"compile_mode": "default"})
    object_key = cache.object_key(key)
    assert object_key == f"compile-cache/keyframe-renderer/{key}.bin"

    def plant(data: bytes) -> None:
        store.put_bytes(object_key, data)
        cache.local_path(key).unlink(missing_ok=True)

    tampered = bytearray(cc.seal(KEY.encode(), key, malicious))
    tampered[len(tampered) // 2] ^= 0x40
    plants = {
        "raw pickle": malicious,
        "signed with another secret": cc.seal(b"attacker-secret-of-forty-characters!!!!", key, malicious),
        "tampered": bytes(tampered),
        "valid bundle of another key": cc.seal(KEY.encode(), "0" * 40, malicious),
    }
    for what, data in plants.items():
        plant(data)
        session = cache.session(key)
        assert not session.hit, what
    # A planted local copy too (the model-cache volume): refused and removed.
    cache.local_path(key).parent.mkdir(parents=True, exist_ok=True)
    cache.local_path(key).write_bytes(malicious)
    store.delete(object_key)
    assert not cache.session(key).hit
    assert not cache.local_path(key).exists()
    assert loaded == [] and not marker.exists()
    assert cache.stats.refused == len(plants) + 1 and cache.stats.hits == 0
    # A planted "choice" (e.g. forcing a slow mode) is refused the same way.
    store.put_bytes(cache.object_key("c" * 40, cc.CHOICE_SUFFIX), b'{"mode": "max-autotune"}')
    assert cache.choice("c" * 40) is None
    # The genuine article passes.
    store.put_bytes(object_key, cc.seal(KEY.encode(), key, b"torch bytes", {"mode": "default"}))
    assert cache.session(key).hit and loaded == [b"torch bytes"]


def test_no_key_no_cache(tmp_path, store, caplog):
    cache = CompileCache(
        CompileCacheSettings(dir=tmp_path, key_file=tmp_path / "missing", generate_key=False),
        service="trainer",
        store=store,
    )
    assert not cache.enabled and cache.load("a" * 40) is None and not cache.save("a" * 40)
    short = CompileCache(CompileCacheSettings(dir=tmp_path, key="short", key_file=None), service="trainer")
    assert not short.enabled
    assert "no signing key" in caplog.text or "cannot read key_file" in caplog.text


def test_a_local_key_is_generated_once_private(tmp_path):
    path = tmp_path / "state" / "compile-cache.key"
    first = cc.load_secret(CompileCacheSettings(key_file=path))
    assert first and len(first) == 64 and (path.stat().st_mode & 0o777) == 0o600
    assert cc.load_secret(CompileCacheSettings(key_file=path)) == first


def test_choices_round_trip(tmp_path, store):
    cache = CompileCache(settings(tmp_path), service="keyframe-renderer", store=store)
    assert cache.record_choice("c" * 40, {"mode": "max-autotune", "seconds_per_image": {"default": 2.0}})
    other = CompileCache(settings(tmp_path / "elsewhere"), service="keyframe-renderer", store=store)
    assert other.choice("c" * 40)["mode"] == "max-autotune"  # from the store: a pod on another node


# --- a second process reuses the artifacts ---------------------------------------------------------
def run_child(what: str, local: Path, inductor: Path, env: dict[str, str], *store: str) -> dict:
    full = {
        **os.environ,
        **env,
        "DREAMFRAME_TEST_CC_KEY": KEY,
        "TORCHINDUCTOR_CACHE_DIR": str(inductor),
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        [sys.executable, str(CHILD), what, str(local), *store],
        env=full,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def s3_env(s3_server) -> dict[str, str]:
    return {
        "DREAMFRAME_STORAGE__BACKEND": "s3",
        "DREAMFRAME_STORAGE__ENDPOINT": s3_server.endpoint,
        "DREAMFRAME_STORAGE__ACCESS_KEY": s3_server.access_key,
        "DREAMFRAME_STORAGE__SECRET_KEY": s3_server.secret_key,
        "DREAMFRAME_STORAGE__BUCKET": "compile-cache-test",
        "DREAMFRAME_STORAGE__CREATE_BUCKET": "true",
    }


@pytest.mark.slow
def test_a_new_process_on_another_node_loads_instead_of_compiling(tmp_path, s3_server):
    """Process 1 compiles (miss) and saves to its disk and S3; process 2 has an empty model-cache dir and a
    fresh TORCHINDUCTOR_CACHE_DIR (a pod on a new node): it fetches the bundle from S3 and inductor
    compiles nothing (FX graph and AOTAutograd cache hits, no miss)."""
    env = s3_env(s3_server)
    first = run_child("module", tmp_path / "node1", tmp_path / "inductor1", env)
    assert not first["hit"] and first["inductor"].get("fxgraph_cache_miss", 0) >= 1
    assert first["cache"]["saved"] == 1 and first["cache"]["misses"] == 1
    second = run_child("module", tmp_path / "node2", tmp_path / "inductor2", env)
    assert second["hit"] and second["cache"]["hits"] == 1 and second["cache"]["saved"] == 0
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert second["inductor"]["fxgraph_cache_hit"] >= 1
    assert second["aot_autograd"].get("autograd_cache_hit", 0) >= 1
    assert second["output"] == pytest.approx(first["output"])
    assert (tmp_path / "node2" / "test").is_dir()  # fetched copies are kept on the node's volume


@pytest.mark.slow
def test_the_tiny_renderer_engine_reuses_its_compiled_artifacts(tmp_path):
    env = {"DREAMFRAME_TEST_MODELS": str(tmp_path / "models")}
    store = str(tmp_path / "store")
    first = run_child("engine", tmp_path / "a", tmp_path / "inductor-a", env, store)
    assert not first["hit"] and first["cache"]["saved"] == 1
    second = run_child("engine", tmp_path / "b", tmp_path / "inductor-b", env, store)
    assert second["hit"] and second["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert second["checksum"] == first["checksum"]
    # (On a CPU a hit still builds the C++ kernels from the cached sources: no wall-time claim here.)


@pytest.mark.slow
def test_the_renderer_engine_loads_its_ahead_of_time_functions_and_traces_nothing(tmp_path):
    """compile_aot: the first process compiles the base UNet's forward ahead of time and stores the
    function (sealed) and a bundle of its kernels; a second process with an empty local dir and inductor
    dir loads both from the store and Dynamo traces no graph; the images are the same."""
    env = {"DREAMFRAME_TEST_MODELS": str(tmp_path / "models")}
    store = str(tmp_path / "store")
    first = run_child("engine-aot", tmp_path / "a", tmp_path / "inductor-a", env, store)
    assert first["graphs_traced"] >= 1 and first["cache"]["saved"] == 2  # the function and a bundle
    stored = tmp_path / "store" / "dreamframe" / "compile-cache" / "keyframe-renderer"
    assert len(list(stored.glob("*.aot"))) == 1  # the base UNet at one input signature (no refiner, VAE)
    assert len(list(stored.glob("*.bin"))) == 1  # its kernels: aot_compile bypasses inductor's graph cache
    second = run_child("engine-aot", tmp_path / "b", tmp_path / "inductor-b", env, store)
    assert second["graphs_traced"] == 0 and second["hit"] and second["cache"]["hits"] == 2
    assert second["checksum"] == first["checksum"]
    eager = run_child("engine", tmp_path / "c", tmp_path / "inductor-c", env)
    assert eager["checksum"] == first["checksum"]


def installed_runner(cache: CompileCache, key: str = "k" * 40):  # noqa: ANN201
    """A tiny module whose calls go through an installed AheadOfTime runner (the caller uninstalls)."""
    from compile_cache_child import Tiny

    from dreamframe.models import aot

    module = Tiny()
    runner = aot.AheadOfTime(module, "tiny", options={}, artifact_key=lambda *_: key, cache=cache)
    runner.install()
    return module, runner


def test_a_planted_ahead_of_time_function_is_refused_and_compiled_anew(tmp_path, monkeypatch):
    """An unsigned (or tampered) artifact never reaches torch's unpickler: the module compiles instead."""
    import torch

    from dreamframe.models import aot

    cache = CompileCache(CompileCacheSettings(dir=tmp_path, key=KEY, key_file=None), service="test")
    key = "k" * 40
    cache.local_path(key, aot.AOT_SUFFIX).parent.mkdir(parents=True)
    cache.local_path(key, aot.AOT_SUFFIX).write_bytes(b"cos\nsystem\n(S'echo planted'\ntR.")
    monkeypatch.setattr(
        torch.compiler, "load_compiled_function", lambda *a, **k: pytest.fail("unverified bytes loaded")
    )
    module, runner = installed_runner(cache, key)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.allclose(module(x), module.forward(x), atol=1e-5)
    assert (runner.loaded, runner.compiled, cache.stats.refused) == (0, 1, 1)
    aot.uninstall(module)


def test_a_failing_ahead_of_time_compile_falls_back_to_just_in_time(tmp_path, monkeypatch, caplog):
    """The API is experimental: when it cannot compile a module, the module is compiled as
    nn.Module.compile would, and renders on. The log names the error even when torch's has no message
    (torch 2.11 failed once on the H200 with an exception without a message, logged as "()")."""
    import types

    import torch

    from dreamframe.models import aot

    real_compile = torch.compile

    def compile_(target, **kwargs):  # noqa: ANN001, ANN003, ANN202
        if "guard_filter_fn" in kwargs.get("options", {}):

            def refuse(*_):  # noqa: ANN002, ANN202
                raise AssertionError

            return types.SimpleNamespace(forward=types.SimpleNamespace(aot_compile=refuse))
        return real_compile(target, **kwargs)

    monkeypatch.setattr(aot.torch, "compile", compile_)
    module, runner = installed_runner(CompileCache.disabled())
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.allclose(module(x), module.forward(x), atol=1e-5)
        assert torch.allclose(module(x * 2), module.forward(x * 2), atol=1e-5)
    assert runner.compiled == 0 and runner._jit is not None
    assert module._compiled_call_impl is runner  # back in place after the failed attempt
    failed = [r for r in caplog.records if "cannot compile" in r.getMessage()]
    assert "cannot compile (AssertionError)" in failed[0].getMessage() and failed[0].exc_info
    aot.uninstall(module)


def test_a_function_that_cannot_be_saved_still_runs(tmp_path, monkeypatch):
    import torch
    from torch._dynamo.aot_compile import AOTCompiledFunction

    from dreamframe.models import aot

    def refuse(*_, **__):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("Failed to serialize the following objects")

    monkeypatch.setattr(AOTCompiledFunction, "save_compiled_function", refuse)
    cache = CompileCache(CompileCacheSettings(dir=tmp_path, key=KEY, key_file=None), service="test")
    torch.manual_seed(0)
    module, runner = installed_runner(cache)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.allclose(module(x), module.forward(x), atol=1e-5)
    assert runner.compiled == 1 and cache.stats.saved == 0
    aot.uninstall(module)


def test_compiles_ahead_of_time_where_torch_keeps_the_api_behind_a_flag(tmp_path):
    """torch 2.11 (the GPU machines') has the API but attaches `aot_compile` only when
    `torch._dynamo.config.enable_aot_compile` is set, which it leaves off: every module fell back to
    just in time there. The runner turns the flag on for its own compile."""
    import torch

    from dreamframe.models import aot

    cache = CompileCache(CompileCacheSettings(dir=tmp_path, key=KEY, key_file=None), service="test")
    module, runner = installed_runner(cache)
    x = torch.randn(3, 16)
    with torch._dynamo.config.patch(enable_aot_compile=False), torch.no_grad():
        assert torch.allclose(module(x), module.forward(x), atol=1e-5)
    assert (runner.compiled, runner._jit, cache.stats.saved) == (1, None, 1)
    aot.uninstall(module)


def test_ahead_of_time_functions_are_compiled_static(tmp_path, monkeypatch):
    """Automatic dynamic shapes made torch 2.11 trace a float symbolically in the third module a process
    compiled (SDXL's VAE decoder after both UNets) and fail; each function serves one signature."""
    import torch

    from dreamframe.models import aot

    seen, real_compile = [], torch.compile

    def compile_(target, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.append(kwargs.get("dynamic", "unset"))
        return real_compile(target, **kwargs)

    monkeypatch.setattr(aot.torch, "compile", compile_)
    module, runner = installed_runner(CompileCache.disabled())
    with torch.no_grad():
        module(torch.randn(3, 16))
        module(torch.randn(5, 16))  # another signature: another static function
    assert seen == [False, False] and runner.compiled == 2
    aot.uninstall(module)


def test_signature_tells_shapes_dtypes_and_values_apart():
    import torch

    from dreamframe.models.aot import signature

    x = torch.zeros(2, 3)
    assert signature(((x,), {"a": None})) == signature(((torch.ones(2, 3),), {"a": None}))
    for other in (torch.zeros(3, 2), torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(3, 2).t()):
        assert signature(((other,), {"a": None})) != signature(((x,), {"a": None}))
    assert signature(((x,), {"a": True})) != signature(((x,), {"a": None}))
    assert signature({"b": 1, "a": 2}) == signature({"a": 2, "b": 1})


# --- the style trainer and the trainer look up before compiling and save after the first step -------------
@pytest.mark.slow
def test_style_trainer_looks_up_before_its_first_compile_and_finishes_after_step_one(
    tmp_path, store, monkeypatch
):
    from PIL import Image

    from dreamframe.models import sdxl
    from services.style_trainer import inversion
    from services.style_trainer.options import TrainOptions

    # Wiring only: the "compile" hands the module back (the compile itself is torch's, tested above).
    monkeypatch.setattr(inversion, "_compile", lambda module, mode: module)
    cache = CompileCache(settings(tmp_path), service="style-trainer", store=store)
    monkeypatch.setattr(inversion, "_compile_cache", cache)
    pipes = sdxl.load_sdxl("tiny", cache_dir=tmp_path / "models", device="cpu", with_refiner=False)
    options = TrainOptions(max_train_steps=2, checkpoint_every=0, compile=True)
    pictures = [Image.new("RGB", (64, 64), (i * 40, 90, 200 - i * 40)) for i in range(2)]
    first = inversion.TextualInversion(pipes, "Dramatic", options)
    first.encode_images(pictures)
    assert [r.step for r in first.train()] == [1, 2]
    assert cache.stats.misses == 1 and len(cache.stats.events) == 1  # one lookup, finished once
    assert first._cache_session.finished and not first._cache_session.hit
    # The next training in this process reuses the compiled modules: no lookup.
    second = inversion.TextualInversion(pipes, "Dramatic", options)
    second.encode_images(pictures)
    list(second.train())
    assert cache.stats.misses == 1 and second._cache_session is None


def test_trainer_finishes_its_session_after_the_first_optimizer_step(tmp_path, store, monkeypatch):
    import torch

    from services.trainer import modeling

    cache = CompileCache(settings(tmp_path), service="trainer", store=store)
    monkeypatch.setattr(modeling, "_compile_cache", cache)
    model = torch.nn.Linear(4, 2)
    precision = modeling.Precision(torch.float32, torch.float32)
    model._compile_cache_session = modeling.compile_cache_session(model, torch.device("cpu"), 1, precision)
    assert cache.stats.misses == 1
    optimizer = modeling.build_optimizer(model, 1e-3, 0.0)
    assert not model._compile_cache_session.finished
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    assert model._compile_cache_session.finished and len(cache.stats.events) == 1
    optimizer.step()
    assert len(cache.stats.events) == 1
