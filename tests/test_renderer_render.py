"""keyframe-renderer on the tiny preset: real (tiny, random) SDXL base + refiner, real files in storage."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save

from dreamframe import keys
from dreamframe.errors import Cancelled, FailedPrecondition, InvalidArgument, NotFound
from dreamframe.storage import LocalStore
from dreamframe.storage.base import ObjectRef, sha256_bytes
from dreamframe.story import Character, Story, StoryItem, Substory, TinyStory
from services.keyframe_renderer import frames
from services.keyframe_renderer.engine import EngineCache, load_engine
from services.keyframe_renderer.options import FrameSelection, RenderOptions, resolve_options
from services.keyframe_renderer.renderer import Renderer, RenderEvent, RenderRequest
from services.keyframe_renderer.settings import RendererSettings

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8  # 6 base + 2 refiner steps: seconds on a CPU, both stages exercised


def make_story(n_frames: int = 6, keyword: str = "Noir") -> Story:
    items = []
    for i in range(n_frames):
        # The tiny tokenizer keeps 75 bytes: frames differ early in the text.
        items.append(StoryItem(kind="frame", text=f"scene {i}: Ann is sitting at the bar"))
        if i % 2:
            items.append(StoryItem(kind="dialogue", text=f"Ann: line {i}"))
    return Story(
        overview="a noir evening",
        style_keyword=keyword,
        characters=[Character(name="Ann", appearance="a woman looks like Emma Stone in red")],
        substories=[Substory(tiny_stories=[TinyStory(items=items)])],
    )


def put_story(store: LocalStore, job: str, story: Story) -> ObjectRef:
    return store.put_bytes(keys.story_key(job), story.to_json().encode(), content_type="application/json")


def put_embedding(store: LocalStore, job: str, seed: int, dims: tuple[int, int] = (32, 48)) -> ObjectRef:
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        "clip_l": torch.randn(1, dims[0], generator=gen),
        "clip_g": torch.randn(1, dims[1], generator=gen),
    }
    return store.put_bytes(f"{keys.style_prefix(job)}embedding-{seed}.safetensors", save(tensors))


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> EngineCache:
    cache_dir = tmp_path_factory.getbasetemp() / "renderer-models"
    return EngineCache(lambda preset: load_engine(preset, model_paths={}, cache_dir=cache_dir, device="cpu"))


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "store", "dreamframe")


@pytest.fixture
def renderer(store, engines) -> Renderer:
    r = Renderer(store, RendererSettings(device="cpu"), engines=engines)
    yield r
    r.close()


def request(job: str, story: ObjectRef, **kwargs) -> RenderRequest:
    opts = {"steps": STEPS, **kwargs.pop("options", {})}
    return RenderRequest(job_id=job, story=story, options=RenderOptions(**opts), **kwargs)


def run(renderer: Renderer, req: RenderRequest, **kwargs) -> list[RenderEvent]:
    return list(renderer.render(req, **kwargs))


def pixels(store: LocalStore, job: str, index: int) -> np.ndarray:
    data = store.get_bytes(keys.frame_key(job, 0, index))
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def frame_events(events: list[RenderEvent]):
    return [f for e in events for f in e.frames]


def test_renders_every_frame_with_metadata_and_sidecar(store, renderer):
    story = make_story(6)
    ref = put_story(store, "job1", story)
    events = run(renderer, request("job1", ref, options={"batch_size": 4}))

    done = frame_events(events)
    assert sorted(f.index for f in done) == list(range(6)) and not any(f.skipped for f in done)
    # One event per batch of 4 (6 frames: 4 + 2), its progress counting the whole batch.
    assert [(len(e.frames), e.progress.done) for e in events if e.frames] == [(4, 4), (2, 6)]
    assert not events[0].frames and events[0].progress.total == 6
    summary = events[-1].summary
    assert summary is not None and (summary.rendered, summary.skipped, summary.batch_size) == (6, 0, 4)
    assert summary.images_per_second > 0 and summary.frames_prefix == keys.frames_prefix("job1")
    assert events[-1].progress.eta_seconds == 0 and events[-1].progress.done == 6

    story_prompts = story.frame_prompts()
    for frame in done:
        i = frame.index
        png = store.get_bytes(keys.frame_key("job1", 0, i))
        assert frame.image.sha256 == sha256_bytes(png) and frame.seed == 20 + i
        with Image.open(io.BytesIO(png)) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
            text = dict(image.text)
        assert text["prompt"] == story_prompts[i]
        assert (text["seed"], text["model"], text["steps"]) == (str(20 + i), "tiny-v1", str(STEPS))
        sidecar = json.loads(store.get_bytes(keys.frame_sidecar_key("job1", 0, i)))
        assert sidecar["recipe"]["prompt"] == story_prompts[i] and sidecar["recipe"]["seed"] == 20 + i
        assert sidecar["recipe"]["settings"]["refiner"] is True
        assert sidecar["image"]["sha256"] == frame.image.sha256 and frame.sidecar.key.endswith(
            f"{i:06d}.json"
        )
    # A real picture, different per frame.
    assert pixels(store, "job1", 0).std() > 5
    assert np.abs(pixels(store, "job1", 0) - pixels(store, "job1", 1)).mean() > 1
    assert renderer.engines.loads == 1


def test_same_frame_renders_to_the_same_bytes(store, renderer):
    ref = put_story(store, "a", make_story(4))
    put_story(store, "b", make_story(4))
    pick = FrameSelection("list", indices=(3, 1))
    run(renderer, request("a", ref, frames=pick))
    run(renderer, request("b", ref, frames=pick, options={"batch_size": 2}))
    for i in (1, 3):
        assert store.get_bytes(keys.frame_key("a", 0, i)) == store.get_bytes(keys.frame_key("b", 0, i))
    before = store.get_bytes(keys.frame_key("a", 0, 3)), store.get_bytes(keys.frame_sidecar_key("a", 0, 3))
    events = run(renderer, request("a", ref, frames=pick, options={"overwrite": True}))
    assert events[-1].summary.rendered == 2
    after = store.get_bytes(keys.frame_key("a", 0, 3)), store.get_bytes(keys.frame_sidecar_key("a", 0, 3))
    assert before == after


def test_a_frame_does_not_depend_on_its_batch(store, renderer):
    ref = put_story(store, "b1", make_story(4))
    run(renderer, request("b1", ref, options={"batch_size": 1}))
    run(renderer, request("b4", ref, options={"batch_size": 4}))
    for i in range(4):
        diff = np.abs(pixels(store, "b1", i) - pixels(store, "b4", i))
        assert diff.max() <= 2 and diff.mean() < 0.05, f"frame {i}: max {diff.max()} mean {diff.mean()}"


def test_rerun_skips_finished_frames(store, renderer):
    ref = put_story(store, "job", make_story(5))
    engine = renderer.engine("tiny")
    run(renderer, request("job", ref))
    rendered, engine_frames = renderer.frames_rendered, engine.frames_rendered
    events = run(renderer, request("job", ref))
    assert (renderer.frames_rendered, engine.frames_rendered) == (rendered, engine_frames), "nothing rendered"
    assert sorted(f.index for f in frame_events(events)) == list(range(5))
    assert all(f.skipped for f in frame_events(events))
    assert (events[-1].summary.rendered, events[-1].summary.skipped) == (0, 5)


def test_changed_prompt_or_settings_render_again(store, renderer):
    story = make_story(4)
    ref = put_story(story=story, store=store, job="job")
    run(renderer, request("job", ref))
    story.substories[0].tiny_stories[0].items[0].text = "scene 0: Ann is standing at the door"
    ref = put_story(store, "job", story)
    events = run(renderer, request("job", ref))
    assert [(f.index, f.skipped) for f in frame_events(events)] == [
        (1, True),
        (2, True),
        (3, True),
        (0, False),
    ]
    text = frames.read_png_text(store.get_bytes(keys.frame_key("job", 0, 0)))
    assert "standing at the door" in text["prompt"]
    # Another image setting (here guidance) is another picture.
    events = run(
        renderer,
        request("job", ref, frames=FrameSelection("list", indices=(2,)), options={"guidance_scale": 7}),
    )
    assert [f.skipped for f in frame_events(events)] == [False]


def test_incomplete_or_damaged_frames_render_again(store, renderer):
    ref = put_story(store, "job", make_story(3))
    run(renderer, request("job", ref))
    png0 = store.get_bytes(keys.frame_key("job", 0, 0))
    store.delete(keys.frame_sidecar_key("job", 0, 0))  # killed between the PNG and its sidecar
    store.put_bytes(keys.frame_key("job", 0, 1), b"not a png")  # damaged after the fact
    events = run(renderer, request("job", ref))
    assert sorted(f.index for f in frame_events(events) if not f.skipped) == [0, 1]
    assert store.get_bytes(keys.frame_key("job", 0, 0)) == png0
    assert store.verify(frame_events(events)[-1].image)


def test_style_embedding_changes_the_image_and_never_leaks(store, renderer):
    # The reference binds the embedding to the style keyword itself: prompts are the same with or
    # without the embedding, only the token's meaning changes.
    ref = put_story(store, "plain", make_story(2))
    one = FrameSelection("list", indices=(0,))
    e1, e2 = put_embedding(store, "plain", 1), put_embedding(store, "plain", 2)
    tokenizer = renderer.engine("tiny").base.tokenizer
    vocab_size = len(tokenizer)

    run(renderer, request("plain", ref, frames=one))
    run(renderer, request("emb1", ref, frames=one, style_embedding=e1))
    assert len(tokenizer) == vocab_size + 1
    run(renderer, request("emb2", ref, frames=one, style_embedding=e2))
    run(renderer, request("plain-again", ref, frames=one))
    assert len(tokenizer) == vocab_size, "the token was removed again"
    run(renderer, request("emb1-again", ref, frames=one, style_embedding=e1))

    png = {
        job: store.get_bytes(keys.frame_key(job, 0, 0))
        for job in ("plain", "emb1", "emb2", "plain-again", "emb1-again")
    }
    assert png["plain"] == png["plain-again"], "no style left behind"
    assert png["emb1"] == png["emb1-again"], "the same embedding gives the same frame"
    assert len({png["plain"], png["emb1"], png["emb2"]}) == 3
    assert np.abs(pixels(store, "plain", 0) - pixels(store, "emb1", 0)).mean() > 1
    sidecar = json.loads(store.get_bytes(keys.frame_sidecar_key("emb1", 0, 0)))
    assert sidecar["recipe"]["style"] == {"token": "Noir", "embedding_sha256": e1.sha256}

    # Another embedding for the same job: the recipe changed, so the frame renders again.
    events = run(renderer, request("emb1", ref, frames=one, style_embedding=e2))
    assert not frame_events(events)[0].skipped
    assert store.get_bytes(keys.frame_key("emb1", 0, 0)) == png["emb2"]


def test_a_distinct_style_token_goes_into_the_prompts(store, renderer):
    ref = put_story(store, "tok", make_story(1))
    emb = put_embedding(store, "tok", 3)
    run(renderer, request("tok", ref, style_embedding=emb, style_token="<noir-style>"))
    text = frames.read_png_text(store.get_bytes(keys.frame_key("tok", 0, 0)))
    assert text["prompt"].startswith("generate an image in <noir-style> style: scene 0: a woman looks like")
    assert text["style_token"] == "<noir-style>"


def test_refiner_reuses_the_base_text_encoder_2_embeddings(renderer):
    engine = renderer.engine("tiny")
    prompts = ["generate an image in Noir style: a bar", "a dog"]
    with torch.inference_mode():
        embeds, _, pooled, _ = engine.base.encode_prompt(
            prompts, device="cpu", do_classifier_free_guidance=False
        )
        r_embeds, _, r_pooled, _ = engine.refiner.encode_prompt(
            prompts, device="cpu", do_classifier_free_guidance=False
        )
    assert torch.equal(embeds[..., -48:], r_embeds) and torch.equal(pooled, r_pooled)
    assert engine.attention == "FusedAttnProcessor2_0"  # fused QKV projections by default


def test_fused_qkv_renders_the_same_image_and_shares_the_weights(renderer):
    from diffusers.models.attention_processor import Attention

    from services.keyframe_renderer.engine import EngineOptions
    from services.keyframe_renderer.options import resolve_options

    engine = renderer.engine("tiny")
    params = resolve_options(
        RenderOptions(steps=STEPS), preset="tiny", resolution=64, default_batch_size=0, compile_default=False
    )
    prompts, seeds = ["scene 0: Ann is sitting at the bar", "scene 1: a dog"], [20, 21]
    try:
        engine.configure(EngineOptions(fuse_qkv=False))
        assert engine.attention == "AttnProcessor2_0"
        separate = engine.render(prompts, seeds, params).astype(np.int16)
        engine.configure(EngineOptions(fuse_qkv=True))
        assert engine.attention == "FusedAttnProcessor2_0"
        fused = engine.render(prompts, seeds, params).astype(np.int16)
    finally:
        engine.configure(EngineOptions())
    diff = np.abs(separate - fused)
    assert diff.max() <= 2 and diff.mean() < 0.05, f"max {diff.max()} mean {diff.mean()}"
    for model in (engine.base.unet, engine.refiner.unet, engine.base.vae):
        attentions = [m for m in model.modules() if isinstance(m, Attention)]
        assert attentions and all(a.fused_projections for a in attentions)
        for attn in attentions:
            fused_w = (attn.to_kv if attn.is_cross_attention else attn.to_qkv).weight
            # The separate projections are views into the fused weights: one copy in memory.
            assert attn.to_k.weight.untyped_storage().data_ptr() == fused_w.untyped_storage().data_ptr()
    # Stage device times were recorded for every batch.
    assert all(engine.stage_seconds[s] > 0 for s in ("encode", "base", "refiner", "decode"))


@pytest.mark.parametrize("backend", ["cudnn", "math"])
def test_preferred_sdpa_kernel_keeps_the_image(renderer, backend):
    from services.keyframe_renderer.engine import EngineOptions
    from services.keyframe_renderer.options import resolve_options

    engine = renderer.engine("tiny")
    params = resolve_options(
        RenderOptions(steps=STEPS), preset="tiny", resolution=64, default_batch_size=0, compile_default=False
    )
    auto = engine.render(["a dog"], [20], params).astype(np.int16)
    try:
        engine.configure(EngineOptions(sdpa_backend=backend))
        chosen = engine.render(["a dog"], [20], params).astype(np.int16)
    finally:
        engine.configure(EngineOptions())
    diff = np.abs(auto - chosen)
    assert diff.max() <= 2 and diff.mean() < 0.05


def test_without_the_refiner(store, renderer):
    ref = put_story(store, "base", make_story(1))
    run(renderer, request("base", ref))
    run(renderer, request("base-only", ref, options={"disable_refiner": True}))
    sidecar = json.loads(store.get_bytes(keys.frame_sidecar_key("base-only", 0, 0)))
    assert sidecar["recipe"]["settings"]["refiner"] is False
    assert np.abs(pixels(store, "base", 0) - pixels(store, "base-only", 0)).mean() > 0.5


@pytest.mark.parametrize(
    ("change", "error", "field"),
    [
        (dict(story=ObjectRef("dreamframe", "jobs/bad/stories/000/missing.json", 0, "")), NotFound, "story"),
        (dict(story=ObjectRef("dreamframe", "", 0, "")), InvalidArgument, "story.key"),
        (dict(job_id="../x"), InvalidArgument, "job_id"),
        (dict(story_index=-1), InvalidArgument, "story_index"),
        (dict(frames=FrameSelection("list", indices=(0, 7))), InvalidArgument, "frames.list.indices.1"),
        (dict(frames=FrameSelection("range", start=0, end=9)), InvalidArgument, "frames.range.end"),
        (dict(options=RenderOptions(steps=STEPS, width=100)), InvalidArgument, "options.width"),
        (dict(options=RenderOptions(steps=1)), InvalidArgument, "options.steps"),
        (dict(options=RenderOptions(preset="sd15")), InvalidArgument, "options.preset"),
        (dict(style_token="<x>"), InvalidArgument, "style_token"),
        (
            dict(style_embedding=ObjectRef("dreamframe", "nope.safetensors", 0, "")),
            NotFound,
            "style_embedding",
        ),
        ("wrong-dims", InvalidArgument, "style_embedding"),
        ("not-safetensors", InvalidArgument, "style_embedding"),
        ("changed-story", FailedPrecondition, "story.sha256"),
    ],
)
def test_bad_requests_name_the_field_and_write_nothing(store, renderer, change, error, field):
    ref = put_story(store, "bad", make_story(3))
    req = request("bad", ref)
    if change == "wrong-dims":
        change = dict(style_embedding=put_embedding(store, "bad", 1, dims=(768, 1280)))
    elif change == "not-safetensors":
        change = dict(style_embedding=store.put_bytes("jobs/bad/style.safetensors", b"{}"))
    elif change == "changed-story":
        put_story(store, "bad", make_story(4))
        change = {}
    with pytest.raises(error) as info:
        run(renderer, replace(req, **change))
    assert info.value.field == field
    assert not list(store.list(keys.frames_prefix("bad")))


def test_stop_finishes_the_batch_in_flight_then_resumes(store, renderer):
    ref = put_story(store, "stop", make_story(6))
    req = request("stop", ref, options={"batch_size": 2})
    seen: list[int] = []
    with pytest.raises(Cancelled):
        for event in renderer.render(req, should_stop=lambda: bool(seen)):
            seen.extend(f.index for f in event.frames)
    # The first frames are reported once the next batch is on its way; that batch still completes.
    assert seen == [0, 1, 2, 3]
    stored = sorted(info.key for info in store.list(keys.frames_prefix("stop")))
    assert stored == sorted(
        [keys.frame_key("stop", 0, i) for i in range(4)]
        + [keys.frame_sidecar_key("stop", 0, i) for i in range(4)]
    )
    events = run(renderer, req)
    assert [(f.index, f.skipped) for f in frame_events(events)] == [
        (0, True),
        (1, True),
        (2, True),
        (3, True),
        (4, False),
        (5, False),
    ]


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_fp8_linears_keep_the_image_close_and_switch_back(tmp_path, monkeypatch):
    from diffusers.models.attention_processor import Attention

    from dreamframe.models import fp8, sdxl
    from services.keyframe_renderer.engine import EngineOptions, SDXLEngine
    from services.keyframe_renderer.options import resolve_options

    pipes = sdxl.load_sdxl("tiny", model_paths={}, cache_dir=tmp_path, device="cpu")
    engine = SDXLEngine(pipes, model_id="tiny", reversible=True)
    params = resolve_options(
        RenderOptions(steps=STEPS), preset="tiny", resolution=64, default_batch_size=0, compile_default=False
    )
    prompts, seeds = ["scene 0: Ann is sitting at the bar", "scene 1: a dog"], [20, 21]
    plain = engine.render(prompts, seeds, params).astype(np.int16)

    engine.configure(EngineOptions(fp8=True))  # a CPU has no FP8 tensor cores: stays off
    assert not engine.options.fp8 and "FP8" not in engine.options.describe()

    monkeypatch.setattr(fp8, "unavailable_reason", lambda device: None)  # the CPU runs them, slowly
    engine.configure(EngineOptions(fp8=True))
    assert engine.options.fp8 and "FP8 linears" in engine.options.describe()
    for unet in (engine.base.unet, engine.refiner.unet):
        swapped = {n for n, m in unet.named_modules() if isinstance(m, fp8.Float8Linear)}
        assert swapped and all(".attentions." in f".{n}." for n in swapped)
        assert not any(type(m) is torch.nn.Linear for n, m in unet.named_modules() if ".attentions." in n)
        for attn in unet.modules():
            if isinstance(attn, Attention):  # fused QKV: the separate projections are views of the fused
                fused = attn.to_kv if attn.is_cross_attention else attn.to_qkv
                assert isinstance(fused, fp8.Float8Linear) and isinstance(attn.to_k, fp8.Float8Linear)
                assert (
                    attn.to_k.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
                )
    quantized = engine.render(prompts, seeds, params).astype(np.int16)
    alone = engine.render(prompts[1:], seeds[1:], params).astype(np.int16)
    diff = np.abs(plain - quantized)
    assert 0 < diff.mean() < 3, f"FP8 moved the image by {diff.mean():.2f} on average"
    # Batch-invariant by construction: each row's FP8 values and scale depend on that row alone.
    x = torch.randn(6, 32)
    values, scales = fp8._rowwise(x)
    one_values, one_scale = fp8._rowwise(x[2:3])
    assert torch.equal(values[2:3].float(), one_values.float()) and torch.equal(scales[2:3], one_scale)
    # The image: the CPU's FP8 GEMM (oneDNN) picks kernels by row count, and their last bits, amplified
    # through 2 UNets, move a frame by up to 4 of 255 (0.4 on average) on an AMD EPYC, 2 on other CPUs.
    batch = np.abs(alone[0] - quantized[1])
    assert batch.max() <= 8 and batch.mean() < 1.0, (batch.max(), batch.mean())

    engine.configure(EngineOptions())  # reversible: the original layers come back
    assert np.array_equal(engine.render(prompts, seeds, params).astype(np.int16), plain)
    assert not any(isinstance(m, fp8.Float8Linear) for m in engine.base.unet.modules())
    for attn in engine.base.unet.modules():  # and the separate projections are bf16 views again
        if isinstance(attn, Attention) and not attn.is_cross_attention:
            shared = attn.to_qkv.weight.untyped_storage().data_ptr()
            assert (
                type(attn.to_q) is torch.nn.Linear and attn.to_q.weight.untyped_storage().data_ptr() == shared
            )


def test_an_fp8_engine_without_its_originals_refuses_to_switch_back(tmp_path, monkeypatch):
    from dreamframe.models import fp8, sdxl
    from services.keyframe_renderer.engine import EngineOptions, SDXLEngine

    monkeypatch.setattr(fp8, "unavailable_reason", lambda device: None)
    pipes = sdxl.load_sdxl("tiny", model_paths={}, cache_dir=tmp_path, device="cpu")
    engine = SDXLEngine(pipes, model_id="tiny", options=EngineOptions(fp8=True))
    assert engine.options.fp8
    engine.configure(EngineOptions(fp8=True, sdpa_backend="math"))  # no layout change: fine
    with pytest.raises(ValueError, match="fp8"):
        engine.configure(EngineOptions(fp8=True, fuse_qkv=False))


def test_fp8_frames_carry_it_in_their_recipe_and_replace_bf16_ones(store, renderer, tmp_path, monkeypatch):
    from dreamframe.models import fp8

    ref = put_story(store, "job", make_story(2))
    assert all(not f.skipped for f in frame_events(run(renderer, request("job", ref))))
    monkeypatch.setattr(fp8, "unavailable_reason", lambda device: None)
    fp8_renderer = Renderer(store, RendererSettings(device="cpu", fp8=True), cache_dir=tmp_path)
    try:
        assert fp8_renderer.engine("tiny").options.fp8
        events = run(fp8_renderer, request("job", ref))
        assert [f.skipped for f in frame_events(events)] == [False, False]  # another recipe
        assert [f.skipped for f in frame_events(run(fp8_renderer, request("job", ref)))] == [True, True]
    finally:
        fp8_renderer.close()
    recipe = json.loads(frames.read_png_text(store.get_bytes(keys.frame_key("job", 0, 0)))["dreamframe"])
    assert recipe["settings"]["fp8_linears"] is True


def test_each_frame_gets_a_small_thumbnail_and_a_rerun_writes_none(store, renderer):
    ref = put_story(store, "thumbs", make_story(3))
    run(renderer, request("thumbs", ref))
    for i in range(3):
        data = store.get_bytes(keys.frame_thumb_key("thumbs", 0, i))
        with Image.open(io.BytesIO(data)) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) <= 192
            small = np.asarray(thumb.convert("RGB"), dtype=np.int16)
        # The frame's picture (64×64 frames are not scaled up): the same over 8×8 blocks, JPEG aside.
        frame = pixels(store, "thumbs", i)
        assert small.shape == frame.shape

        def blocks(a: np.ndarray) -> np.ndarray:
            return a.reshape(8, 8, 8, 8, 3).mean(axis=(1, 3))

        assert np.abs(blocks(small) - blocks(frame)).mean() < 4
        sidecar = json.loads(store.get_bytes(keys.frame_sidecar_key("thumbs", 0, i)))
        assert sidecar["thumbnail"]["sha256"] == sha256_bytes(data)
    # Thumbnails live beside the frames folder: a listing of frames/ is PNGs and sidecars only.
    assert all(i.key.endswith((".png", ".json")) for i in store.list(keys.frames_prefix("thumbs")))

    written: list[str] = []
    put_bytes = store.put_bytes
    store.put_bytes = lambda key, *a, **kw: written.append(key) or put_bytes(key, *a, **kw)
    store.delete(keys.frame_sidecar_key("thumbs", 0, 2))  # frame 2 is not done: rendered again
    events = run(renderer, request("thumbs", ref))
    assert [f.index for f in frame_events(events) if not f.skipped] == [2]
    assert [k for k in written if k.endswith(".jpg")] == [keys.frame_thumb_key("thumbs", 0, 2)]


def test_warm_up_runs_each_model_at_the_fewest_steps(store, engines, monkeypatch):
    """The warm-up batch exists to compile (or load compiled) graphs, whose shapes do not depend on the
    step count: it runs the fewest steps that still reach the base, the refiner and the decoder."""
    from services.keyframe_renderer.renderer import warm_up_params

    renderer = Renderer(store, RendererSettings(device="cpu", preset="tiny", compile=True), engines=engines)
    engine = renderer.engine("tiny")
    seen = []
    monkeypatch.setattr(engine, "compile", lambda mode=None: None)  # compiling is covered elsewhere
    monkeypatch.setattr(engine, "render", lambda prompts, seeds, params: seen.append((len(prompts), params)))
    try:
        renderer.warm_up()
    finally:
        renderer.close()
    [(batch, params)] = seen
    reference = resolve_options(
        RenderOptions(),
        preset="tiny",
        resolution=engine.resolution,
        default_batch_size=0,
        compile_default=True,
    )
    assert params == replace(reference, steps=params.steps) and batch >= 1
    split = engine.step_split(params)
    assert split.base >= 1 and split.refiner >= 1
    with pytest.raises(InvalidArgument):  # one step fewer would skip a model
        engine.step_split(replace(params, steps=params.steps - 1))
    assert params.steps < reference.steps
    no_refiner = replace(reference, use_refiner=False)
    assert warm_up_params(engine, no_refiner).steps == 1


@pytest.mark.slow
def test_regional_compile_traces_each_block_shape_once_and_keeps_the_image(renderer):
    """compile_regional: every UNet transformer block is compiled, the UNets themselves are not, blocks
    of one shape share one graph (fewer graphs than blocks: what makes a replica's start cheaper), the
    image is the eager one, and uncompiling puts every block back."""
    from diffusers.models.attention import BasicTransformerBlock
    from torch._dynamo.utils import counters

    from services.keyframe_renderer.engine import EngineOptions
    from services.keyframe_renderer.options import resolve_options

    engine = renderer.engine("tiny")
    params = resolve_options(
        RenderOptions(steps=STEPS), preset="tiny", resolution=64, default_batch_size=0, compile_default=False
    )
    prompts, seeds = ["scene 0: Ann is sitting at the bar", "scene 1: a dog"], [20, 21]
    blocks = [m for p in engine._pipes() for m in p.unet.modules() if isinstance(m, BasicTransformerBlock)]
    try:
        eager = engine.render(prompts, seeds, params).astype(np.int16)
        engine.configure(EngineOptions(compile_mode="default", compile_regional=True, compile_vae=False))
        assert "per transformer block" in engine.options.describe()
        assert all(b._compiled_call_impl is not None for b in blocks)
        assert all(p.unet._compiled_call_impl is None for p in engine._pipes())
        torch._dynamo.reset()
        counters.clear()
        compiled = engine.render(prompts, seeds, params).astype(np.int16)
        assert 0 < counters["stats"]["unique_graphs"] < len(blocks)
    finally:
        engine.configure(EngineOptions())
    assert not engine.compiled and all(b._compiled_call_impl is None for b in blocks)
    diff = np.abs(eager - compiled)
    assert diff.max() <= 2 and diff.mean() < 0.05, f"max {diff.max()} mean {diff.mean()}"


@pytest.mark.slow
def test_ahead_of_time_compile_covers_both_unets_and_the_decoder_and_keeps_the_image(renderer):
    """compile_aot (no compile cache here: functions live in the process only): each UNet and the VAE
    decoder gets one function per input signature, the image is the eager one, and uncompiling puts the
    modules' own calls back. It cannot be combined with compile_regional."""
    from dreamframe.models.aot import AheadOfTime
    from services.keyframe_renderer.engine import EngineOptions
    from services.keyframe_renderer.options import resolve_options

    engine = renderer.engine("tiny")
    params = resolve_options(
        RenderOptions(steps=STEPS), preset="tiny", resolution=64, default_batch_size=0, compile_default=False
    )
    prompts, seeds = ["scene 0: Ann is sitting at the bar", "scene 1: a dog"], [20, 21]
    modules = [p.unet for p in engine._pipes()] + [engine.base.vae.decoder]
    with pytest.raises(ValueError, match="compile_regional"):
        EngineOptions(compile_mode="default", compile_aot=True, compile_regional=True)
    try:
        eager = engine.render(prompts, seeds, params).astype(np.int16)
        engine.configure(EngineOptions(compile_mode="default", compile_aot=True))
        assert "ahead of time" in engine.options.describe()
        runners = [m._compiled_call_impl for m in modules]
        assert all(isinstance(r, AheadOfTime) for r in runners)
        compiled = engine.render(prompts, seeds, params).astype(np.int16)
        again = engine.render(prompts, seeds, params).astype(np.int16)
        assert [(r.compiled, len(r.functions)) for r in runners] == [(1, 1)] * 3  # nothing compiled twice
    finally:
        engine.configure(EngineOptions())
    assert not engine.compiled and all(m._compiled_call_impl is None for m in modules)
    assert np.array_equal(compiled, again)
    diff = np.abs(eager - compiled)
    assert diff.max() <= 2 and diff.mean() < 0.05, f"max {diff.max()} mean {diff.mean()}"
