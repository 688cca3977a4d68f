"""plot-llm with the local backend: the tiny random Llama + xgrammar writes a schema-valid story end to
end, every call is cached in storage, and reruns ask only what is missing."""

from __future__ import annotations

import asyncio
import dataclasses

import jsonschema
import pytest

from dreamframe.errors import FailedPrecondition
from dreamframe.keys import reference_story_key, story_key
from dreamframe.storage.local import LocalStore
from dreamframe.story import APPEARANCE_RE, FRAME_PREFIX_RE, Story
from services.plot_llm.cache import cache_prefix
from services.plot_llm.generator import StoryGenerator
from services.plot_llm.options import StoryOptions
from services.plot_llm.schemas import answer_schema, level1_model, level2_model, level3_model
from services.plot_llm.service import TINY_TEXT_LIMITS, PlotService
from services.plot_llm.settings import PlotSettings
from services.plot_llm.validation import STRUCTURAL

pytestmark = pytest.mark.slow

THEME = "a lighthouse keeper finds a message in a bottle"
OPTIONS = StoryOptions(
    substories=2,
    tiny_stories=2,
    frames_per_tiny_story=3,
    dialogues_per_tiny_story=2,
    qa_per_tiny_story=2,
    min_locations=3,
    max_characters=2,
    seed=7,
)
CALLS = OPTIONS.total_calls  # 1 + 2 + 4


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The service with its default settings: the tiny preset, loaded once for this module."""
    root = tmp_path_factory.mktemp("plot")
    svc = PlotService(
        PlotSettings(), LocalStore(root / "store", "dreamframe"), model_cache_dir=root / "models"
    )
    asyncio.run(svc.backend("tiny"))
    return svc


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store", "dreamframe")


def generator(service, store, **config) -> StoryGenerator:
    backend = asyncio.run(service.backend("tiny"))
    return StoryGenerator(backend, store, dataclasses.replace(service.generator_config("tiny"), **config))


def cache_entries(store, job="job") -> dict[str, str]:
    """call id → cache key."""
    prefix = cache_prefix(job, 0)
    return {store.get_json(info.key)["call"]: info.key for info in store.list(prefix)}


def test_tiny_model_writes_a_schema_valid_story(service, store):
    config = service.generator_config("tiny")
    assert config.validation == STRUCTURAL and config.limits == TINY_TEXT_LIMITS  # "auto" for the tiny preset
    events = []
    result = asyncio.run(generator(service, store).generate("job", THEME, OPTIONS, on_progress=events.append))

    assert result.cached_calls == 0 and result.llm_calls >= CALLS and not result.skipped
    story = result.story
    assert story.theme == THEME and story.frame_count == 2 * 2 * 3
    assert len(story.substories) == 2 and all(len(s.tiny_stories) == 2 for s in story.substories)
    for sub in story.substories:
        for tiny in sub.tiny_stories:
            kinds = [item.kind for item in tiny.items]
            assert kinds.count("frame") == 3 and kinds.count("dialogue") == 2 and kinds[0] == "frame"
            assert len(tiny.qa) == 2
    assert len(story.locations) >= 3 and 1 <= len(story.characters) <= 2
    assert all(APPEARANCE_RE.match(c.appearance) for c in story.characters)

    # both outputs stored under the story's keys, and they agree
    assert store.verify(result.story_ref) and store.verify(result.reference_ref)
    assert (result.story_ref.key, result.reference_ref.key) == (story_key("job"), reference_story_key("job"))
    assert Story.from_json(store.get_bytes(story_key("job"))) == story
    reference = store.get_json(reference_story_key("job"))
    assert reference == story.to_reference()
    frames = [text for kind, text in reference["img_diag"] if kind == "frame"]
    assert all(FRAME_PREFIX_RE.match(f).group("keyword") == story.style_keyword for f in frames)

    # every cached answer is valid against the JSON Schema its call was constrained by
    names = tuple(c.name for c in story.characters)
    schemas = {
        "outline": answer_schema(level1_model(2, 3, 2, TINY_TEXT_LIMITS)),
        "substory": answer_schema(level2_model(2, names, TINY_TEXT_LIMITS)),
        "tiny": answer_schema(level3_model(3, 2, 2, tuple(story.locations), names, TINY_TEXT_LIMITS)),
    }
    entries = cache_entries(store)
    assert len(entries) == CALLS
    for call, key in entries.items():
        kind = "tiny" if "tiny" in call else call.split("-")[0]
        jsonschema.validate(store.get_json(key)["answer"], schemas[kind])

    # progress: a level-1 start, then one event per call, counting up to the total
    assert [e.level for e in events][:2] == [1, 1] and {e.level for e in events} == {1, 2, 3}
    done = [e.done for e in events if e.message == "done"]
    assert done == list(range(1, CALLS + 1)) and events[-1].total == CALLS


def test_reruns_ask_only_what_is_not_cached(service, store):
    first = asyncio.run(generator(service, store).generate("job", THEME, OPTIONS))

    # outputs exist and verify: nothing is asked, nothing rewritten
    again = asyncio.run(generator(service, store).generate("job", THEME, OPTIONS))
    assert again.skipped and again.llm_calls == 0 and again.story_ref == first.story_ref

    # outputs gone (e.g. killed before writing them): the story comes back from the cache alone
    store.delete(story_key("job"))
    store.delete(reference_story_key("job"))
    cached = asyncio.run(generator(service, store).generate("job", THEME, OPTIONS))
    assert (cached.llm_calls, cached.cached_calls) == (0, CALLS)
    assert cached.story == first.story and cached.story_ref == first.story_ref

    # a run killed half way: some calls never finished. Only those are asked again, and since every
    # call has its own seed the story comes out the same.
    entries = cache_entries(store)
    for call in ("outline", "substory-001-tiny-000"):
        store.delete(entries[call])
    store.delete(story_key("job"))
    resumed = asyncio.run(generator(service, store).generate("job", THEME, OPTIONS))
    assert (resumed.llm_calls, resumed.cached_calls) == (2, CALLS - 2)
    assert resumed.story == first.story


def test_strict_checks_hold_the_tiny_model_to_content_and_fail_clearly(service, store):
    """Random text cannot use its own style keyword: strict mode repairs, then gives up naming the call."""
    gen = generator(service, store, validation="strict", max_repair_attempts=1)
    with pytest.raises(FailedPrecondition) as info:
        asyncio.run(gen.generate("job", THEME, OPTIONS))
    assert "level 1 (outline)" in info.value.message and "2 times" in info.value.message
    assert "style_description" in info.value.message
    assert not store.exists(story_key("job")) and not list(store.list(cache_prefix("job", 0)))


def test_a_different_story_under_the_same_keys_is_not_overwritten(service, store):
    other = Story(theme="another theme", overview="Someone else's story.")
    store.put_bytes(story_key("job"), other.to_json().encode())
    store.put_json(reference_story_key("job"), other.to_reference())
    before = store.get_bytes(story_key("job"))
    with pytest.raises(FailedPrecondition) as info:
        asyncio.run(generator(service, store).generate("job", THEME, OPTIONS))
    assert info.value.field == "job_id" and "another theme" in info.value.message
    assert store.get_bytes(story_key("job")) == before
    assert not list(store.list(cache_prefix("job", 0)))  # refused before any LLM call
