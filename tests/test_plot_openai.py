"""plot-llm through the openai package against a local server that speaks the chat-completions protocol
(services/plot_llm/scripted_server.py): structured output, repair turns, backoff on rate limits, the
json_object fallback, parallel calls, and a generation killed half way that resumes from the cache."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dreamframe.errors import FailedPrecondition, InvalidArgument, Unavailable
from dreamframe.keys import reference_story_key, story_key
from dreamframe.storage.local import LocalStore
from dreamframe.story import FRAME_PREFIX_RE, Story
from services.plot_llm.cache import cache_prefix
from services.plot_llm.options import StoryOptions
from services.plot_llm.scripted_server import ScriptedChatServer
from services.plot_llm.service import PlotService
from services.plot_llm.settings import PlotSettings

REPO = Path(__file__).resolve().parents[1]
THEME = "two strangers follow an old letter across town"
SMALL = StoryOptions(
    substories=2, tiny_stories=3, frames_per_tiny_story=4, dialogues_per_tiny_story=2, min_locations=4
)


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store", "dreamframe")


def service(server: ScriptedChatServer, store, **settings) -> PlotService:
    settings = {"backend": "openai", "model": "scripted", "base_url": server.base_url, **settings}
    return PlotService(PlotSettings(**settings), store)


def generate(svc: PlotService, options: StoryOptions = SMALL, theme: str = THEME, job: str = "job"):
    async def run():
        try:
            return await svc.generate(job, theme, options)
        finally:
            await svc.aclose()

    return asyncio.run(run())


def test_reference_sized_story_with_structured_output_and_repairs(store):
    broken = {"Level1Answer": 1, "Level2Answer": 1, "Level3Answer": 1}
    with ScriptedChatServer(invalid_answers=broken) as server:
        result = generate(service(server, store), StoryOptions(seed=3))

    story = result.story
    # the reference's shape: 11 × 11 × 11 frames, 6 dialogues and 2 QA per tiny story, 12+ places
    assert story.frame_count == 1331 and len(story.locations) >= 12
    dialogues = [i for s in story.substories for t in s.tiny_stories for i in t.items if i.kind == "dialogue"]
    assert len(dialogues) == 11 * 11 * 6
    assert all(len(t.qa) == 2 for s in story.substories for t in s.tiny_stories)
    assert result.llm_calls == 133 + 3 and result.cached_calls == 0  # one repair turn per broken answer
    reference = store.get_json(reference_story_key("job"))
    assert reference == story.to_reference() and Story.from_reference(reference).to_reference() == reference
    assert all(
        FRAME_PREFIX_RE.match(t).group("keyword") == "Dramatic"
        for k, t in reference["img_diag"]
        if k == "frame"
    )

    bodies = [r["body"] for r in server.requests]
    assert len(bodies) == 136
    fmt = bodies[0]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["name"] == "Level1Answer"
    assert all(b["model"] == "scripted" and b["temperature"] == 0.8 and "seed" in b for b in bodies)
    assert len({b["seed"] for b in bodies}) > 100  # every call its own seed

    # each broken answer went back to the LLM with what was wrong with it
    repairs = {r["kind"]: r["body"]["messages"] for r in server.requests if len(r["body"]["messages"]) > 2}
    assert set(repairs) == set(broken)
    assert "substories: Field required" in repairs["Level1Answer"][-1]["content"]
    assert "not valid JSON" in repairs["Level2Answer"][-1]["content"]
    assert (
        "Zorro" in repairs["Level3Answer"][-1]["content"]
        and "Zorro" in repairs["Level3Answer"][-2]["content"]
    )
    assert repairs["Level3Answer"][-2]["role"] == "assistant"


def test_rate_limits_are_retried_with_backoff_then_reported(store):
    tiny = StoryOptions(substories=1, tiny_stories=1, frames_per_tiny_story=2, min_locations=2)
    with ScriptedChatServer(rate_limited=3) as server:
        result = generate(service(server, store, max_retries=3), tiny)
        assert [r["status"] for r in server.requests[:4]] == [429, 429, 429, 200]
        assert result.llm_calls == 3 and result.story.frame_count == 2
    with ScriptedChatServer(rate_limited=10) as server:
        with pytest.raises(Unavailable):
            generate(service(server, store, max_retries=1), tiny, job="job2")
        assert len(server.requests) == 2  # the first try and one retry


def test_servers_without_json_schema_support_get_json_object(store):
    with ScriptedChatServer(json_schema_supported=False) as server:
        svc = service(server, store)
        result = generate(svc, SMALL)
    types = [r["body"]["response_format"]["type"] for r in server.requests]
    assert types[0] == "json_schema" and server.requests[0]["status"] == 400
    assert set(types[1:]) == {"json_object"}  # asked once, then remembered
    assert result.llm_calls == SMALL.total_calls and result.story.frame_count == 2 * 3 * 4


def test_unknown_models_are_invalid_arguments(store):
    with ScriptedChatServer(models=("scripted",)) as server:
        svc = service(server, store, models=["retired"])
        with pytest.raises(InvalidArgument) as info:
            svc.resolve_model("gpt-unknown")
        assert info.value.field == "options.model"
        # configured here but gone from the endpoint (HTTP 404)
        with pytest.raises(InvalidArgument) as info:
            generate(svc, StoryOptions(model="retired", substories=1, tiny_stories=1, min_locations=1))
        assert info.value.field == "options.model"


def test_answers_that_never_validate_fail_naming_the_level_and_item(store):
    with ScriptedChatServer(invalid_answers={"Level3Answer": 1000}) as server:
        with pytest.raises(FailedPrecondition) as info:
            generate(service(server, store, max_repair_attempts=2), SMALL)
    message = info.value.message
    assert message.startswith("level 3 (substory ") and ", tiny story " in message
    assert "failed validation 3 times" in message and "Zorro" in message
    # what finished is kept: the outline and the substories' parts are cached, no story was written
    calls = {store.get_json(i.key)["call"] for i in store.list(cache_prefix("job", 0))}
    assert {"outline", "substory-000"} <= calls and not any("tiny" in c for c in calls)
    assert not store.exists(story_key("job"))


def test_calls_run_in_parallel_up_to_the_limit(store, tmp_path):
    options = StoryOptions(
        substories=3, tiny_stories=4, frames_per_tiny_story=2, min_locations=2, max_parallel_calls=5
    )
    latency = 0.3
    with ScriptedChatServer(latency=latency) as server:
        # Untimed warm-up in a store of its own: the client's one-off lazy imports and first connection
        # (about a second here) are not what this test times.
        generate(service(server, LocalStore(tmp_path / "warm-up", "dreamframe")), options, job="warm-up")
        started = time.monotonic()
        result = generate(service(server, store), options)
        elapsed = time.monotonic() - started
    assert result.llm_calls == 1 + 3 + 12
    assert server.max_in_flight == 5
    # 16 calls: sequential would be 16 latencies (4.8 s); the critical path is 5 (1.5 s). The bound sits
    # well between the two so that a loaded 2-core CI machine (about 1 s of client overhead) still passes
    # while a client that serialises its calls cannot.
    sequential = result.llm_calls * latency
    assert elapsed < 0.7 * sequential


_KILLED_RUN = textwrap.dedent(
    """
    import asyncio, sys
    from services.plot_llm.settings import PlotSettings
    from dreamframe.storage.local import LocalStore
    from services.plot_llm.options import StoryOptions
    from services.plot_llm.service import PlotService

    base_url, root, theme = sys.argv[1:4]
    settings = PlotSettings(backend="openai", model="scripted", base_url=base_url)
    svc = PlotService(settings, LocalStore(root, "dreamframe"))
    options = StoryOptions(**{k: int(v) for k, v in (a.split("=") for a in sys.argv[4:])})
    asyncio.run(svc.generate("job", theme, options))
    """
)


@pytest.mark.slow
def test_a_killed_generation_resumes_without_resending_finished_calls(tmp_path):
    root = tmp_path / "store"
    counts = {
        "substories": 3,
        "tiny_stories": 4,
        "frames_per_tiny_story": 2,
        "min_locations": 2,
        "max_parallel_calls": 2,
    }
    options = StoryOptions(**counts)
    store = LocalStore(root, "dreamframe")
    with ScriptedChatServer(latency=0.1) as server:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _KILLED_RUN,
                server.base_url,
                str(root),
                THEME,
                *(f"{k}={v}" for k, v in counts.items()),
            ],
            cwd=REPO,
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            },
        )
        try:
            deadline = time.monotonic() + 60
            while len(list(store.list(cache_prefix("job", 0)))) < 5:
                assert proc.poll() is None, "the generation ended before it could be killed"
                assert time.monotonic() < deadline
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        finished = len(list(store.list(cache_prefix("job", 0))))
        sent_before = len(server.requests)
        assert 5 <= finished < options.total_calls and not store.exists(story_key("job"))
        # every cache entry is whole (atomic writes) and names its call
        assert all(store.get_json(i.key)["call"] for i in store.list(cache_prefix("job", 0)))

        result = generate(service(server, store), options)
        resent = server.requests[sent_before:]
    assert (result.llm_calls, result.cached_calls) == (options.total_calls - finished, finished)
    assert len(resent) == options.total_calls - finished
    assert result.story.frame_count == 3 * 4 * 2
    assert json.loads(store.get_bytes(story_key("job")))["theme"] == THEME
