"""TrainStyle end to end on the tiny preset over a local store: outputs, reuse, resume, bad input."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch
from PIL import Image

from dreamframe import keys
from dreamframe.errors import Cancelled, InvalidArgument, NotFound
from dreamframe.storage import LocalStore
from dreamframe.story import Story
from services.style_trainer.embedding import StyleEmbedding
from services.style_trainer.options import ImageOptions, StyleOptions, TrainOptions
from services.style_trainer.service import Phase, StyleKeys, StyleRequest, StyleTrainer

OPTIONS = StyleOptions(
    preset="tiny",
    train=TrainOptions(max_train_steps=6, checkpoint_every=2),
    images=ImageOptions(num_images=3, steps=2, batch_size=2),
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "style-models"


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store", "dreamframe")


@pytest.fixture(scope="module")
def loaded():
    return {}  # pipelines loaded once for the module's trainers (as one server process would)


@pytest.fixture
def make_trainer(store, cache_dir, loaded):
    def make(share: bool = True) -> StyleTrainer:
        return StyleTrainer(
            store,
            default_preset="tiny",
            device="cpu",
            cache_dir=cache_dir,
            pipelines=loaded if share else None,
        )

    return make


def request(job: str = "job-a", **changes) -> StyleRequest:
    base = StyleRequest(
        job_id=job,
        keyword="Dramatic",
        description="dramatic chiaroscuro oil painting, deep shadows",
        locations=("a tavern", "a city gate"),
        options=OPTIONS,
    )
    return dataclasses.replace(base, **changes)


def png(size=(64, 64), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def embedding_of(store, job: str) -> StyleEmbedding:
    return StyleEmbedding.from_safetensors(store.get_bytes(StyleKeys.of(job, 0).embedding))


def test_trains_from_a_description_and_stores_everything(store, make_trainer):
    events = list(make_trainer().train(request()))
    phases = [e.phase for e in events]
    assert phases[0] == Phase.LOADING and phases[-1] == Phase.DONE
    assert Phase.GENERATING_IMAGES in phases and Phase.SAVING in phases
    steps = [e for e in events if e.phase == Phase.TRAINING and e.step]
    assert [e.step for e in steps] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(e.loss) and e.lr > 0 and e.eta >= 0 and e.total == 6 for e in steps)
    generated = [e for e in events if e.phase == Phase.GENERATING_IMAGES and e.done]
    assert [e.done for e in generated] == [1, 2, 3]

    result = events[-1].result
    out = StyleKeys.of("job-a", 0)
    assert result.token == "Dramatic" and result.steps == 6 and result.passes_computed == 12
    assert result.embedding.key == out.embedding and store.verify(result.embedding)
    assert result.reference_embedding.key == out.reference_embedding and store.verify(
        result.reference_embedding
    )
    assert len(result.style_images) == 3
    prefix = keys.style_prefix("job-a", 0)
    assert all(ref.key.startswith(f"{prefix}images/") and store.verify(ref) for ref in result.style_images)
    assert not store.exists(out.checkpoint), "checkpoint removed once the result is stored"
    embedding = embedding_of(store, "job-a")
    reference = StyleEmbedding.from_reference_pt(
        store.get_bytes(out.reference_embedding), "Dramatic", dims=(32, 48)
    )
    assert torch.equal(embedding.clip_l, reference.clip_l) and torch.equal(embedding.clip_g, reference.clip_g)
    assert store.get_json(out.result)["token"] == "Dramatic"


def test_a_rerun_reuses_verified_outputs_without_loading_a_model(store, make_trainer):
    first = list(make_trainer().train(request()))[-1].result
    trainer = make_trainer(share=False)
    events = list(trainer.train(request()))
    assert len(events) == 1 and events[0].phase == Phase.DONE
    assert events[0].result.reused and events[0].result.embedding == first.embedding
    assert trainer.loaded_presets == []
    # a changed request trains again, and reuses the generated images
    changed = list(
        trainer.train(request(options=dataclasses.replace(OPTIONS, train=TrainOptions(max_train_steps=3))))
    )
    assert not changed[-1].result.reused and changed[-1].result.style_images == first.style_images
    # a damaged output is not trusted
    store.put_bytes(first.embedding.key, b"damaged")
    assert not list(trainer.train(request()))[-1].result.reused


def test_interrupted_run_resumes_from_its_checkpoint(store, make_trainer):
    uninterrupted = list(make_trainer().train(request("job-full")))[-1].result

    class Killed(Exception):
        pass

    with pytest.raises(Killed):  # the process dies after step 3 (checkpoint at step 2)
        for event in make_trainer().train(request("job-b")):
            if event.step == 3:
                raise Killed
    out = StyleKeys.of("job-b", 0)
    assert store.exists(out.checkpoint)
    assert not store.exists(out.embedding) and not store.exists(out.result), (
        "no final outputs from a killed run"
    )

    events = list(make_trainer().train(request("job-b")))
    resumed = [e for e in events if "resumed" in e.message]
    assert resumed and resumed[0].step == 2
    result = events[-1].result
    assert (
        result.resumed_from_step == 2
        and result.passes_computed == (6 - 2) * 2 < uninterrupted.passes_computed
    )
    a, b = embedding_of(store, "job-full"), embedding_of(store, "job-b")
    torch.testing.assert_close(a.clip_l, b.clip_l, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.clip_g, b.clip_g, rtol=0, atol=1e-6)


def test_stop_request_checkpoints_and_cancels(store, make_trainer):
    seen = []
    events = make_trainer().train(request("job-stop"), should_stop=lambda: len(seen) >= 3)
    with pytest.raises(Cancelled):
        for event in events:
            if event.phase == Phase.TRAINING and event.step:
                seen.append(event.step)
    assert seen == [1, 2, 3]
    out = StyleKeys.of("job-stop", 0)
    assert not store.exists(out.embedding)
    events = list(make_trainer().train(request("job-stop")))
    assert events[-1].result.resumed_from_step == 3


def test_user_images_are_used_instead_of_generated_ones(store, make_trainer):
    refs = tuple(store.put_bytes(f"uploads/{i}.png", png((64, 96), seed=i)) for i in range(2))
    events = list(make_trainer().train(request("job-u", style_images=refs, description="")))
    assert Phase.GENERATING_IMAGES not in [e.phase for e in events]
    assert events[-1].result.style_images == refs


def test_from_story(store, make_trainer):
    story = Story(
        overview="o", style_keyword="Noir", style_description="film noir, harsh light", locations=["a bar"]
    )
    req = StyleRequest.from_story("job-s", story, options=OPTIONS)
    assert (req.keyword, req.description, req.locations) == ("Noir", "film noir, harsh light", ("a bar",))


@pytest.mark.parametrize(
    ("changes", "field", "error"),
    [
        ({"keyword": " "}, "style_keyword", InvalidArgument),
        ({"keyword": "a{b}"}, "style_keyword", InvalidArgument),
        ({"keyword": "film noir"}, "style_keyword", InvalidArgument),
        ({"description": "", "style_images": ()}, "style_images", InvalidArgument),
        (
            {"options": dataclasses.replace(OPTIONS, train=TrainOptions(max_train_steps=0))},
            "options.max_train_steps",
            InvalidArgument,
        ),
        ({"options": dataclasses.replace(OPTIONS, preset="sd15")}, "options.preset", InvalidArgument),
        ({"job_id": "../x"}, "job_id", InvalidArgument),
    ],
)
def test_bad_requests_name_the_field_and_write_nothing(store, make_trainer, changes, field, error):
    with pytest.raises(error) as info:
        list(make_trainer().train(request(**changes)))
    assert info.value.field == field
    assert list(store.list("jobs/")) == []


def test_bad_user_images_are_named(store, make_trainer):
    good = store.put_bytes("uploads/good.png", png())
    broken = store.put_bytes("uploads/broken.png", b"\x89PNG but not really")
    small = store.put_bytes("uploads/small.png", png((16, 16)))
    trainer = make_trainer(share=False)
    cases = [
        ((good, good, good, broken), "style_images.3", InvalidArgument, "decodable"),
        ((small,), "style_images.0", InvalidArgument, "16×16"),
        ((good, dataclasses.replace(good, key="uploads/missing.png")), "style_images.1", NotFound, "missing"),
        ((dataclasses.replace(good, sha256="0" * 64),), "style_images.0", InvalidArgument, "sha256"),
    ]
    for refs, field, error, words in cases:
        with pytest.raises(error) as info:
            list(trainer.train(request(style_images=refs)))
        assert info.value.field == field and words in info.value.message
    assert trainer.loaded_presets == [], "bad images are refused before any model is loaded"
    assert list(store.list("jobs/")) == []


def test_stop_during_image_generation_keeps_the_finished_images(store, make_trainer, tmp_path):
    with pytest.raises(Cancelled):
        list(make_trainer().train(request("job-g"), should_stop=lambda: True))
    prefix = f"{keys.style_prefix('job-g', 0)}images/"
    kept = [info.key for info in store.list(prefix)]
    assert 1 <= len(kept) < 3
    kept_file = tmp_path / "store" / "dreamframe" / kept[0]
    stamp = kept_file.stat().st_mtime_ns
    result = list(make_trainer().train(request("job-g")))[-1].result
    assert [ref.key for ref in result.style_images][: len(kept)] == kept
    assert kept_file.stat().st_mtime_ns == stamp, "finished images are reused, not made again"


def test_warm_up_compiles_a_default_requests_step_so_the_first_request_does_not(
    store, make_trainer, monkeypatch, tmp_path
):
    from dreamframe.models.compile_cache import CompileCache, CompileCacheSettings
    from services.style_trainer import inversion

    # Wiring only: the "compile" hands the module back (torch's compile is tested in test_compile_cache).
    monkeypatch.setattr(inversion, "_compile", lambda module, mode: module)
    cache = CompileCache(
        CompileCacheSettings(dir=tmp_path / "cc", key="warm-up-test-key-" * 2, key_file=None),
        service="style-trainer",
        store=store,
    )
    monkeypatch.setattr(inversion, "_compile_cache", cache)
    trainer = make_trainer(share=False)  # its own pipelines: the compiled-module registry is per model
    eager = trainer.warm_up("tiny", OPTIONS.train)
    assert eager is None and trainer.loaded_presets == ["tiny"] and cache.stats.misses == 0  # load only

    compiled = dataclasses.replace(OPTIONS, train=dataclasses.replace(OPTIONS.train, compile=True))
    trainer.warm_up("tiny", compiled.train)
    assert cache.stats.misses == 1 and len(cache.stats.events) == 1  # looked up, compiled, saved
    assert not list(store.list("jobs/"))  # the warm-up's embedding is thrown away
    events = list(trainer.train(request(options=compiled)))
    assert events[-1].phase is Phase.DONE and events[-1].result.steps == 6
    assert cache.stats.misses == 1 and len(cache.stats.events) == 1  # the request compiled nothing new
    # The warm-up compiled for the request's shapes: the request's own compile-cache key is the same.
    probe = inversion.TextualInversion(trainer.pipelines("tiny"), "Dramatic", compiled.train)
    probe_session = probe._compile_cache_session(text=True, channels_last=False)
    assert probe_session.key == cache.stats.events[0]["key"]
