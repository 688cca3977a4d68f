"""The "sim" preset: the real renderer around a simulated GPU (fixed latency, deterministic images)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from test_renderer_render import frame_events, make_story, pixels, put_embedding, put_story, request, run

from dreamframe import keys
from dreamframe.storage import LocalStore
from services.keyframe_renderer.renderer import Renderer
from services.keyframe_renderer.settings import RendererSettings


@pytest.fixture
def sim(tmp_path) -> tuple[LocalStore, Renderer]:
    store = LocalStore(tmp_path / "store", "dreamframe")
    settings = RendererSettings(preset="sim", sim_frame_seconds=0.02, sim_resolution=16, cpu_batch_size=3)
    renderer = Renderer(store, settings, cache_dir=tmp_path / "models")
    yield store, renderer
    renderer.close()


def test_sim_renders_stores_and_skips_like_the_real_renderer(sim):
    store, renderer = sim
    ref = put_story(store, "j", make_story(7))
    started = time.monotonic()
    events = run(renderer, request("j", ref))
    assert time.monotonic() - started >= 7 * 0.02  # the simulated GPU time was spent
    assert sorted(f.index for f in frame_events(events)) == list(range(7))
    assert events[-1].summary.rendered == 7 and events[-1].summary.batch_size == 3
    stored = sorted(i.key for i in store.list(keys.frames_prefix("j", 0)) if i.key.endswith(".png"))
    assert len(stored) == 7
    first = pixels(store, "j", 0)
    assert first.shape == (16, 16, 3) and not np.array_equal(first, pixels(store, "j", 1))
    again = run(renderer, request("j", ref))
    assert again[-1].summary.rendered == 0 and again[-1].summary.skipped == 7
    assert renderer.engine().model_id == "sim-v1"


def test_sim_images_are_deterministic_and_follow_the_style(sim, tmp_path):
    store, renderer = sim
    ref = put_story(store, "a", make_story(2))
    run(renderer, request("a", ref))
    other = Renderer(store, renderer.settings, cache_dir=tmp_path / "models")
    run(other, request("b", put_story(store, "b", make_story(2))))
    other.close()
    assert np.array_equal(pixels(store, "a", 1), pixels(store, "b", 1))
    styled = request("c", put_story(store, "c", make_story(2)), style_embedding=put_embedding(store, "c", 1))
    run(renderer, styled)
    assert not np.array_equal(pixels(store, "a", 1), pixels(store, "c", 1))


def test_sim_accepts_the_usual_options(sim):
    store, renderer = sim
    ref = put_story(store, "o", make_story(4))
    events = run(renderer, request("o", ref, options={"steps": 2, "batch_size": 4}))
    assert events[-1].summary.rendered == 4 and events[-1].summary.batch_size == 4


def test_a_compiled_engine_only_ever_sees_full_batches(sim):
    # A short last batch is another shape: torch.compile would compile it anew in the middle of a job
    # (minutes on a GPU). The renderer pads it with the last frame repeated and drops the extra images.
    store, renderer = sim
    ref = put_story(store, "plain", make_story(7))
    run(renderer, request("plain", ref))
    engine = renderer.engine()
    shapes: list[int] = []
    original = engine.render

    def recording(prompts, seeds, params):
        shapes.append(len(prompts))
        return original(prompts, seeds, params)

    engine.render = recording
    events = run(
        renderer, request("padded", put_story(store, "padded", make_story(7)), options={"compile": True})
    )
    assert shapes == [3, 3, 3]
    assert events[-1].summary.rendered == 7 and sorted(f.index for f in frame_events(events)) == list(
        range(7)
    )
    stored = [i.key for i in store.list(keys.frames_prefix("padded", 0)) if i.key.endswith(".png")]
    assert len(stored) == 7
    for i in range(7):
        assert np.array_equal(pixels(store, "plain", i), pixels(store, "padded", i)), f"frame {i}"


def test_the_gpu_batch_size_is_a_power_of_two_chosen_once(monkeypatch):
    import torch

    from services.keyframe_renderer import engine as engine_module

    free = {"bytes": 0}
    monkeypatch.setattr(engine_module, "free_memory", lambda device: free["bytes"])
    per_image = engine_module.BYTES_PER_PIXEL_BF16 * 1024 * 1024
    cuda = torch.device("cuda")
    sizes = {}
    for fits in (1, 2, 3, 10, 16, 40):
        free["bytes"] = engine_module.MEMORY_HEADROOM + fits * per_image
        sizes[fits] = engine_module.auto_batch_size(cuda, 1024, 1024, torch.bfloat16, 16, 4)
    assert sizes == {1: 1, 2: 2, 3: 2, 10: 8, 16: 16, 40: 16}

    class Params:
        width = height = 1024

    engine = engine_module.SDXLEngine.__new__(engine_module.SDXLEngine)
    engine.device, engine.dtype, engine._batch_sizes = cuda, torch.bfloat16, {}
    free["bytes"] = engine_module.MEMORY_HEADROOM + 10 * per_image
    assert engine.auto_batch_size(Params(), max_batch=16, cpu_batch=4) == 8
    free["bytes"] = engine_module.MEMORY_HEADROOM + 5 * per_image  # compiled graphs took memory since
    assert engine.auto_batch_size(Params(), max_batch=16, cpu_batch=4) == 8
